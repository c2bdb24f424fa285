"""The agent table: tool SFT, then GRPO with tools in the loop, scored on held-out tool tasks (issue 24's goals).

    python bench/agent_table.py --out /tmp/agent_bench                       # base from the quickstart route
    python bench/agent_table.py --base runs/base --out /tmp/agent_bench      # any pretrained RUNDIR

Steps, each a normal xiaolm command, timed: (base: ``xiaolm quickstart`` at ``--base-seq-len`` positions, since tool
conversations need more than its default 256), ``xiaolm data tools`` (``--schemas names``: only the tools' names and
arguments in a short system prompt, so every kind with reasoning fits 512 positions; ``--thinking mix``),
``xiaolm sft`` on it (Muon), ``xiaolm eval tools`` of the SFT model with
thinking off and on (the contrast without tools included), ``xiaolm grpo --task tools`` from the SFT model, and
``xiaolm eval tools`` of the GRPO policy. Every generated turn may be as long as the longest reference turn of the
data plus 16 tokens. The table prints the measured rates beside the issue's goals (valid calls
>= 95%, right function >= 90%, exact arguments >= 70%, answers >= 60% with tools and at most a third of that
without, GRPO +10 points over SFT), and the CPU seconds each stage took. OUT/agent_table.json and .md hold it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
GOALS = {"valid_call_rate": 0.95, "right_function_rate": 0.90, "exact_argument_rate": 0.70, "accuracy": 0.60}


def run(argv: list[str]) -> float:
    from xiaolm.cli import main

    t = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"failed ({code}): xiaolm {' '.join(argv)}")
    return time.perf_counter() - t


def turn_budget(run_dir: Path, data: Path) -> int:
    """Tokens per generated turn: the longest reference turn of the data in this tokenizer, plus a margin (a fixed
    96 cut off every turn with reasoning and every two-call turn, so none of them could be right)."""
    from xiaolm.tasks.agent import reference_turn_tokens
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.utils import read_jsonl

    return reference_turn_tokens(load_tokenizer(run_dir / "tokenizer"), list(read_jsonl(data / "heldout.jsonl"))) + 16


def evaluate(run_dir: Path, data: Path, out: Path, limit: int, thinking: bool, max_new: int) -> tuple[dict, float]:
    seconds = run(["eval", "tools", str(run_dir), "--data", str(data / "heldout.jsonl"), "--limit", str(limit),
                   "--max-new-tokens", str(max_new), "--max-turns", "3", "--device", "cpu", "--out", str(out),
                   "--enable-thinking" if thinking else "--no-enable-thinking"])
    return json.loads(out.read_text()), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/agent_bench")
    ap.add_argument("--base", help="a pretrained RUNDIR (default: run the quickstart route)")
    ap.add_argument("--base-budget", type=float, default=240, help="quickstart training seconds")
    ap.add_argument("--base-seq-len", type=int, default=512)
    ap.add_argument("--train", type=int, default=8000, help="tool-task training samples")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--kinds", nargs="+", default=None, help="task kinds (default: all)")
    ap.add_argument("--schemas", default="names", help="full, brief or names (xiaolm data tools --schemas)")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft-batch", type=int, default=8, help="SFT micro-batch (packed rows of the context)")
    ap.add_argument("--sft-lr", type=float, default=3e-3, help="SFT lr of embeddings, head and norms")
    ap.add_argument("--sft-muon-lr", type=float, default=0.02, help="SFT lr of the hidden matrices (Muon)")
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--grpo-group", type=int, default=8, help="GRPO group size")
    ap.add_argument("--grpo-prompts", type=int, default=8, help="GRPO prompts per step")
    ap.add_argument("--grpo-lr", type=float, default=5e-5)
    ap.add_argument("--grpo-thinking", choices=["on", "off"], default="off", help="GRPO prompts' thinking switch")
    ap.add_argument("--eval-limit", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    base = Path(args.base) if args.base else out / "quickstart" / "run"
    if not args.base:
        timings["base (quickstart)"] = run(["quickstart", "--out", str(out / "quickstart"), "--time-budget",
                                            str(args.base_budget), "--seq-len", str(args.base_seq_len),
                                            "--device", "cpu"])
    data = out / "tools"
    kinds = ["--kinds", *args.kinds] if args.kinds else []
    timings["data tools"] = run(["data", "tools", "--out", str(data), "--train", str(args.train), "--heldout",
                                 str(args.heldout), "--schemas", args.schemas, "--thinking", "mix", *kinds])
    max_new = turn_budget(base, data)
    sft = out / "sft"
    timings["sft"] = run(["sft", str(base), "--data", str(data), "--out", str(sft), "--max-steps",
                          str(args.sft_steps), "--micro-batch-size", str(args.sft_batch), "--optimizer", "muon",
                          "--muon-lr", str(args.sft_muon_lr), "--lr", str(args.sft_lr), "--warmup-steps", "10",
                          "--eval-every", str(args.sft_steps), "--sample-prompts", "0", "--no-progress",
                          "--no-tensorboard", "--device", "cpu"])
    results = {}
    results["sft, thinking off"], timings["eval sft (off)"] = evaluate(sft, data, out / "eval_sft_off.json",
                                                                      args.eval_limit, False, max_new)
    results["sft, thinking on"], timings["eval sft (on)"] = evaluate(sft, data, out / "eval_sft_on.json",
                                                                    args.eval_limit, True, max_new)
    grpo = out / "grpo"
    timings["grpo"] = run(["grpo", str(sft), "--task", "tools", "--prompts", str(data), "--out", str(grpo),
                           "--group-size", str(args.grpo_group), "--prompts-per-step", str(args.grpo_prompts),
                           "--micro-batch-size", "16", "--max-new-tokens", str(max_new), "--max-turns", "3",
                           "--lr", str(args.grpo_lr), "--kl-beta", "0.02",
                           "--enable-thinking" if args.grpo_thinking == "on" else "--no-enable-thinking",
                           "--max-steps", str(args.grpo_steps), "--eval-every", str(args.grpo_steps),
                           "--no-progress", "--no-tensorboard", "--device", "cpu"])
    switch = f"thinking {args.grpo_thinking}"
    results[f"grpo, {switch}"], timings[f"eval grpo ({args.grpo_thinking})"] = evaluate(
        grpo, data, out / f"eval_grpo_{args.grpo_thinking}.json", args.eval_limit, args.grpo_thinking == "on",
        max_new)
    lines = ["| model | valid calls | right function | exact arguments | answers with tools | without tools |",
             "|---|---|---|---|---|---|",
             "| goal | >= 95% | >= 90% | >= 70% | >= 60% | <= a third of with |"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['valid_call_rate']:.1f}% | {100 * r['right_function_rate']:.1f}% | "
                     f"{100 * r['exact_argument_rate']:.1f}% | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r.get('accuracy_without_tools', float('nan')):.1f}% |")
    before, after = results[f"sft, {switch}"]["accuracy"], results[f"grpo, {switch}"]["accuracy"]
    gain = after - before
    n = results[f"sft, {switch}"]["samples"]
    noise = 2 * ((before * (1 - before) + after * (1 - after)) / n) ** 0.5  # two standard errors of the difference
    two_step = {name: {k: v for k, v in r["accuracy_by_kind"].items() if k in ("date_weekday", "lookup_calc",
                                                                              "compare")}
                for name, r in results.items() if name.startswith("sft")}
    lines += ["", f"GRPO with tools vs SFT (held-out answers, {switch}): {100 * gain:+.1f} points (goal +10; two "
                  f"standard errors {100 * noise:.1f}); turns of at most {max_new} tokens",
              f"two-step kinds, thinking off vs on (SFT): {json.dumps(two_step, ensure_ascii=False)}", "",
              "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines.append(f"| total | {sum(timings.values()):.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "agent_table.md").write_text(table + "\n", encoding="utf-8")
    (out / "agent_table.json").write_text(json.dumps({"results": results, "timings_s": timings, "args": vars(args)},
                                                     ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
