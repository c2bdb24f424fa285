"""The agent table: tool SFT, then GRPO with tools in the loop, scored on held-out tool tasks (issue 24's goals).

    python bench/agent_table.py --out /tmp/agent_bench                       # base from the quickstart route
    python bench/agent_table.py --base runs/base --out /tmp/agent_bench      # any pretrained RUNDIR

Steps, each a normal xiaolm command, timed: (base: ``xiaolm quickstart`` at ``--base-seq-len`` positions, since tool
conversations need more than its default 256), ``xiaolm data tools`` (``--schemas brief``: the tools listed in the
system prompt, which fits a small context), ``xiaolm sft`` on it, ``xiaolm eval tools`` of the SFT model with
thinking off and on (the contrast without tools included), ``xiaolm grpo --task tools`` from the SFT model, and
``xiaolm eval tools`` of the GRPO policy. The table prints the measured rates beside the issue's goals (valid calls
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


def evaluate(run_dir: Path, data: Path, out: Path, limit: int, thinking: bool) -> tuple[dict, float]:
    seconds = run(["eval", "tools", str(run_dir), "--data", str(data / "heldout.jsonl"), "--limit", str(limit),
                   "--max-new-tokens", "96", "--max-turns", "3", "--device", "cpu", "--out", str(out),
                   "--enable-thinking" if thinking else "--no-enable-thinking"])
    return json.loads(out.read_text()), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/agent_bench")
    ap.add_argument("--base", help="a pretrained RUNDIR (default: run the quickstart route)")
    ap.add_argument("--base-budget", type=float, default=240, help="quickstart training seconds")
    ap.add_argument("--base-seq-len", type=int, default=512)
    ap.add_argument("--train", type=int, default=3000, help="tool-task training samples")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--kinds", nargs="+", default=None, help="task kinds (default: all)")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--grpo-group", type=int, default=8, help="GRPO group size")
    ap.add_argument("--grpo-prompts", type=int, default=8, help="GRPO prompts per step")
    ap.add_argument("--sft-lr", type=float, default=2e-3)
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
                                 str(args.heldout), "--schemas", "brief", "--thinking", "mix", *kinds])
    sft = out / "sft"
    timings["sft"] = run(["sft", str(base), "--data", str(data), "--out", str(sft), "--max-steps",
                          str(args.sft_steps), "--micro-batch-size", "16", "--lr", str(args.sft_lr), "--eval-every",
                          str(args.sft_steps), "--sample-prompts", "0", "--no-progress", "--no-tensorboard",
                          "--device", "cpu"])
    results = {}
    results["sft, thinking off"], timings["eval sft (off)"] = evaluate(sft, data, out / "eval_sft_off.json",
                                                                      args.eval_limit, False)
    results["sft, thinking on"], timings["eval sft (on)"] = evaluate(sft, data, out / "eval_sft_on.json",
                                                                    args.eval_limit, True)
    grpo = out / "grpo"
    timings["grpo"] = run(["grpo", str(sft), "--task", "tools", "--prompts", str(data), "--out", str(grpo),
                           "--group-size", str(args.grpo_group), "--prompts-per-step", str(args.grpo_prompts),
                           "--micro-batch-size", "16",
                           "--max-new-tokens", "96", "--max-turns", "3", "--lr", "5e-5", "--kl-beta", "0.02",
                           "--no-enable-thinking", "--max-steps", str(args.grpo_steps), "--eval-every",
                           str(args.grpo_steps), "--no-progress", "--no-tensorboard", "--device", "cpu"])
    results["grpo, thinking off"], timings["eval grpo (off)"] = evaluate(grpo, data, out / "eval_grpo_off.json",
                                                                        args.eval_limit, False)
    lines = ["| model | valid calls | right function | exact arguments | answers with tools | without tools |",
             "|---|---|---|---|---|---|",
             "| goal | >= 95% | >= 90% | >= 70% | >= 60% | <= a third of with |"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['valid_call_rate']:.1f}% | {100 * r['right_function_rate']:.1f}% | "
                     f"{100 * r['exact_argument_rate']:.1f}% | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r.get('accuracy_without_tools', float('nan')):.1f}% |")
    gain = results["grpo, thinking off"]["accuracy"] - results["sft, thinking off"]["accuracy"]
    two_step = {name: {k: v for k, v in r["accuracy_by_kind"].items() if k in ("date_weekday", "lookup_calc",
                                                                              "compare")}
                for name, r in results.items() if name.startswith("sft")}
    lines += ["", f"GRPO with tools vs SFT (held-out answers, thinking off): {100 * gain:+.1f} points (goal +10)",
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
