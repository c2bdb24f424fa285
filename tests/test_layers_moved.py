"""Issue 13: helpers that lived in the wrong stage were moved, so these modules no longer import a stage above their
own (function-level lazy imports count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xiaolm"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xiaolm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("xiaolm"))
    return found


@pytest.mark.parametrize("module, forbidden", [
    ("data/pairs.py", ("xiaolm.align", "xiaolm.infer")),  # on-policy sampling is align/onpolicy.py's
    ("eval/ppl.py", ("xiaolm.train.pretrain",)),  # StreamEvaluator is eval/loss.py's
    ("eval/loss.py", ("xiaolm.train",)),
    ("tasks/instruct.py", ("xiaolm.eval", "xiaolm.infer", "xiaolm.train", "xiaolm.align")),
    ("tasks/constraints.py", ("xiaolm.eval", "xiaolm.infer", "xiaolm.train", "xiaolm.align")),
    ("align/grpo.py", ("xiaolm.align.dpo",)),  # instruct_metrics is eval/instruct.py's
])
def test_moved_helpers_leave_no_upward_import(module, forbidden):
    bad = sorted(m for m in imported_modules(SRC / module) if m.startswith(forbidden))
    assert bad == []


def test_the_data_layer_holds_no_stage_above_it():
    bad = {p.name: sorted(m for m in imported_modules(p) if m.split(".")[1] in
                          ("tasks", "infer", "export", "eval", "align", "serve", "pipeline"))
           for p in sorted((SRC / "data").glob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}
