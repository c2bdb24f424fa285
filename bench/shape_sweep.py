"""Shape, vocabulary and learning-rate transfer at small scale, through xiaolm's CLI.

Four questions, each answered by a table whose first row is today's default (the ``quickstart`` preset, vocab 4,096,
tied embeddings, Muon lr 0.02, the recipe's optimizer/schedule/init), trained in the same run:

1. ``vocab``: tokenizer vocabulary 2k/4k/8k/16k(/32k) at equal training tokens. Tokens differ in length across
   vocabularies, so every model is scored in bits per CHARACTER on the same held-out text (built-in stories of
   another seed, a .jsonl scored whole by ``xiaolm eval ppl``), not in loss per token.
2. ``tied``: tied vs untied input/output embeddings at the quickstart shape.
3. ``shape``: depth vs width at about equal non-embedding parameters (the quickstart's 4 x 128, 2 x 192, 8 x 96).
4. ``lr``: 0.5x / 1x / 2x (``--lr-mults``) the Muon lr at the quickstart's width and at twice that width: is the
   best base lr the same?

Corpus: ``xiaolm data synth`` stories -> ``data prepare`` -> ``tokenizer train --vocab-size N`` -> ``data
tokenize`` (one tokenizer per vocabulary, cached). Every run is ``xiaolm pretrain`` with the same data order, steps,
context and batch (equal tokens) and pins the recipe's options, so a table keeps its meaning if defaults change.
s/step is the trainer's own training time per step (evaluation excluded); on a shared, loaded machine it is
indicative, so "equal wall-clock" is read from s/step next to bits/char. Results (tables, commands, machine, load)
go to bench/results/shape-sweep-*.json and .md, rewritten after every run so a cut-short bench keeps its rows.

    OMP_NUM_THREADS=1 python bench/shape_sweep.py                        # all four questions
    OMP_NUM_THREADS=1 python bench/shape_sweep.py --questions vocab,tied --steps 150 --tag v1
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
QUESTIONS = ("vocab", "tied", "shape", "lr")
# The recipe's pretraining options, pinned (see docs/RECIPE.md).
RECIPE = ["--optimizer", "muon", "--schedule", "wsd", "--zero-init-residual", "--windows", "random"]
# quickstart preset: hidden 128, 4 layers, 4 heads (head_dim 32), 2 KV heads, MLP 352.
QUICKSTART = dict(hidden=128, layers=4, heads=4, kv=2, mlp=352)
SHAPES = {  # about equal non-embedding parameters (0.74-0.76M), head_dim 24-32, KV heads = heads / 2
    "quickstart 4 x 128": QUICKSTART,
    "2 x 192 (half depth, 1.5x width)": dict(hidden=192, layers=2, heads=6, kv=3, mlp=464),
    "8 x 96 (double depth, 0.75x width)": dict(hidden=96, layers=8, heads=4, kv=2, mlp=240),
}
WIDE = dict(hidden=256, layers=4, heads=8, kv=4, mlp=704)  # 2x the quickstart's width, same depth and head_dim


def build_corpus(cache: Path, args, log: Path, commands: list[str]) -> tuple[Path, Path]:
    """Training stories (prepared) and a held-out .jsonl of stories from another seed, cached."""
    stories, prepared, val = cache / "stories.jsonl", cache / "prepared", cache / "val-stories.jsonl"
    if not stories.is_file():
        xiaolm(["data", "synth", "--num", str(args.stories), "--seed", "0", "--out", str(stories)], log, commands)
    if not (prepared / "train.jsonl").is_file():
        xiaolm(["data", "prepare", str(stories), "--field", "story_zh", "--out", str(prepared), "--workers", "0",
                "--quiet"], log, commands)
    if not val.is_file():
        xiaolm(["data", "synth", "--num", str(args.val_stories), "--seed", "1", "--out", str(val)], log, commands)
    return prepared, val


def build_shards(prepared: Path, cache: Path, vocab: int, log: Path, commands: list[str]) -> Path:
    """One tokenizer of ``vocab`` entries on the training stories, and their shards."""
    shards = cache / f"v{vocab}" / "shards"
    if not (shards / "meta.json").is_file():
        xiaolm(["tokenizer", "train", str(prepared), "--vocab-size", str(vocab), "--out",
                str(cache / f"v{vocab}" / "tokenizer"), "--no-progress"], log, commands)
        xiaolm(["data", "tokenize", str(prepared), "--tokenizer", str(cache / f"v{vocab}" / "tokenizer"), "--out",
                str(shards), "--workers", "1", "--no-progress"], log, commands)
    return shards


def params(shape: dict, vocab: int, tied: bool) -> tuple[int, int]:
    """(non-embedding, embedding) parameters of a Llama body of ``shape`` (no biases, RMSNorm gains)."""
    h, hd = shape["hidden"], shape["hidden"] // shape["heads"]
    layer = h * (h + 2 * shape["kv"] * hd) + h * h + 3 * h * shape["mlp"] + 2 * h
    return shape["layers"] * layer + h, vocab * h * (1 if tied else 2)


def train_stats(run: Path) -> tuple[float, int]:
    """The trainer's elapsed seconds at its last logged step, and that step."""
    last, step = 0.0, 0
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            last, step = rec["elapsed_s"], rec["step"]
    return last, step


