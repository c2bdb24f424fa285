"""Longer context than pretraining: a model pretrained at 256 tokens, scored by position out to 1,024.

Rows (all on the same held-out documents: the chapters of a classic novel never trained on, as
``bench/heldout_by_work.py`` holds one out; each window of --long tokens is cut from inside one chapter, positions
starting at 0): the base model with no scaling (the positions simply go on past 256), the base with each RoPE scaling
type added at evaluation time and no training (linear, dynamic NTK, YaRN, llama3, factor long/short), and the base
after a context-extension run (``xiaolm pretrain --init-from BASE --seq-len LONG --rope-scaling yarn``) of a few
percent of its pretraining tokens. Columns: bits per character in position buckets of --bucket tokens, and passkey
retrieval (exact, and rank of the key among ten numbers; chance 0.10).

Goal (issue 28): after extension, the 512-1,024 bucket no worse than the original model's 0-256 bucket, and the
unextended model's collapse past 256 visible in the same table.

Everything runs through the CLI (``python -m xiaolm ...``), as a user would. Results: bench/results/context-*.json/md.

    OMP_NUM_THREADS=2 python bench/context_table.py                  # quickstart preset, 600 steps at 256
    python bench/context_table.py --steps 300 --extend-fraction 0.1 --tag quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from cli_runs import ROOT, BenchError, commit_id, xiaolm  # noqa: E402 (bench/ is on sys.path when run as a script)
from heldout_by_work import NOVELS, build_fold, prepare_sources  # noqa: E402

SCALINGS = ("linear", "dynamic", "yarn", "llama3")


def scored(run: Path, heldout_dir: Path, args, log: Path, commands: list[str], tag: str,
           scaling: str | None = None) -> dict:
    out = Path(args.work) / f"ppl-{tag}.json"
    extra = ["--rope-scaling", scaling] if scaling else []
    xiaolm(["eval", "ppl", str(run), "--data", str(heldout_dir), "--split", "train", "--seq-len", str(args.long),
            "--by-position", str(args.bucket), "--max-tokens", str(args.eval_tokens), "--batch-size", "4",
            "--device", args.device, "--out", str(out), *extra], log, commands)
    ppl = json.loads(out.read_text(encoding="utf-8"))
    pk_out = Path(args.work) / f"passkey-{tag}.json"
    xiaolm(["eval", "passkey", str(run), "--lengths", *[str(n) for n in args.passkey_lengths], "--trials",
            str(args.passkey_trials), "--device", args.device, "--out", str(pk_out), *extra], log, commands)
    pk = json.loads(pk_out.read_text(encoding="utf-8"))
    by_len = {}
    for r in pk["rows"]:
        e = by_len.setdefault(r["length"], [0.0, 0.0, 0])
        e[0] += r["exact"]
        e[1] += r["rank_of_ten"]
        e[2] += 1
    return {"buckets": ppl["by_position"]["buckets"], "windows": ppl["by_position"]["windows"],
            "passkey": {n: {"exact": round(a / k, 3), "rank_of_ten": round(b / k, 3)} for n, (a, b, k) in by_len.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", default="红楼梦", choices=NOVELS)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--short", type=int, default=256, help="pretraining context")
    ap.add_argument("--long", type=int, default=1024, help="extended context")
    ap.add_argument("--bucket", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps at --short")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--extend-fraction", type=float, default=0.05,
                    help="extension run's tokens as a fraction of pretraining's")
    ap.add_argument("--extend-lr", type=float, default=3e-4,
                    help="AdamW lr of the extension run (a continuation: well below pretraining's peak)")
    ap.add_argument("--extend-muon-lr", type=float, default=1e-3, help="Muon lr of the extension run")
    ap.add_argument("--base", default=None, help="reuse this base run (pretrained at --short) instead of training one")
    ap.add_argument("--skip-untrained", action="store_true",
                    help="leave out the rows of scaling types added without training")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=400_000)
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--passkey-trials", type=int, default=4, help="numbers per length and depth (5 depths)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="/tmp/xiaolm-heldout-cache")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    if not (shared / "classic_novels" / f"{args.heldout}.txt").is_file():
        print(f"context_table: shared data not found under {shared} (this bench needs ../shared/data)", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.work = args.work or f"/tmp/xiaolm-context-{stamp}"
    work, cache = Path(args.work), Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    log, commands = work / "log.txt", []
    t0 = time.time()
    try:
        sources = prepare_sources(shared, cache, log, commands)
        shards = build_fold(args.heldout, sources, cache, args.vocab, log, commands)
        base, ext = (Path(args.base) if args.base else work / "base"), work / "extended"
        if not args.base:
            xiaolm(["pretrain", "--data", str(shards), "--preset", args.preset, "--seq-len", str(args.short),
                    "--micro-batch-size", str(args.batch), "--max-steps", str(args.steps), "--eval-every", "0",
                    "--log-every", "50", "--sample-tokens", "1", "--no-progress", "--no-tensorboard", "--device",
                    args.device, "--out", str(base)], log, commands)
        base_tokens = args.steps * args.batch * args.short
        ext_batch = max(1, args.batch * args.short // args.long)  # the same tokens per step
        ext_steps = max(1, round(args.extend_fraction * base_tokens / (ext_batch * args.long)))
        xiaolm(["pretrain", "--data", str(shards), "--init-from", str(base), "--seq-len", str(args.long),
                "--rope-scaling", "yarn", "--micro-batch-size", str(ext_batch), "--max-steps", str(ext_steps),
                "--warmup-steps", str(max(1, ext_steps // 10)), "--lr", str(args.extend_lr),
                "--muon-lr", str(args.extend_muon_lr), "--windows", "aligned",
                "--eval-every", "0", "--log-every", "10", "--sample-tokens", "1", "--no-progress",
                "--no-tensorboard", "--device", args.device, "--out", str(ext)], log, commands)
        heldout = sources[args.heldout]
        rows = [{"model": "base, no scaling", **scored(base, heldout, args, log, commands, "base")}]
        print("  base scored", flush=True)
        for s in () if args.skip_untrained else SCALINGS:
            rows.append({"model": f"base + {s} (no training)", **scored(base, heldout, args, log, commands, s, s)})
            print(f"  base + {s} scored", flush=True)
        rows.append({"model": f"extended: yarn, lr {args.extend_lr:g} / Muon {args.extend_muon_lr:g}, {ext_steps} steps x {ext_batch} x {args.long} "
                              f"({100 * ext_steps * ext_batch * args.long / base_tokens:.1f}% of pretraining)",
                     **scored(ext, heldout, args, log, commands, "extended")})
    except BenchError as exc:
        print(f"context_table: {exc}", file=sys.stderr)
        return 1
    wall = time.time() - t0
    edges = [(b["start"], b["end"]) for b in rows[0]["buckets"]]
    head = "| model | " + " | ".join(f"bpc {a}-{b}" for a, b in edges) + " | " + " | ".join(
        f"passkey {n} exact / rank-of-10" for n in args.passkey_lengths) + " |"
    lines = [head, "|" + "---|" * (1 + len(edges) + len(args.passkey_lengths))]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{b['bits_per_char']:.4f}" for b in r["buckets"]) + " | "
                     + " | ".join(f"{r['passkey'][n]['exact']:.2f} / {r['passkey'][n]['rank_of_ten']:.2f}"
                                  for n in args.passkey_lengths) + " |")
    goal_ref = rows[0]["buckets"][0]["bits_per_char"]
    far = [b for b in rows[-1]["buckets"] if b["start"] >= args.long // 2]
    far_bpc = sum(b["bits_per_char"] for b in far) / max(len(far), 1)
    goal = (f"goal: extended model's {args.long // 2}-{args.long} bpc {far_bpc:.4f} vs base 0-{args.bucket} "
            f"{goal_ref:.4f}: {'met' if far_bpc <= goal_ref else 'not met'}")
    meta = {"date": stamp, "commit": commit_id(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load": os.getloadavg(), "wall_s": round(wall, 1), "args": vars(args), "commands": commands,
            "rows": rows, "goal": goal}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"context-{stamp}{'-' + args.tag if args.tag else ''}"
    (out / f"{name}.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    md = [f"# Context extension ({stamp}, commit {meta['commit']}, {meta['machine']}, load {meta['load']})", "",
          f"Held out: {args.heldout} ({rows[0]['windows']} windows of {args.long} tokens); base: {args.preset}, "
          f"{args.steps} steps x {args.batch} x {args.short} tokens; wall {wall:.0f} s.", "", *lines, "", goal]
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
