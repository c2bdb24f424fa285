"""Stage fingerprints and state files: what lets a rerun skip, resume or redo each stage.

A stage's fingerprint hashes its resolved options (less the ones that change nothing in its output: progress bars,
quiet, resume), the fingerprints of the stages it reads, and a signature of each external input it reads (path,
size and modification time of every file; the name of an ``hf:`` dataset). It is known before anything runs, so the
plan of a dry run is the plan of the real run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

from xiaolm.utils import atomic_write_json

# Options that never change a stage's output.
VOLATILE = {"progress", "quiet", "resume", "stop_at_step", "tensorboard", "workers", "log_every", "log_level"}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def input_signature(path: str) -> Any:
    """What an external input looks like now: every file's (relative path, size, mtime), or the hf: name."""
    if str(path).startswith("hf:"):
        return str(path)
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p), st.st_size, int(st.st_mtime)]
    if p.is_dir():
        rows = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                q = Path(root) / name
                st = q.stat()
                rows.append([str(q.relative_to(p)), st.st_size, int(st.st_mtime)])
        return [str(p), rows]
    import glob

    matches = sorted(glob.glob(str(path)))
    if matches:
        return [input_signature(m) for m in matches]
    return [str(p), "missing"]


def fingerprint(stage: str, options: Any, upstream: dict[str, str], inputs: list[str]) -> str:
    body = {"stage": stage, "options": _plain(options), "upstream": dict(sorted(upstream.items())),
            "inputs": [input_signature(i) for i in inputs]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


class StageState:
    """``WORKDIR/state/STAGE.json``: the fingerprint it last ran with, and whether it finished."""

    def __init__(self, workdir: Path, stage: str):
        self.path = Path(workdir) / "state" / f"{stage}.json"

    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def started(self, fp: str, command: str) -> None:
        old = self.read() or {}
        attempts = old.get("attempts", 0) + 1 if old.get("fingerprint") == fp else 1
        atomic_write_json(self.path, {"fingerprint": fp, "status": "running", "started": time.time(),
                                      "attempts": attempts, "command": command})

    def finished(self, fp: str, record: dict) -> None:
        old = self.read() or {}
        atomic_write_json(self.path, {**old, **record, "fingerprint": fp, "status": "done", "finished": time.time()})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def peak_memory() -> dict:
    """The process's peak memory so far (and CUDA's since the last call), for a stage's state file."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001 - memory figures are informative only
        pass
    return out


def compact(result: Any) -> Any:
    """A stage's result without the bulky parts (every generation, every problem), for its state file."""
    if isinstance(result, dict):
        return {k: compact(v) for k, v in result.items() if k not in ("generations", "problems", "letter_tokens")}
    if isinstance(result, list) and len(result) > 50:
        return result[:50]
    return result
