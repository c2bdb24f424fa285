"""The tools ``xiaolm chat`` runs: the built-in ones (``xiaolm.tasks.toolbox``) and a user's own Python functions
(``--tools FILE.py``), each with the OpenAI schema the model sees and run in the sandbox
(``xiaolm.tasks.sandbox.run_tool``: no files, network or processes; a time and size limit per call).

A user's function's schema is read from its signature and docstring: every public function defined in the file is a
tool; its name is the function name, its description the docstring's first paragraph, each parameter's type comes
from its annotation (``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``dict``, ``Literal[...]`` as an enum,
``Optional[X]`` as X), a parameter without a default is required, and a docstring line ``name: text`` (Google's
``Args:`` style, ``name (type): text`` too) describes a parameter.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Callable, Optional

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _type_schema(annotation, where: str) -> dict:
    """JSON schema of a Python annotation; raises ValueError naming ``where`` for one it cannot express."""
    if annotation is inspect.Parameter.empty:
        raise ValueError(f"{where}: add a type annotation (str, int, float, bool, list, dict or Literal[...])")
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _type_schema(rest[0], where)
        return {"anyOf": [_type_schema(a, where) for a in rest]}
    if origin is list:
        return {"type": "array", **({"items": _type_schema(args[0], where)} if args else {})}
    if origin is dict:
        return {"type": "object"}
    raise ValueError(f"{where}: cannot describe the type {annotation!r} in JSON schema")


def _param_docs(doc: str) -> dict[str, str]:
    """``name: text`` / ``name (type): text`` lines of a docstring."""
    found = {}
    for line in doc.splitlines():
        m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def function_schema(fn: Callable, where: str = "") -> dict:
    """The OpenAI tool schema of ``fn`` from its signature and docstring (see the module docstring)."""
    where = where or fn.__name__
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].strip()
    if not description:
        raise ValueError(f"{where}: add a docstring saying what the function does (the model reads it)")
    docs = _param_docs(doc)
    try:
        hints = typing.get_type_hints(fn)  # resolves annotations written as strings too
    except Exception as exc:  # a name the annotation uses is not defined where the function is
        raise ValueError(f"{where}: cannot read its type annotations: {exc}") from None
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"{where}: *args / **kwargs cannot be described to the model")
        schema = _type_schema(hints.get(name, param.annotation), f"{where}, parameter {name!r}")
        if name in docs:
            schema["description"] = docs[name]
        properties[name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "function", "function": {"name": fn.__name__, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def load_tool_file(path: str | Path) -> dict[str, tuple[Callable, dict]]:
    """``{name: (function, schema)}`` for the public functions defined in the Python file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"xiaolm_user_tools_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error there is theirs to see, in one line
        raise ValueError(f"{path}: cannot load it: {type(exc).__name__}: {exc}") from None
    tools = {}
    for name, fn in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            continue
        tools[name] = (fn, function_schema(fn, f"{path}: {name}"))
    if not tools:
        raise ValueError(f"{path}: defines no public function to offer as a tool")
    return tools


class ToolBox:
    """The tools of a chat: ``schemas`` (what the prompt offers) and ``run(name, arguments)`` (in the sandbox).
    Calls to a built-in tool are run even when the built-ins are not offered, since a model trained on them may call
    them anyway."""

    def __init__(self, builtin: bool = False, files: list[str] = ()):
        from xiaolm.tasks.toolbox import TOOLS

        self.builtin = dict(TOOLS)
        self.user: dict[str, tuple[Callable, dict]] = {}
        for file in files:
            self.user.update(load_tool_file(file))
        self.offered = ([schema for _fn, schema in self.builtin.values()] if builtin else []) \
            + [schema for _fn, schema in self.user.values()]

    @property
    def schemas(self) -> Optional[list[dict]]:
        return self.offered or None

    def run(self, name: str, arguments: str) -> str:
        from xiaolm.tasks.sandbox import run_tool

        try:
            args = json.loads(arguments)
        except json.JSONDecodeError:
            return "error: the arguments are not JSON"
        entry = self.user.get(name) or self.builtin.get(name)
        if entry is None:
            return f"error: no tool named {name} (there are: {', '.join([*self.user, *self.builtin])})"
        return run_tool(entry[0], args)
