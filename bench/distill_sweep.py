"""Distillation sweep: alpha / temperature / top-k (and a stronger teacher) at one pretraining budget, each point
read as the student tokens it needs to reach the plain student's final bits/char (bench/distill_table.py's
'tokens to plain's final'; goal <= 0.7x).

One --work holds the corpus's teacher(s), their logits and the plain student; every point adds one distilled
student (online: --teacher each step; offline: --teacher-logits at its top-k). Points are "MODE:ALPHA:T[:K[:TEACHER]]"
with TEACHER "PRESET@STEPS" (default: the table's --teacher-preset/--teacher-steps).

    nice -n 10 python bench/distill_sweep.py --work /tmp/xiaolm-distill-sweep --stories 1500 --vocab 2048 \\
        --teacher-preset 9m --teacher-steps 250 --steps 150 --eval-tokens 8192 \\
        --points online:0.2:1 online:0:1 online:0.5:2 offline:0.5:1:32 online:0.5:1:8:quickstart@500
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import distill_table as dt  # noqa: E402 (bench/ is on sys.path when run as a script)
from cli_runs import BenchError, commit_id  # noqa: E402


def parse_point(text: str, args) -> dict:
    parts = text.split(":")
    if len(parts) < 3 or parts[0] not in ("online", "offline"):
        raise SystemExit(f"distill_sweep: point {text!r}: expected MODE:ALPHA:T[:K[:PRESET@STEPS]]")
    k = int(parts[3]) if len(parts) > 3 and parts[3] else args.top_k
    preset, steps = (parts[4].split("@") if len(parts) > 4 else (args.teacher_preset, args.teacher_steps))
    return {"mode": parts[0], "alpha": float(parts[1]), "temperature": float(parts[2]), "top_k": k,
            "teacher_preset": preset, "teacher_steps": int(steps)}


def main(argv=None) -> int:
    ap = dt.parser()
    ap.add_argument("--sweep", nargs="+", required=True, help="points MODE:ALPHA:T[:K[:PRESET@STEPS]]")
    args = ap.parse_args(argv)
    if not args.work:
        raise SystemExit("distill_sweep: --work is required (the teacher and the plain student are shared there)")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cache, work = Path(args.cache), Path(args.work)
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log, commands = work / "xiaolm.log", []
    load_start, t0 = os.getloadavg(), time.perf_counter()
    shards, heldout = dt.stories_shards(cache, args, log, commands)
    rows, plain = [], None
    for text in args.sweep:
        p = parse_point(text, args)
        a = copy.copy(args)
        a.alpha, a.temperature, a.top_k, a.variants = p["alpha"], p["temperature"], p["top_k"], p["mode"]
        a.teacher_preset, a.teacher_steps = p["teacher_preset"], p["teacher_steps"]
        default_teacher = (p["teacher_preset"], p["teacher_steps"]) == (args.teacher_preset, args.teacher_steps)
        a.teacher_suffix = "" if default_teacher else f"-{p['teacher_preset']}-{p['teacher_steps']}"
        a.run_suffix = f"_a{p['alpha']:g}_T{p['temperature']:g}" + (f"_k{p['top_k']}" if p["mode"] == "offline"
                                                                    else "") + a.teacher_suffix
        try:
            got = dt.run_corpus("stories", shards, heldout, work, a, log, commands)
        except BenchError as e:
            print(f"distill_sweep: {text}: {e}", file=sys.stderr)
            return 1
        plain = got[0]
        rows.append({**p, **{k: got[1][k] for k in ("final", "token_ratio", "tokens_to_plain_final",
                                                     "bpc_at_plain_wall", "rep4", "distinct2", "teacher")}})
        print(f"  {text}: {rows[-1]['final']['val']} bpc, ratio {rows[-1]['token_ratio']}", flush=True)
    lines = [f"| mode | teacher (val bpc) | alpha | T | top-k | val bpc | tokens to plain's final (x) | "
             f"bpc at plain's seconds |", "|---|---|---|---|---|---|---|---|",
             f"| plain | - | 1 | - | - | {plain['final']['val']:.4f} | 1.0x | {plain['final']['val']:.4f} |"]
    for r in rows:
        t = r["teacher"]
        lines.append(f"| {r['mode']} | {t['preset']} x {t['steps']} ({t['val']:.4f}) | {r['alpha']:g} | "
                     f"{r['temperature']:g} | {r['top_k'] if r['mode'] == 'offline' else 'all'} | "
                     f"{r['final']['val']:.4f} | {r['token_ratio'] or 'not reached'} | "
                     f"{r['bpc_at_plain_wall'] if r['bpc_at_plain_wall'] is not None else '-'} |")
    print("\n" + "\n".join(lines))
    load_end, total_s = os.getloadavg(), round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"distill-sweep-{stamp}{'-' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps({
        "date_utc": stamp, "commit": commit_id(), "load_avg_start": load_start, "load_avg_end": load_end,
        "nproc": len(os.sched_getaffinity(0)), "bench_wall_s": total_s, "argv": sys.argv[1:], "plain": plain,
        "rows": rows, "commands": commands}, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / f"{stem}.md").write_text("\n".join([
        f"# Distillation sweep, {stamp} UTC (commit {commit_id()}) - loaded machine", "",
        f"Command: `python bench/distill_sweep.py {' '.join(sys.argv[1:])}`. Stories ({args.stories} synthetic, "
        f"vocab {args.vocab}), student {args.student_preset} x {args.steps} steps (batch {args.batch} x "
        f"{args.seq_len}), val bits/char on {args.eval_tokens} tokens.",
        f"Machine: {len(os.sched_getaffinity(0))} CPUs shared with other jobs (load average {load_start[0]:.1f} at "
        f"start, {load_end[0]:.1f} at end): seconds are indicative only; sweep wall {total_s:.0f} s.", "",
        "'tokens to plain's final': student tokens a distilled run needs to reach the plain student's final val "
        f"bits/char (linear between {args.points} checkpoints; goal <= 0.7x). 'bpc at plain's seconds': the "
        "distilled run's bits/char at the plain run's training seconds (online: teacher forward included; offline: "
        "logits' writing added once; '-': it had not got there).", "", *lines, ""]), encoding="utf-8")
    print(f"wrote {out / stem}.json and .md ({total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