def spec_rows(args) -> list[dict]:
    """Every run the chosen questions need: (question, label, vocab, shape, tied, muon lr)."""
    base = dict(vocab=4096, shape=QUICKSTART, tied=True, muon_lr=args.muon_lr)
    rows = []
    for q in args.questions:
        if q == "vocab":
            rows += [dict(base, question=q, label=f"vocab {v:,}" + (" (default)" if v == 4096 else ""), vocab=v)
                     for v in args.vocabs]
        elif q == "tied":
            rows += [dict(base, question=q, label="tied (default)"), dict(base, question=q, label="untied",
                                                                          tied=False)]
        elif q == "shape":
            rows += [dict(base, question=q, label=name + (" (default)" if s is QUICKSTART else ""), shape=s)
                     for name, s in SHAPES.items()]
        elif q == "lr":
            for width, shape in (("128 (quickstart)", QUICKSTART), ("256 (2x wide)", WIDE)):
                rows += [dict(base, question=q, label=f"width {width}, muon lr {args.muon_lr * m:g} ({m:g}x)"
                              + (" (default)" if m == 1 and shape is QUICKSTART else ""), shape=shape,
                              muon_lr=args.muon_lr * m, lr_mult=m, width=shape["hidden"])
                         for m in args.lr_mults]
    return rows


def run_key(r: dict) -> str:
    s = r["shape"]
    return (f"v{r['vocab']}-h{s['hidden']}-l{s['layers']}-a{s['heads']}-k{s['kv']}-m{s['mlp']}-"
            f"{'tied' if r['tied'] else 'untied'}-mlr{r['muon_lr']:g}")


def table(rows: list[dict], question: str) -> list[str]:
    lines = ["| variant | vocab | layers x hidden | non-emb params | emb params | tokens | s/step | val bpc | "
             "vs default |", "|---|---|---|---|---|---|---|---|---|"]
    mine = [r for r in rows if r["question"] == question and "val_bpc" in r]
    base = next((r for r in mine if "(default)" in r["label"]), None)
    for r in mine:
        s = r["shape"]
        delta = f"{r['val_bpc'] - base['val_bpc']:+.4f}" if base else "-"
        lines.append(f"| {r['label']} | {r['vocab']:,} | {s['layers']} x {s['hidden']} | {r['params_body']:,} | "
                     f"{r['params_emb']:,} | {r['tokens']:,} | {r['s_per_step']:.3f} | {r['val_bpc']:.4f} | "
                     f"{delta} |")
    return lines


