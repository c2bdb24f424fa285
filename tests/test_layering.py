"""The package's layering, checked from source (``ast``; nothing is imported).

Lowest first: utils, config, errors, rundir -> tokenizer -> model -> data -> tasks -> infer -> export -> eval -> train ->
align -> serve -> pipeline, quickstart, cli. A module imports only from its own layer or below -- lazy imports inside
functions count too, since they are the same dependency taken later -- and no group of modules imports itself round
(there, an annotation-only import under ``if TYPE_CHECKING:`` does not count: it never runs).
docs/DESIGN.md draws the same map.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xiaolm"

LAYERS = [
    {"xiaolm", "utils", "config", "errors", "rundir"},
    {"tokenizer"},
    {"model"},
    {"data"},
    {"tasks"},
    {"infer"},
    {"export"},
    {"eval"},
    {"train"},
    {"align"},
    {"serve"},
    {"pipeline", "quickstart", "cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: names for annotations, never imported at run time."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _imports(path: Path, module: str, runtime_only: bool = False) -> set[str]:
    """Every ``xiaolm...`` name a file imports, at module level or inside functions (``runtime_only``: leaving out
    the imports under ``if TYPE_CHECKING:``)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _type_checking_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "xiaolm" or source.startswith("xiaolm."):
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "xiaolm" or a.name.startswith("xiaolm."))
    return found


def import_graph(runtime_only: bool = False) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str:
        # `from xiaolm.data import synth` names a module; `from xiaolm.utils import log` names a module's attribute
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for module, path in files.items():
        targets = {owner(n) for n in _imports(path, module, runtime_only)}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    if top not in RANK:
        raise AssertionError(f"{module}: its top-level name {top!r} is in no layer; add it to LAYERS and DESIGN.md")
    return RANK[top]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_module_imports_from_a_higher_layer():
    problems = upward_imports(import_graph())
    assert not problems, "upward imports:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    # An annotation-only import (under TYPE_CHECKING) may point back within a layer; a higher layer it may not.
    found = cycles(import_graph(runtime_only=True))
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(g) for g in found)


def test_the_checker_sees_an_upward_import_and_a_cycle():
    # The checker itself must be able to fail: a model module reaching into train, and two modules importing each other.
    graph = {"xiaolm.model.a": {"xiaolm.train.b"}, "xiaolm.train.b": {"xiaolm.model.a"}, "xiaolm.utils": set()}
    assert upward_imports(graph) == ["xiaolm.model.a (layer 2) imports xiaolm.train.b (layer 8)"]
    assert cycles(graph) == [["xiaolm.model.a", "xiaolm.train.b"]]


def test_lazy_imports_inside_functions_are_seen(tmp_path):
    src = tmp_path / "xiaolm" / "model" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from xiaolm.train.checkpoint import load_model\n    from ..align import dpo\n")
    assert _imports(src, "xiaolm.model.x") == {
        "xiaolm.train.checkpoint", "xiaolm.train.checkpoint.load_model", "xiaolm.align", "xiaolm.align.dpo",
    }


def test_type_checking_imports_count_as_upward_but_not_as_a_cycle(tmp_path):
    src = tmp_path / "xiaolm" / "data" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xiaolm.data.y import Y\n")
    assert _imports(src, "xiaolm.data.x") == {"xiaolm.data.y", "xiaolm.data.y.Y"}
    assert _imports(src, "xiaolm.data.x", runtime_only=True) == set()


@pytest.mark.parametrize("module", ["xiaolm.utils", "xiaolm.model.llama", "xiaolm.cli"])
def test_every_top_level_name_has_a_layer(module):
    assert isinstance(layer_of(module), int)
