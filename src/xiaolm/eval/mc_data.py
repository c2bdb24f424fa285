"""Where multiple-choice questions live on disk: the CSV files of a directory and the subject each file holds.

Shared by ``xiaolm.eval.mc`` (our scorer) and ``xiaolm.eval.lm_eval_tasks`` (the lm-evaluation-harness tasks
written over the same files), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path


def subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _csvs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
