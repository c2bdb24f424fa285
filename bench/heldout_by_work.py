"""Real text, held out by work: old pretraining defaults against today's recipe, measured on a novel never trained on.

Training text: two of the three classic novels of ../shared/data/classic_novels (one document per chapter) plus
the modern side of ../shared/data/classical_modern_bitext. Held-out text: the third novel, whole. One tokenizer is
trained on the training text only; every variant then pretrains the same shape on the same shards for the same
number of steps (equal tokens), and is scored with ``xiaolm eval ppl`` in bits per character (tokenizer-independent)
on the training text's own val split (in distribution) and on the held-out novel. A recipe that wins only by
memorising its corpus wins the first column and not the second.

Everything goes through xiaolm's CLI (``python -m xiaolm data prepare / tokenizer train / data tokenize / pretrain
/ eval ppl``), so the bench measures what a user runs. Variants are interleaved: each trains ``--chunks`` slices of
its run in turn (``--stop-at-step``, then ``--resume``, which reproduces an uninterrupted run), so a busy machine
slows them alike; wall seconds are the trainer's own training time (evaluations excluded), indicative on a shared
machine. Each slice's checkpoint is scored as well, and a variant more than 10% slower than the baseline also trains
a run of its own for the steps it made in the baseline's seconds: equal tokens and equal wall-clock. Results (table, commands, machine, load) go to bench/results/heldout-by-work-*.json and .md.

    OMP_NUM_THREADS=1 python bench/heldout_by_work.py                      # hold out 红楼梦 (one fold)
    OMP_NUM_THREADS=1 python bench/heldout_by_work.py --heldout all        # three folds, one per novel
    python bench/heldout_by_work.py --heldout 三国演义 --steps 400 --tag s400
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
NOVELS = ("三国演义", "水浒传", "红楼梦")
BITEXT = "classical_modern_bitext/bitext_subset.jsonl"
BASELINE = "adamw-cosine"
# Each variant pins every option it compares, so the table keeps its meaning when the defaults change.
# "recipe" is recipe v2 (docs/RECIPE.md, 2026-12-05): its AdamW groups at 1.2e-2 whatever --lr the baseline takes.
# Both train and are scored without document masking, as measured (a chapter is thousands of characters, so few
# windows cross a document boundary here).
VARIANTS = {
    BASELINE: ["--optimizer", "adamw", "--schedule", "cosine", "--no-zero-init-residual", "--windows", "random",
               "--tie-word-embeddings", "--no-doc-mask"],
    "recipe": ["--optimizer", "muon", "--schedule", "wsd", "--zero-init-residual", "--windows", "random",
               "--no-tie-word-embeddings", "--muon-lr", "0.01", "--adam-lr", "1.2e-2", "--decay-fraction", "0.45",
               "--no-doc-mask"],
}


def prepare_sources(shared: Path, cache: Path, log: Path, commands: list[str]) -> dict[str, Path]:
    """Each novel (a document per chapter) and the bitext's modern side, prepared once into ``cache``."""
    out = {}
    for name in NOVELS:
        out[name] = cache / f"novel-{name}"
        if not (out[name] / "train.jsonl").is_file():
            xiaolm(["data", "prepare", str(shared / "classic_novels" / f"{name}.txt"), "--txt-mode", "chapter",
                    "--out", str(out[name]), "--workers", "0", "--quiet"], log, commands)
    out["bitext"] = cache / "bitext-modern"
    if not (out["bitext"] / "train.jsonl").is_file():
        xiaolm(["data", "prepare", str(shared / BITEXT), "--field", "modern", "--out", str(out["bitext"]),
                "--workers", "0", "--quiet"], log, commands)
    return out


def build_fold(heldout: str, sources: dict[str, Path], cache: Path, vocab: int, log: Path,
               commands: list[str]) -> Path:
    """Tokenizer and shards from the training text of the fold that holds ``heldout`` out."""
    fold = cache / f"fold-{heldout}-v{vocab}"
    train_dirs = [str(sources[n]) for n in NOVELS if n != heldout] + [str(sources["bitext"])]
    shards = fold / "shards"
    if not (shards / "meta.json").is_file():
        xiaolm(["tokenizer", "train", *train_dirs, "--vocab-size", str(vocab), "--out", str(fold / "tokenizer"),
                "--no-progress"], log, commands)
        xiaolm(["data", "tokenize", *train_dirs, "--tokenizer", str(fold / "tokenizer"), "--out", str(shards),
                "--workers", "1", "--no-progress"], log, commands)
    return shards


def train_seconds(run: Path, at_step: int | None = None) -> float:
    """The trainer's elapsed time at its last logged step, or at ``at_step`` (training and checkpoint saves, not
    evaluations)."""
    last = 0.0
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and (at_step is None or rec["step"] == at_step):
            last = rec["elapsed_s"]
    return last


