"""What the CLI-driven benchmarks share (heldout_by_work.py, shape_sweep.py; speedrun.py for the commit id): running
``python -m xiaolm`` from this checkout with its output in a log, and naming the commit a result was measured at."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """An expected failure, reported in one line."""


def xiaolm(args: list[str], log: Path, commands: list[str]) -> float:
    """Run ``python -m xiaolm ARGS`` with its output in ``log``; return its wall seconds."""
    cmd = [sys.executable, "-m", "xiaolm", *args]
    commands.append(" ".join(cmd[1:]))
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                        os.environ.get("PYTHONPATH")]))}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise BenchError(f"xiaolm {args[0]} {args[1] if len(args) > 1 else ''} exited {rc}: {tail[0]} (log: {log})")
    return time.perf_counter() - t0


def commit_id() -> str:
    """The checkout's short commit, ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"