def write_results(base: Path, rows: list[dict], args, machine: dict, commands: list[str], stamp: str,
                  t0: float) -> None:
    machine = {**machine, "load_avg_now": os.getloadavg()}
    total_s = round(time.perf_counter() - t0, 1)
    base.with_suffix(".json").write_text(json.dumps({
        "date_utc": stamp, "commit": commit_id(), "machine": machine, "bench_wall_s": total_s, "argv": sys.argv[1:],
        "spec": {k: getattr(args, k) for k in ("questions", "vocabs", "lr_mults", "steps", "seq_len", "batch", "lr",
                                                "muon_lr", "warmup", "seed", "stories", "val_stories")},
        "recipe_flags": RECIPE, "rows": rows, "commands": commands,
    }, ensure_ascii=False, indent=1), encoding="utf-8")
    md = [f"# Shape, vocabulary and lr transfer, {stamp} UTC (commit {commit_id()})", "",
          f"Command: `python bench/shape_sweep.py {' '.join(sys.argv[1:])}`; context {args.seq_len}, batch "
          f"{args.batch}, {args.steps} steps ({args.steps * args.batch * args.seq_len:,} tokens per run), --lr "
          f"{args.lr} (AdamW groups), Muon lr {args.muon_lr}, warmup {args.warmup}, seed {args.seed}, "
          f"{args.stories:,} training stories; val = {args.val_stories} stories of seed 1, scored whole in bits/char.",
          f"Machine: nproc {machine['nproc']} (of {machine['cpu_count']} CPUs), OMP_NUM_THREADS="
          f"{machine['omp_threads']}, load average {machine['load_avg_start'][0]:.1f} at start, "
          f"{machine['load_avg_now'][0]:.1f} at end; bench wall {total_s:.0f} s.", "",
          f"Every run: `{' '.join(RECIPE)}`.", ""]
    for q in args.questions:
        md += [f"## {q}", "", *table(rows, q), ""]
    base.with_suffix(".md").write_text("\n".join(md), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=",".join(QUESTIONS), help="comma-separated: " + ", ".join(QUESTIONS))
    ap.add_argument("--vocabs", default="2048,4096,8192,16384", help="vocabularies of the vocab question")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak --lr of the AdamW groups (the quickstart's)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="the default Muon lr (the lr question scales it)")
    ap.add_argument("--lr-mults", default="0.5,1,2", help="multiples of --muon-lr the lr question trains")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stories", type=int, default=20000)
    ap.add_argument("--val-stories", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="/tmp/xiaolm-shape-cache", help="stories, tokenizers, shards")
    ap.add_argument("--work", default=None, help="run directories (default: a new /tmp/xiaolm-shape-STAMP)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    args.questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    bad = [q for q in args.questions if q not in QUESTIONS]
    if bad or not args.questions:
        print(f"shape_sweep: --questions {bad[0] if bad else ''!r} is not one of {', '.join(QUESTIONS)}",
              file=sys.stderr)
        return 2
    try:
        args.vocabs = [int(v) for v in args.vocabs.split(",") if v.strip()]
    except ValueError:
        print(f"shape_sweep: --vocabs {args.vocabs!r} must be comma-separated integers", file=sys.stderr)
        return 2
    try:
        args.lr_mults = [float(m) for m in args.lr_mults.split(",") if m.strip()]
    except ValueError:
        print(f"shape_sweep: --lr-mults {args.lr_mults!r} must be comma-separated numbers", file=sys.stderr)
        return 2
    if not args.lr_mults or min(args.lr_mults) <= 0:
        print(f"shape_sweep: --lr-mults {args.lr_mults} must hold positive multiples", file=sys.stderr)
        return 2
    if not args.vocabs or min(args.vocabs) < 256:
        print(f"shape_sweep: --vocabs {args.vocabs} must hold vocabularies of at least 256", file=sys.stderr)
        return 2
    for name in ("steps", "seq_len", "batch", "stories", "val_stories"):
        if getattr(args, name) < 1:
            print(f"shape_sweep: --{name.replace('_', '-')} {getattr(args, name)} must be at least 1", file=sys.stderr)
            return 2
    if args.lr <= 0 or args.muon_lr <= 0:
        print(f"shape_sweep: --lr {args.lr} and --muon-lr {args.muon_lr} must be positive", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cache, work = Path(args.cache), Path(args.work or f"/tmp/xiaolm-shape-{stamp}")
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"shape-sweep-{stamp}{'-' + args.tag if args.tag else ''}"
    log = work / "xiaolm.log"
    commands: list[str] = []
    machine = {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": platform.processor()
               or platform.machine(), "load_avg_start": os.getloadavg(),
               "omp_threads": os.environ.get("OMP_NUM_THREADS"), "device": args.device}
    t0 = time.perf_counter()
    rows = spec_rows(args)
    print(f"shape_sweep: {len(rows)} rows ({len({run_key(r) for r in rows})} runs), context {args.seq_len}, batch "
          f"{args.batch}, {args.steps} steps ({args.steps * args.batch * args.seq_len:,} tokens) each; nproc "
          f"{machine['nproc']}, load {machine['load_avg_start'][0]:.1f}, commit {commit_id()}; log {log}", flush=True)
    done: dict[str, dict] = {}  # a run several questions share (the default) trains once
    try:
        prepared, val = build_corpus(cache, args, log, commands)
        for r in rows:
            key = run_key(r)
            if key not in done:
                shards = build_shards(prepared, cache, r["vocab"], log, commands)
                s, run = r["shape"], work / key
                xiaolm(["pretrain", "--data", str(shards), "--preset", "quickstart", "--seq-len", str(args.seq_len),
                        "--hidden-size", str(s["hidden"]), "--num-hidden-layers", str(s["layers"]),
                        "--num-attention-heads", str(s["heads"]), "--num-key-value-heads", str(s["kv"]),
                        "--intermediate-size", str(s["mlp"]),
                        "--tie-word-embeddings" if r["tied"] else "--no-tie-word-embeddings",
                        "--micro-batch-size", str(args.batch), "--lr", str(args.lr), "--muon-lr", f"{r['muon_lr']:g}",
                        "--warmup-steps", str(args.warmup), "--max-steps", str(args.steps), "--seed", str(args.seed),
                        "--log-every", str(args.steps), "--eval-every", "0", "--eval-tokens", "4096",
                        "--sample-tokens", "1", "--no-progress", "--no-tensorboard", "--device", args.device,
                        *RECIPE, "--out", str(run)], log, commands)
                score = run / "eval-val.json"
                xiaolm(["eval", "ppl", str(run), "--data", str(val), "--field", "story_zh", "--max-tokens", "10000000",
                        "--batch-size", "16", "--device", args.device, "--out", str(score)], log, commands)
                ev = json.loads(score.read_text(encoding="utf-8"))
                train_s, step = train_stats(run)
                body, emb = params(s, r["vocab"], r["tied"])
                done[key] = {"run": str(run), "train_s": round(train_s, 1), "s_per_step": train_s / max(step, 1),
                             "tokens": args.steps * args.batch * args.seq_len, "params_body": body, "params_emb": emb,
                             "val_bpc": round(ev["bits_per_char"], 4), "val_tokens": ev["tokens"],
                             "val_chars_per_token": round(ev["chars_per_token"], 4)}
            r.update(done[key])
            print(f"  {r['question']:<5} {r['label']:<46} {r['s_per_step']:.3f} s/step  {r['val_bpc']:.4f} bpc",
                  flush=True)
            write_results(base, rows, args, machine, commands, stamp, t0)
    except BenchError as e:
        print(f"shape_sweep: {e}", file=sys.stderr)
        write_results(base, rows, args, machine, commands, stamp, t0)
        return 1
    for q in args.questions:
        print(f"\n{q}:\n" + "\n".join(table(rows, q)))
    print("bits/char on the same held-out stories (scored whole); s/step indicative on a shared machine.")
    write_results(base, rows, args, machine, commands, stamp, t0)
    print(f"wrote {base.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