def score(model: Path, shards: Path, heldout_dir: Path, args, log: Path, commands: list[str]) -> dict[str, dict]:
    """``xiaolm eval ppl`` of a run or checkpoint on the training text's val split and on the held-out novel."""
    scores = {}
    for key, data in (("val", ["--data", str(shards), "--split", "val"]),
                      ("heldout", ["--data", str(heldout_dir), "--split", "train"])):
        out = model / f"eval-{key}.json"
        xiaolm(["eval", "ppl", str(model), *data, "--max-tokens", str(args.eval_tokens), "--batch-size", "16",
                "--no-doc-mask", "--device", args.device, "--out", str(out)], log, commands)
        scores[key] = json.loads(out.read_text(encoding="utf-8"))
    return scores


def run_fold(heldout: str, sources: dict[str, Path], shards: Path, work: Path, args, log: Path,
             commands: list[str]) -> list[dict]:
    common = ["--data", str(shards), "--preset", args.preset, "--seq-len", str(args.seq_len),
              "--micro-batch-size", str(args.batch), "--lr", str(args.lr), "--warmup-steps", str(args.warmup),
              "--max-steps", str(args.steps), "--seed", str(args.seed), "--log-every", str(args.steps // args.chunks),
              "--eval-every", "0", "--eval-tokens", "4096", "--sample-tokens", "1", "--no-progress",
              "--no-tensorboard", "--keep-last", str(args.chunks + 1), "--device", args.device]
    runs = {name: work / f"{heldout}-{name}" for name in VARIANTS}
    for r in runs.values():
        if r.exists():
            raise BenchError(f"run directory {r} exists; pass another --work or remove it")
    stops = [args.steps * (i + 1) // args.chunks for i in range(args.chunks)]
    for i, stop in enumerate(stops):  # interleaved: a busy machine slows every variant alike
        for name, flags in VARIANTS.items():
            extra = (["--stop-at-step", str(stop)] if stop < args.steps else []) + (["--resume"] if i else [])
            xiaolm(["pretrain", *common, *flags, "--out", str(runs[name]), *extra], log, commands)
            print(f"  {heldout} held out: {name:<13} step {stop:>5}/{args.steps}  {train_seconds(runs[name]):7.1f} s",
                  flush=True)
    rows = []
    for name, run in runs.items():
        # Every slice's checkpoint is scored too: a variant that beats the baseline's full run with a fraction of
        # its tokens and seconds wins at equal wall-clock, not only at equal tokens (its lr not yet decayed there).
        for stop in stops:
            model = run if stop == args.steps else run / "checkpoints" / f"step-{stop:08d}"
            scores = score(model, shards, sources[heldout], args, log, commands)
            rows.append({
                "heldout": heldout, "variant": name if stop == args.steps else f"{name} @ step {stop}",
                "flags": VARIANTS[name], "steps": stop, "tokens": stop * args.batch * args.seq_len,
                "train_s": train_seconds(run, stop), "final": stop == args.steps,
                "val_bpc": round(scores["val"]["bits_per_char"], 4), "val_tokens": scores["val"]["tokens"],
                "heldout_bpc": round(scores["heldout"]["bits_per_char"], 4),
                "heldout_tokens": scores["heldout"]["tokens"],
                "heldout_chars_per_token": round(scores["heldout"]["chars_per_token"], 4),
            })
        print(f"  {heldout} held out: {name:<13} scored", flush=True)
    # Equal wall-clock: a variant slower than the baseline here gets a run of its own, as many steps as it made
    # in the baseline's training seconds (its schedule spanning them), so both questions are answered by a run.
    base_s = train_seconds(runs[BASELINE])
    for name, flags in VARIANTS.items():
        own_s = train_seconds(runs[name])
        if name == BASELINE or own_s <= base_s * (1 + args.equal_time_margin) or not args.equal_time:
            continue
        steps = max(1, int(args.steps * base_s / own_s))
        run = work / f"{heldout}-{name}-equal-time"
        xiaolm(["pretrain", *common, *flags, "--max-steps", str(steps), "--out", str(run)], log, commands)
        scores = score(run, shards, sources[heldout], args, log, commands)
        rows.append({
            "heldout": heldout, "variant": f"{name}, baseline's seconds ({steps} steps)", "flags": VARIANTS[name],
            "steps": steps, "tokens": steps * args.batch * args.seq_len, "train_s": train_seconds(run),
            "final": True, "equal_time": True,
            "val_bpc": round(scores["val"]["bits_per_char"], 4), "val_tokens": scores["val"]["tokens"],
            "heldout_bpc": round(scores["heldout"]["bits_per_char"], 4), "heldout_tokens": scores["heldout"]["tokens"],
            "heldout_chars_per_token": round(scores["heldout"]["chars_per_token"], 4),
        })
        print(f"  {heldout} held out: {name:<13} equal-time run of {steps} steps scored", flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| held out | variant | tokens | wall s (training) | train-val bpc | held-out-novel bpc | vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["heldout"] == r["heldout"] and b["variant"] == BASELINE)  # full run
        lines.append(f"| {r['heldout']} | {r['variant']} | {r['tokens']:,} | {r['train_s']:.1f} | {r['val_bpc']:.4f} "
                     f"| {r['heldout_bpc']:.4f} | {r['heldout_bpc'] - base['heldout_bpc']:+.4f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", default="红楼梦", help="novel(s) to hold out, comma-separated, or 'all' "
                                                       "(one fold each): " + ", ".join(NOVELS))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared data directory")
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="peak --lr of the baseline (the old quickstart's); the recipe pins its own lrs")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=2, help="slices each variant trains in turn (interleaving)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="tokens scored on each evaluation text")
    ap.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=True,
                    help="also train a variant slower than the baseline for the baseline's seconds")
    ap.add_argument("--equal-time-margin", type=float, default=0.1,
                    help="...when it is slower by more than this fraction (less is within this machine's noise)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="/tmp/xiaolm-heldout-cache", help="prepared text, tokenizers, shards")
    ap.add_argument("--work", default=None, help="run directories (default: a new /tmp/xiaolm-heldout-STAMP)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    shared = Path(args.shared)
    missing = [p for p in [*(shared / "classic_novels" / f"{n}.txt" for n in NOVELS), shared / BITEXT]
               if not p.is_file()]
    if missing:
        print(f"heldout_by_work: shared data not found: {missing[0]} (this bench needs ../shared/data; "
              f"pass --shared DIR)", file=sys.stderr)
        return 2
    folds = list(NOVELS) if args.heldout == "all" else [h.strip() for h in args.heldout.split(",") if h.strip()]
    bad = [h for h in folds if h not in NOVELS]
    if bad:
        print(f"heldout_by_work: --heldout {bad[0]!r} is not one of {', '.join(NOVELS)} or 'all'", file=sys.stderr)
        return 2
    if args.steps < args.chunks or args.chunks < 1:
        print(f"heldout_by_work: --steps {args.steps} must be at least --chunks {args.chunks} (>= 1)", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cache = Path(args.cache)
    work = Path(args.work or f"/tmp/xiaolm-heldout-{stamp}")
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "xiaolm.log"
    commands: list[str] = []
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    print(f"heldout_by_work: {args.preset} preset, vocab {args.vocab}, context {args.seq_len}, batch {args.batch}, "
          f"{args.steps} steps ({args.steps * args.batch * args.seq_len:,} tokens) per variant; folds: "
          f"{', '.join(folds)}; nproc {len(os.sched_getaffinity(0))}, load {load_start[0]:.1f}, commit {commit_id()}; log {log}",
          flush=True)
    rows = []
    try:
        sources = prepare_sources(shared, cache, log, commands)
        for heldout in folds:
            shards = build_fold(heldout, sources, cache, args.vocab, log, commands)
            rows += run_fold(heldout, sources, shards, work, args, log, commands)
    except BenchError as e:
        print(f"heldout_by_work: {e}", file=sys.stderr)
        return 1
    load_end = os.getloadavg()
    folds_seen = list(dict.fromkeys(r["heldout"] for r in rows))  # full runs first, then the mid-run checkpoints
    rows.sort(key=lambda r: (folds_seen.index(r["heldout"]), not r["final"], r.get("equal_time", False),
                             -r["steps"]))
    lines = table(rows)
    print("\n" + "\n".join(lines))
    print(f"bits/char over at most {args.eval_tokens:,} tokens of each text; held-out = the novel never trained on "
          f"(its first tokens, whole chapters); wall s indicative on a shared machine.")

    machine = {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": platform.processor()
               or platform.machine(), "load_avg_start": load_start, "load_avg_end": load_end,
               "omp_threads": os.environ.get("OMP_NUM_THREADS"), "device": args.device}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"heldout-by-work-{stamp}{'-' + args.tag if args.tag else ''}"
    total_s = round(time.perf_counter() - t0, 1)
    base.with_suffix(".json").write_text(json.dumps({
        "date_utc": stamp, "commit": commit_id(), "machine": machine, "bench_wall_s": total_s, "argv": sys.argv[1:],
        "spec": {k: getattr(args, k) for k in ("preset", "steps", "seq_len", "batch", "lr", "warmup", "vocab", "seed",
                                                "chunks", "eval_tokens")},
        "variants": VARIANTS, "baseline": BASELINE, "rows": rows, "commands": commands,
    }, ensure_ascii=False, indent=1), encoding="utf-8")
    base.with_suffix(".md").write_text("\n".join([
        f"# Held out by work, {stamp} UTC (commit {commit_id()})", "",
        f"Command: `python bench/heldout_by_work.py {' '.join(sys.argv[1:])}`; {args.preset} preset, vocab "
        f"{args.vocab}, context {args.seq_len}, batch {args.batch}, {args.steps} steps, lr {args.lr}, warmup "
        f"{args.warmup}, seed {args.seed}.",
        f"Machine: nproc {machine['nproc']} (of {machine['cpu_count']} CPUs), OMP_NUM_THREADS="
        f"{machine['omp_threads']}, load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end; "
        f"bench wall {total_s:.0f} s.", "",
        "Training text: the two other novels (a document per chapter) + the bitext's modern side; train-val: its "
        "2% val split; held-out: the novel named, never trained on, nor seen by the tokenizer.", "",
        *lines, "",
        *(f"- {name}: `{' '.join(flags)}`" for name, flags in VARIANTS.items()), "",
    ]), encoding="utf-8")
    print(f"wrote {base.with_suffix('.json')} and .md ({total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
