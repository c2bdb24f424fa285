"""How REPORT.md writes a figure (the report, the agent and the distillation sections share it), and reading a
stage's JSON result that may not exist yet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_json(path: Path) -> Optional[dict]:
    """A stage's JSON result, or None while it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
