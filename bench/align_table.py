"""The alignment table: SFT, SFT+DPO (on-policy pairs), SFT+GRPO side by side on held-out instructions, plus the
reward model's pairwise accuracy on the built-in task and on real preference data.

    python bench/align_table.py --sft runs/sft --instruct data/instruct --out /tmp/align_bench

Steps (each a normal xiaolm command, timed): on-policy pairs from the SFT model on the training prompts
(``xiaolm data pairs``), a reward model on those pairs (``xiaolm reward``, held-out accuracy by prompt hash), DPO on
the pairs (``xiaolm dpo``), GRPO from the SFT model (``xiaolm grpo``), then the instruction eval of all three models on
the same held-out instructions (greedy) and the side-by-side table. With ``--real-data`` (default: ../shared/data when
present) a reward model is also trained on LLaMA-Factory's and MedicalGPT's preference pairs (70% of the prompts by
hash) and scored on the rest, per source. Results go to OUT/align_table.json and OUT/align_table.md.
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


def run(argv: list[str]) -> float:
    from xiaolm.cli import main

    t = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"failed ({code}): xiaolm {' '.join(argv)}")
    return time.perf_counter() - t


def split_real(real: Path, out: Path, fraction: float = 0.3) -> dict[str, tuple[Path, Path]]:
    """Hash-split each real preference file by prompt into train / test JSON Lines (normalised pairs)."""
    from xiaolm.align.reward import is_heldout_prompt
    from xiaolm.data.pairs import load_preference_file
    from xiaolm.utils import write_jsonl

    files = {"LLaMA-Factory dpo_zh_demo": real / "llamafactory_demo_zh" / "dpo_zh_demo.json",
             "MedicalGPT reward_medical_test": real / "medicalgpt" / "reward_medical_test.json"}
    parts = {}
    for name, path in files.items():
        if not path.is_file():
            continue
        pairs, _, _ = load_preference_file(path)
        test = [p for p in pairs if is_heldout_prompt(p["prompt"], fraction)]
        train = [p for p in pairs if not is_heldout_prompt(p["prompt"], fraction)]
        stem = path.stem
        write_jsonl(out / f"{stem}.train.jsonl", train)
        write_jsonl(out / f"{stem}.test.jsonl", test)
        parts[name] = (out / f"{stem}.train.jsonl", out / f"{stem}.test.jsonl")
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT RUNDIR")
    ap.add_argument("--instruct", required=True, help="the `xiaolm data instruct` DIR (train.jsonl, heldout.jsonl)")
    ap.add_argument("--out", required=True, help="work directory")
    ap.add_argument("--prompts", type=int, default=512, help="training prompts for the on-policy pairs")
    ap.add_argument("--k", type=int, default=6, help="samples per prompt for the pairs")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="answer length when sampling and evaluating")
    ap.add_argument("--word-credit", type=float, default=1.0, help="verifier partial credit for required words")
    ap.add_argument("--repetition-weight", type=float, default=3.0, help="verifier penalty per share of repeated 4-grams")
    ap.add_argument("--min-margin", type=float, default=0.25, help="minimum score margin of a pair")
    ap.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                    help="pairs: the greedy answer is one more candidate (configs/dpo-stories.yaml)")
    # DPO: configs/dpo-stories.yaml's values
    ap.add_argument("--dpo-epochs", type=float, default=3.0)
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--sft-weight", type=float, default=1.0, help="DPO: weight of the chosen answers' NLL")
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--grpo-prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=6)
    ap.add_argument("--grpo-lr", type=float, default=5e-5)
    ap.add_argument("--kl-beta", type=float, default=0.04)
    ap.add_argument("--rm-epochs", type=float, default=3.0)
    ap.add_argument("--rm-lr", type=float, default=1e-4)
    ap.add_argument("--eval-limit", type=int, default=256, help="held-out instructions in the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-data", default=str(REPO.parent / "shared" / "data"),
                    help="../shared/data for the real-data reward model ('' to skip)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["rm", "dpo", "grpo", "real"], help="steps to skip")
    args = ap.parse_args()

    from xiaolm.align.compare import evaluate_models, side_by_side
    from xiaolm.eval.instruct import load_eval_samples
    from xiaolm.utils import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["--no-progress", "--no-tensorboard"]
    seed = ["--train.seed", str(args.seed)]
    times: dict[str, float] = {}
    report: dict = {"args": vars(args)}
    pairs = out / "pairs.jsonl"
    times["pairs"] = run(["data", "pairs", "--policy", args.sft, "--prompts", args.instruct, "--out", str(pairs),
                          "--limit", str(args.prompts), "--k", str(args.k),
                          "--max-new-tokens", str(args.max_new_tokens),
                          "--word-credit", str(args.word_credit), "--repetition-weight", str(args.repetition_weight),
                          "--min-margin", str(args.min_margin), *(["--greedy"] if args.greedy else []),
                          "--batch-size", "128", "--sampling.seed", str(args.seed)])
    report["pairs"] = json.loads((out / "pairs.jsonl.report.json").read_text())
    runs = {"SFT": args.sft}
    if "rm" not in args.skip:
        times["reward"] = run(["reward", args.sft, "--data", str(pairs), "--out", str(out / "rm"), "--epochs",
                               str(args.rm_epochs), "--lr", str(args.rm_lr), *quiet, *seed])
        report["reward_builtin"] = json.loads((out / "rm" / "summary.json").read_text())
    if "dpo" not in args.skip:
        times["dpo"] = run(["dpo", args.sft, "--data", str(pairs), "--out", str(out / "dpo"), "--epochs",
                            str(args.dpo_epochs), "--lr", str(args.dpo_lr), "--beta", str(args.beta),
                            "--sft-weight", str(args.sft_weight), "--heldout-fraction", "0", *quiet, *seed])
        runs["SFT+DPO"] = str(out / "dpo")
    if "grpo" not in args.skip:
        times["grpo"] = run(["grpo", args.sft, "--prompts", args.instruct, "--out", str(out / "grpo"), "--max-steps",
                             str(args.grpo_steps), "--prompts-per-step", str(args.grpo_prompts_per_step),
                             "--group-size", str(args.group_size), "--lr", str(args.grpo_lr), "--kl-beta",
                             str(args.kl_beta), "--word-credit", str(args.word_credit), "--repetition-weight",
                             str(args.repetition_weight), "--max-new-tokens",
                             str(args.max_new_tokens), *quiet, *seed])
        runs["SFT+GRPO"] = str(out / "grpo")
        report["grpo"] = json.loads((out / "grpo" / "summary.json").read_text())
    samples, _ = load_eval_samples([str(Path(args.instruct) / "heldout.jsonl")], limit=args.eval_limit)
    t = time.perf_counter()
    results = evaluate_models(runs, samples, max_new_tokens=args.max_new_tokens)
    times["eval"] = time.perf_counter() - t
    report["eval"] = results
    table = side_by_side(results)
    lines = [f"# Alignment table ({len(samples)} held-out instructions, greedy, {args.max_new_tokens} new tokens)", "",
             side_by_side(results, markdown=True), ""]
    p = report["pairs"]
    g = p["generation"]
    lines.append(f"On-policy pairs: {p['pairs']} from {p['prompts']} training prompts x {p['k']} samples "
                 f"(min margin {p['min_margin']}); generation {g['samples_per_s']:.1f} samples/s, "
                 f"{g['tokens_per_s']:.0f} tokens/s.")
    if "reward_builtin" in report:
        r = report["reward_builtin"]
        lines.append(f"Reward model, built-in task: held-out pairwise accuracy {100 * r['heldout_accuracy']:.1f}% on "
                     f"{r['heldout_pairs']} pairs (train {100 * r['train_accuracy']:.1f}%).")
    real = Path(args.real_data) if args.real_data else None
    if real is not None and real.is_dir() and "real" not in args.skip:
        parts = split_real(real, out / "real")
        if parts:
            train_files = [str(tr) for tr, _ in parts.values()]
            test_files = [str(te) for _, te in parts.values()]
            times["reward_real"] = run(["reward", args.sft, "--data", *train_files, "--heldout", *test_files,
                                        "--out", str(out / "rm_real"), "--epochs", str(args.rm_epochs), "--lr",
                                        str(args.rm_lr), *quiet, *seed])
            report["reward_real"] = {"summary": json.loads((out / "rm_real" / "summary.json").read_text())}
            from xiaolm.align.reward import encode_pairs, pair_accuracy
            from xiaolm.model.io import load_reward_model
            from xiaolm.data.pairs import load_preferences

            rm, tok, _ = load_reward_model(out / "rm_real")
            for name, (_, te) in parts.items():
                test_pairs = load_preferences([str(te)])[0]
                acc = pair_accuracy(rm, encode_pairs(tok, test_pairs, rm.config.max_position_embeddings), tok.pad_id)
                report["reward_real"][name] = acc
                lines.append(f"Reward model, real data ({name}): held-out pairwise accuracy "
                             f"{100 * acc['accuracy']:.1f}% on {acc['pairs']} pairs (chance 50%).")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
              "Device: CPU" + (" (no GPU in this run)" if not __import__("torch").cuda.is_available() else "")]
    report["times"] = times
    atomic_write_json(out / "align_table.json", report)
    atomic_write_text(out / "align_table.md", "\n".join(lines) + "\n")
    print(table)
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
