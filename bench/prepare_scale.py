"""``xiaolm data prepare`` at growing corpus sizes: peak resident memory and documents/s, fitted and extrapolated.

Input: built-in stories (``xiaolm data synth``), generated once into ``--corpus-dir`` as files of
``--per-file`` stories each, one seed per file (``synth`` currently dies past ~73k-107k stories for some
seeds, so no file asks for more than that, and a seed that fails is skipped and named). N documents are the first N / per-file files, passed to
``xiaolm data prepare --field story_zh`` in a subprocess with the default settings (automatic worker
processes). Peak memory is the PSS of the whole process tree (main process + workers; shared pages counted once),
polled from /proc every 0.1 s, with the largest single process's RSS beside it.

Baseline, measured in the same run: the same command on the code of ``--baseline-rev`` (default: the commit
before the numpy dedup index and the streaming report), extracted with ``git archive`` into a temporary
directory, at the smaller sizes only (it needs about 6 KB a document).

The fit is least squares memory = a + b * N over this code's runs, and documents/s is the total over all of them;
the 4M row is the extrapolation (TinyStoriesChinese has 3.95M stories). ``--datatrove-sizes`` also runs
``--engine datatrove --tasks T`` (its output is the same; the table shows its documents/s and memory).

Usage: python bench/prepare_scale.py [--sizes 60000 120000 240000 480000 1020000] [--baseline-sizes 60000 120000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_corpus(corpus_dir: Path, files: int, per_file: int) -> list[Path]:
    """``files`` files of ``per_file`` stories, one seed each from seed 10 up; a seed for which synth fails is
    reported and skipped."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    paths, seed = [], 10
    while len(paths) < files:
        path = corpus_dir / f"stories-seed{seed}.jsonl"
        failed = corpus_dir / f"stories-seed{seed}.failed"
        if not path.is_file() and not failed.is_file():
            print(f"generating {path} ({per_file:,} stories, seed {seed}) ...", flush=True)
            proc = subprocess.run([sys.executable, "-m", "xiaolm.cli", "data", "synth", "--num", str(per_file),
                                   "--seed", str(seed), "--out", str(path)], env=_env(REPO / "src"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                failed.write_text(proc.stderr[-2000:])
        if failed.is_file():
            print(f"seed {seed}: synth failed ({failed.read_text().strip().splitlines()[-1][:150]}); skipped")
        else:
            paths.append(path)
        seed += 1
    return paths


def _env(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS of ``pid`` and all its descendants, largest RSS among them) in bytes. PSS shares each page among the
    processes mapping it, so forked workers' copy-on-write pages are not counted twice as a sum of RSS would."""
    pss, largest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        largest = max(largest, int(line.split()[1]) * 1024)
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pss, largest


def run_prepare(src: Path, inputs: list[Path], out: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "xiaolm.cli", "data", "prepare", *map(str, inputs), "--field", "story_zh",
           "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = largest = 0
    while proc.poll() is None:
        pss, rss = _tree_memory(proc.pid)
        peak, largest = max(peak, pss), max(largest, rss)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err[-2000:]}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"docs": report["documents_in"], "kept": report["documents_kept"], "wall": wall, "peak": peak,
            "largest": largest, "workers": report["workers"]}


def fit(rows: list[dict]) -> tuple[float, float]:
    n = [r["docs"] for r in rows]
    y = [r["peak"] for r in rows]
    if len(rows) == 1:
        return y[0], 0.0
    mean_n, mean_y = sum(n) / len(n), sum(y) / len(y)
    b = sum((a - mean_n) * (c - mean_y) for a, c in zip(n, y)) / sum((a - mean_n) ** 2 for a in n)
    return mean_y - b * mean_n, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 120_000, 240_000, 480_000])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[60_000, 120_000])
    parser.add_argument("--datatrove-sizes", type=int, nargs="*", default=[240_000],
                        help="sizes also run with --engine datatrove --tasks (needs the datatrove extra)")
    parser.add_argument("--tasks", type=int, default=2, help="datatrove tasks (one per core here)")
    parser.add_argument("--per-file", type=int, default=60_000, help="stories per generated file (one seed each)")
    parser.add_argument("--corpus-dir", default=str(Path(tempfile.gettempdir()) / "xiaolm-prepare-scale"))
    parser.add_argument("--baseline-rev", default="4c6a44a", help="git revision measured as the baseline")
    parser.add_argument("--work-dir", default=None, help="where outputs go (default: a temporary directory)")
    args = parser.parse_args()

    sizes = sorted(set(args.sizes) | set(args.baseline_sizes) | set(args.datatrove_sizes))
    for n in sizes:
        if n % args.per_file:
            raise SystemExit(f"--sizes must be multiples of --per-file {args.per_file}, got {n}")
    paths = ensure_corpus(Path(args.corpus_dir), max(sizes) // args.per_file, args.per_file)

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        baseline_src = None
        if args.baseline_sizes:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "src"], check=True,
                                     capture_output=True).stdout
            with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
                tar.extractall(tmp / "baseline", filter="data")
            baseline_src = tmp / "baseline" / "src"
        rows = []
        for n in sizes:
            files = paths[: n // args.per_file]
            runs = [("this code", REPO / "src", [])] if n in args.sizes else []
            if n in args.baseline_sizes:
                runs.append((f"baseline {args.baseline_rev}", baseline_src, []))
            if n in args.datatrove_sizes:
                runs.append((f"datatrove {args.tasks} tasks", REPO / "src",
                             ["--engine", "datatrove", "--tasks", str(args.tasks)]))
            for label, src, extra in runs:
                out = tmp / f"out-{n}"
                row = run_prepare(src, files, out, extra)
                row["code"] = label
                rows.append(row)
                print(f"{label:<18} {n:>9,} docs  {row['wall']:7.1f} s  {row['peak'] / 2**20:8,.0f} MB PSS", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)

    print()
    print(f"{'code':<18}  {'documents':>10}  {'kept':>10}  {'workers':>7}  {'seconds':>8}  {'documents/s':>11}  "
          f"{'peak MB (PSS, all processes)':>28}  {'largest process RSS MB':>22}")
    print(f"{'-' * 18}  {'-' * 10}  {'-' * 10}  {'-' * 7}  {'-' * 8}  {'-' * 11}  {'-' * 28}  {'-' * 22}")
    for r in rows:
        print(f"{r['code']:<18}  {r['docs']:>10,}  {r['kept']:>10,}  {r['workers']:>7}  {r['wall']:>8.1f}  "
              f"{r['docs'] / r['wall']:>11,.0f}  {r['peak'] / 2**20:>28,.0f}  {r['largest'] / 2**20:>22,.0f}")
    print()
    for label in dict.fromkeys(r["code"] for r in rows):
        mine = [r for r in rows if r["code"] == label]
        if len(mine) < 2:
            continue
        a, b = fit(mine)
        rate = sum(r["docs"] for r in mine) / sum(r["wall"] for r in mine)
        four_m = 4_000_000
        print(f"{label}: memory = {a / 2**20:,.0f} MB + {b:,.0f} bytes x documents; {rate:,.0f} documents/s "
              f"-> 1M documents: {(a + b * 1e6) / 2**30:.2f} GB; 4M documents: {(a + b * four_m) / 2**30:.2f} GB, "
              f"{four_m / rate / 60:,.0f} min")


if __name__ == "__main__":
    main()
