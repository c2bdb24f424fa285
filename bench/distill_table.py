"""Distillation: a student without a teacher against the same student taught online (--teacher) and offline
(--teacher-logits), at equal student tokens and at equal wall-clock, on the built-in stories and on real text held
out by work (as bench/heldout_by_work.py does: two classic novels + the bitext's modern side to train on, the third
novel held out).

Per corpus: one tokenizer and shards; one teacher (a larger preset) pretrained once; ``xiaolm data teacher-logits``
written once (its seconds counted against the offline student); then three students of one shape, seed and step
count, each saving ``--points`` checkpoints that ``xiaolm eval ppl`` scores in bits per character on the val split
(and on the held-out novel). Read off: each variant's final bits/char; the student tokens a distilled run needs to
reach the plain student's final bits/char (linear between checkpoints; the goal is <= 0.7x); and the bits/char
each variant has at the plain student's wall seconds (online: the teacher's forward is inside its training time;
offline: the logits' writing time is added once). rep-4 / distinct-2 come from the greedy samples each run writes at
its end. The teacher's own pretraining is not counted (it is trained once and taught from any number of times).

    nice -n 10 python bench/distill_table.py                        # both corpora, CPU-sized
    python bench/distill_table.py --corpus stories --steps 400 --tag s400
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

sys.path.insert(0, str(ROOT / "src"))


def stories_shards(cache: Path, args, log: Path, commands: list[str]) -> tuple[Path, None]:
    shards = cache / f"stories-{args.stories}-v{args.vocab}"
    if not (shards / "meta.json").is_file():
        xiaolm(["data", "synth", "--num", str(args.stories), "--seed", "0", "--out", str(cache / "stories.jsonl")],
               log, commands)
        xiaolm(["data", "prepare", str(cache / "stories.jsonl"), "--field", "story_zh", "--out",
                str(cache / "stories-prepared"), "--workers", "0", "--quiet"], log, commands)
        xiaolm(["tokenizer", "train", str(cache / "stories-prepared"), "--vocab-size", str(args.vocab), "--out",
                str(cache / "stories-tokenizer"), "--no-progress"], log, commands)
        xiaolm(["data", "tokenize", str(cache / "stories-prepared"), "--tokenizer", str(cache / "stories-tokenizer"),
                "--out", str(shards), "--workers", "1", "--no-progress"], log, commands)
    return shards, None


def novels_shards(cache: Path, args, log: Path, commands: list[str]) -> tuple[Path, Path]:
    import heldout_by_work as hbw

    sources = hbw.prepare_sources(Path(args.shared), Path(args.novels_cache), log, commands)
    return hbw.build_fold(args.heldout, sources, Path(args.novels_cache), args.vocab, log, commands), \
        sources[args.heldout]


def elapsed_at(run: Path) -> dict[int, float]:
    return {r["step"]: r["elapsed_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"}


def score(model: Path, shards: Path, heldout: Path | None, args, log: Path, commands: list[str]) -> dict:
    out = {}
    for key, data in (("val", ["--data", str(shards), "--split", "val"]),
                      *((("heldout", ["--data", str(heldout), "--split", "train"]),) if heldout else ())):
        f = model / f"eval-{key}.json"
        if f.is_file():  # scored by an earlier run in this --work (a sweep reuses the teacher and the plain student)
            out[key] = round(json.loads(f.read_text())["bits_per_char"], 4)
            continue
        xiaolm(["eval", "ppl", str(model), *data, "--max-tokens", str(args.eval_tokens), "--batch-size", "16",
                "--out", str(f)], log, commands)
        out[key] = round(json.loads(f.read_text())["bits_per_char"], 4)
    return out


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x along the polyline (None beyond its ends)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-9)
    return None


def first_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x where the (falling) polyline reaches ``target``."""
    if ys and ys[0] <= target:
        return xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= target < y0:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def run_corpus(name: str, shards: Path, heldout: Path | None, work: Path, args, log: Path,
               commands: list[str]) -> list[dict]:
    from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics

    key = "heldout" if heldout else "val"
    common = ["--data", str(shards), "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.batch),
              "--seed", "0", "--eval-every", "0", "--eval-tokens", "4096", "--no-progress", "--no-tensorboard",
              "--device", args.device, "--log-every", "5"]
    teacher = work / f"{name}-teacher{args.teacher_suffix}"
    if not (teacher / "summary.json").is_file():  # --work of an earlier run: its teacher (and logits) are reused
        xiaolm(["pretrain", *common, "--preset", args.teacher_preset, "--max-steps", str(args.teacher_steps),
                "--sample-tokens", "1", "--out", str(teacher)], log, commands)
    t_score = score(teacher, shards, heldout, args, log, commands)
    print(f"  {name}: teacher {args.teacher_preset} {args.teacher_steps} steps: {t_score}", flush=True)
    logits = work / f"{name}-teacher{args.teacher_suffix}-logits{'' if args.top_k == 8 else f'-k{args.top_k}'}"
    offline = "offline" in args.variants.split(",")
    if offline and not (logits / "teacher_logits.json").is_file():
        xiaolm(["data", "teacher-logits", "--shards", str(shards), "--teacher", str(teacher), "--seq-len",
                str(args.seq_len), "--top-k", str(args.top_k), "--device", args.device, "--out", str(logits)],
               log, commands)
    lmeta = json.loads((logits / "teacher_logits.json").read_text()) if offline else {}
    distil = ["--distill-alpha", str(args.alpha), "--distill-temperature", str(args.temperature)]
    variants = {"plain": [], "online": ["--teacher", str(teacher), *distil],
                "offline": ["--teacher-logits", str(logits), *distil]}
    variants = {k: v for k, v in variants.items() if k == "plain" or k in args.variants.split(",")}
    every = max(1, args.steps // args.points)
    points = sorted({*range(every, args.steps, every), args.steps})
    rows = []
    for vname, flags in variants.items():
        run = work / f"{name}-{vname}{'' if vname == 'plain' else args.run_suffix}"
        if (run / "summary.json").is_file():  # reused from an earlier run in --work (a sweep; a rerun)
            flags = None
        if flags is not None:
            xiaolm(["pretrain", *common, "--preset", args.student_preset, "--max-steps", str(args.steps),
                    "--save-every", str(every), "--keep-last", str(len(points) + 1), "--sample-tokens", "48",
                    *flags, "--out", str(run)], log, commands)
        secs = elapsed_at(run)
        extra_s = lmeta["wall_s"] if vname == "offline" else 0.0
        curve = []
        for step in points:
            model = run if step == args.steps else run / "checkpoints" / f"step-{step:08d}"
            curve.append({"step": step, "tokens": step * args.batch * args.seq_len,
                          "cost_s": round(secs.get(step, 0.0) + extra_s, 1),
                          **score(model, shards, heldout, args, log, commands)})
        summary = json.loads((run / "summary.json").read_text())
        rep = aggregate_repetition([repetition_metrics(s) for s in summary.get("samples", [])])
        rows.append({"corpus": name, "variant": vname, "curve": curve, "final": curve[-1],
                     "rep4": rep["rep4"], "distinct2": rep["distinct2"], "distill": summary.get("distill")})
        print(f"  {name}: {vname:<8} {curve[-1]}", flush=True)
    plain = rows[0]["final"]
    for r in rows:
        toks = [c["tokens"] for c in r["curve"]]
        cost = [0.0] + [c["cost_s"] for c in r["curve"]]
        bpc = [c[key] for c in r["curve"]]
        reach = first_reach(toks, bpc, plain[key])
        r["tokens_to_plain_final"] = round(reach) if reach is not None else None
        r["token_ratio"] = round(reach / plain["tokens"], 3) if reach is not None else None
        at = interpolate(cost[1:], bpc, plain["cost_s"])
        r["bpc_at_plain_wall"] = round(at, 4) if at is not None else (bpc[-1] if cost[-1] <= plain["cost_s"] else None)
        r["teacher"] = {"preset": args.teacher_preset, "steps": args.teacher_steps, **t_score}
        r["logits"] = {k: lmeta.get(k) for k in ("k", "bytes_per_token", "bytes", "wall_s", "s_per_million_tokens")}
    return rows


def instruct_headline(res: dict) -> dict:
    """The instruction headline of an ``eval instruct`` result: the share of constraints met (all kinds pooled), the
    share of answers meeting all their constraints, and rep-4."""
    cons = res.get("constraints") or {}
    n, met = sum(c["n"] for c in cons.values()), sum(c["met"] for c in cons.values())
    return {"constraints_met": round(met / n, 4) if n else None, "constraints_n": n,
            "all_constraints": res["all_constraints"]["rate"], "answers": res["all_constraints"]["n"],
            "rep4": res["repetition"]["rep4"], "mean_chars": res["repetition"]["mean_chars"],
            "per_constraint": {k: round(c["rate"], 4) for k, c in cons.items()}}


def sft_bases(name: str, shards: Path, work: Path, args, log: Path, commands: list[str]) -> tuple[Path, Path]:
    """The teacher and the plain student as the pretraining rows have them, or, with a longer --sft-seq-len (an
    instruction and its story do not fit in 128 tokens: generation would have no room left), both pretrained again
    at that context with the same steps and tokens per step."""
    if args.sft_seq_len == args.seq_len:
        return work / f"{name}-teacher{args.teacher_suffix}", work / f"{name}-plain"
    batch = max(1, args.batch * args.seq_len // args.sft_seq_len)
    common = ["--data", str(shards), "--seq-len", str(args.sft_seq_len), "--micro-batch-size", str(batch),
              "--seed", "0", "--eval-every", "0", "--eval-tokens", "4096", "--no-progress", "--no-tensorboard",
              "--device", args.device, "--log-every", "5", "--sample-tokens", "1"]
    out = []
    for role, preset, steps in (("teacher", args.teacher_preset, args.teacher_steps),
                                ("plain", args.student_preset, args.steps)):
        run = work / f"{name}-{role}{args.teacher_suffix if role == 'teacher' else ''}-ctx{args.sft_seq_len}"
        if not (run / "summary.json").is_file():
            xiaolm(["pretrain", *common, "--preset", preset, "--max-steps", str(steps), "--out", str(run)], log,
                   commands)
        out.append(run)
    return out[0], out[1]


def run_sft(name: str, shards: Path, work: Path, cache: Path, args, log: Path, commands: list[str]) -> list[dict]:
    """SFT rows: the pretraining teacher and the plain student each fine-tuned on the stories' instructions for the
    same steps; then the student again, taught online by the SFT teacher on the assistant tokens; all three scored
    by ``eval instruct`` on the held-out instructions (greedy)."""
    t_base, s_base = sft_bases(name, shards, work, args, log, commands)
    instruct = cache / f"stories-{args.stories}-instruct"
    if not (instruct / "heldout.jsonl").is_file():
        xiaolm(["data", "instruct", str(cache / "stories.jsonl"), "--out", str(instruct), "--heldout-fraction",
                "0.1", "--seed", "0"], log, commands)
    common = ["--data", str(instruct / "train.jsonl"), "--max-steps", str(args.sft_steps), "--micro-batch-size",
              str(max(1, args.batch * args.seq_len // args.sft_seq_len)), "--lr", str(args.sft_lr),
              "--warmup-steps", str(max(1, args.sft_steps // 10)),
              "--eval-every", "0", "--eval-conversations", "32", "--sample-prompts", "1", "--sample-tokens", "16",
              "--seed", "0", "--no-progress", "--no-tensorboard", "--device", args.device, "--log-every", "5"]
    distil = ["--distill-alpha", str(args.alpha), "--distill-temperature", str(args.temperature)]
    teacher = work / f"{t_base.name}-sft"
    runs = {"sft teacher": (t_base, teacher, []),
            "sft plain": (s_base, work / f"{s_base.name}-sft", []),
            "sft distilled": (s_base, work / f"{s_base.name}-sft-distilled{args.run_suffix}",
                              ["--teacher", str(teacher), *distil])}
    rows = []
    for variant, (base, out, flags) in runs.items():
        if not (out / "summary.json").is_file():
            xiaolm(["sft", str(base), *common, *flags, "--out", str(out)], log, commands)
        f = out / "eval-instruct.json"
        if not f.is_file():
            xiaolm(["eval", "instruct", str(out), "--data", str(instruct / "heldout.jsonl"), "--limit",
                    str(args.instruct_limit), "--max-new-tokens", str(args.instruct_tokens), "--batch-size", "32",
                    "--device", args.device, "--out", str(f)], log, commands)
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"corpus": name, "variant": variant, "base": str(base), "steps": summary.get("steps"),
                     "tokens": summary.get("tokens"), "wall_s": summary.get("wall_s"),
                     "val_loss": summary.get("val_loss"), "distill": summary.get("distill"),
                     **instruct_headline(json.loads(f.read_text()))})
        print(f"  {name}: {variant:<13} {rows[-1]['constraints_met']} met, all {rows[-1]['all_constraints']}, "
              f"rep-4 {rows[-1]['rep4']}", flush=True)
    return rows


def sft_table(rows: list[dict]) -> list[str]:
    lines = ["| corpus | variant | base model | SFT steps | wall s | held-out SFT loss | constraints met | "
             "all constraints met | rep-4 | mean chars |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['variant']} | {Path(r['base']).name} | {r['steps']} | "
                     f"{r['wall_s']:.1f} | {r['val_loss']:.4f} | {r['constraints_met']:.3f} ({r['constraints_n']}) | "
                     f"{r['all_constraints']:.3f} ({r['answers']}) | {r['rep4']:.3f} | {r['mean_chars']:.0f} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| corpus | variant | student tokens | cost s | val bpc | held-out bpc | tokens to plain's final (x) "
             "| bpc at plain's seconds | rep-4 | distinct-2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["final"]
        ratio = f"{r['tokens_to_plain_final']:,} ({r['token_ratio']}x)" if r["token_ratio"] is not None else "not reached"
        at = f"{r['bpc_at_plain_wall']:.4f}" if r["bpc_at_plain_wall"] is not None else "-"
        lines.append(f"| {r['corpus']} | {r['variant']} | {f['tokens']:,} | {f['cost_s']:.1f} | {f['val']:.4f} "
                     f"| {f.get('heldout', float('nan')):.4f} | {ratio} | {at} | "
                     f"{(r['rep4'] or 0):.3f} | {(r['distinct2'] or 0):.3f} |")
    return lines


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="stories,novels", help="stories, novels, or both (comma-separated)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--heldout", default="红楼梦", help="the novel held out (bench/heldout_by_work.py's folds)")
    ap.add_argument("--stories", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--teacher-preset", default="quickstart")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-preset", default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--points", type=int, default=5, help="checkpoints scored along each student run")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--variants", default="plain,online,offline")
    ap.add_argument("--run-suffix", default="", help="appended to the distilled runs' directories (a sweep in one "
                                                     "--work reuses its teacher, logits and plain student)")
    ap.add_argument("--teacher-suffix", default="", help="appended to the teacher's (and its logits') directory: "
                                                         "a second teacher in one --work")
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT rows (stories): the teacher and the plain student "
                                                              "fine-tuned this many steps, the student also distilled "
                                                              "from the SFT teacher (0: no SFT rows)")
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--sft-seq-len", type=int, default=512, help="context of the SFT rows' models (their bases are "
                                                                 "pretrained again at it when it is not --seq-len)")
    ap.add_argument("--instruct-limit", type=int, default=150, help="held-out instructions scored by eval instruct")
    ap.add_argument("--instruct-tokens", type=int, default=96, help="eval instruct's --max-new-tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="/tmp/xiaolm-distill-cache")
    ap.add_argument("--novels-cache", default="/tmp/xiaolm-heldout-cache", help="bench/heldout_by_work.py's cache")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cache, work = Path(args.cache), Path(args.work or f"/tmp/xiaolm-distill-{stamp}")
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log, commands = work / "xiaolm.log", []
    load_start, t0 = os.getloadavg(), time.perf_counter()
    print(f"distill_table: teacher {args.teacher_preset} x {args.teacher_steps} steps, student {args.student_preset} "
          f"x {args.steps} steps, alpha {args.alpha}, T {args.temperature}, top-{args.top_k}; load "
          f"{load_start[0]:.1f}, commit {commit_id()}; log {log}", flush=True)
    rows, sft_rows = [], []
    try:
        for name in [c.strip() for c in args.corpus.split(",") if c.strip()]:
            if name == "novels" and not (Path(args.shared) / "classic_novels").is_dir():
                print(f"  novels: skipped, {args.shared}/classic_novels not found", flush=True)
                continue
            shards, heldout = (stories_shards if name == "stories" else novels_shards)(cache, args, log, commands)
            rows += run_corpus(name, shards, heldout, work, args, log, commands)
            if name == "stories" and args.sft_steps:
                sft_rows += run_sft(name, shards, work, cache, args, log, commands)
    except BenchError as e:
        print(f"distill_table: {e}", file=sys.stderr)
        return 1
    load_end = os.getloadavg()
    lines = table(rows)
    if sft_rows:
        lines += ["", "SFT (stories' instructions; the distilled student taught online by the SFT teacher):", "",
                  *sft_table(sft_rows)]
    print("\n" + "\n".join(lines))
    total_s = round(time.perf_counter() - t0, 1)
    machine = {"nproc": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
               "load_avg_start": load_start, "load_avg_end": load_end, "device": args.device}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"distill-table-{stamp}{'-' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps({
        "date_utc": stamp, "commit": commit_id(), "machine": machine, "bench_wall_s": total_s, "argv": sys.argv[1:],
        "spec": vars(args), "rows": rows, "sft_rows": sft_rows, "commands": commands}, ensure_ascii=False, indent=1),
        encoding="utf-8")
    (out / f"{stem}.md").write_text("\n".join([
        f"# Distillation table, {stamp} UTC (commit {commit_id()}) - loaded machine", "",
        f"Command: `python bench/distill_table.py {' '.join(sys.argv[1:])}`. Teacher {args.teacher_preset} "
        f"({args.teacher_steps} steps), student {args.student_preset} ({args.steps} steps, batch {args.batch} x "
        f"{args.seq_len}), alpha {args.alpha}, T {args.temperature}, top-{args.top_k} offline.",
        f"Machine: {machine['nproc']} CPUs shared with other jobs (load average {load_start[0]:.1f} at start, "
        f"{load_end[0]:.1f} at end): seconds are indicative only; bench wall {total_s:.0f} s.", "",
        "cost s: the student's training seconds (online: the teacher's forward included) plus, offline, the logits' "
        "writing once. 'tokens to plain's final': student tokens a run needs to reach the plain student's final "
        "bits/char (held-out novel for novels, val for stories); goal <= 0.7x.", "",
        *lines, ""]), encoding="utf-8")
    print(f"wrote {(out / f'{stem}.json')} and .md ({total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
