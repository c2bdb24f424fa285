"""Typed configuration: dataclasses, YAML recipes, command-line overrides.

Every verb describes its options as a (possibly nested) dataclass. Values come from, in rising precedence:
the dataclass defaults, a YAML recipe given with ``--config``, and command-line flags. Every leaf field
``a.b`` is settable as ``--a.b VALUE``; a leaf whose name is unique in the tree is also settable by its short
form (``--max-steps`` for ``train.max_steps``). Each run writes the fully resolved config beside its outputs,
so a recipe can always be replayed exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


from xiaolm.errors import ConfigError  # noqa: F401 - raised here, and imported from here by callers


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, short: bool = True):
    """A dataclass field with a help string. ``short=False`` hides the short flag form."""
    meta = {"help": help, "short": short}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------- typing


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(value: Any, tp, where: str):
    """Coerce a YAML or command-line value to the annotated type, with an error that names the field."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or inner is Any:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = get_origin(inner)
    try:
        if inner is Any:
            return value
        if origin is Literal:
            choices = get_args(inner)
            if value not in choices:
                str_choices = {str(c): c for c in choices}
                if str(value) in str_choices:
                    return str_choices[str(value)]
                raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
            return value
        if origin in (list, tuple):
            (item_tp,) = get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                items: list = [v for v in value.split(",") if v != ""] if item_tp is not str else [value]
            elif isinstance(value, (list, tuple)):
                items = []
                for v in value:
                    if isinstance(v, str) and item_tp in (int, float):
                        items.extend(x for x in v.split(",") if x != "")
                    else:
                        items.append(v)
            else:
                items = [value]
            return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        if inner is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if inner is int:
            if isinstance(value, bool):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"{where}: expected an integer, got {value!r}")
                return int(value)
            text = str(value).replace("_", "")
            return int(float(text)) if any(c in text for c in "eE.") else int(text)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if _is_dataclass_type(inner):
            return config_from_dict(inner, value, where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(inner, '__name__', inner)}: {exc}") from None
    return value


# ---------------------------------------------------------------------------------------------- dict <-> obj


def config_from_dict(cls, data: dict | None, where: str = "config"):
    """Build ``cls`` from a mapping, rejecting unknown keys with their full dotted name."""
    data = dict(data or {})
    hints = _field_types(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k.replace("-", "_") not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    for f in dataclasses.fields(cls):
        key = f.name if f.name in data else f.name.replace("_", "-")
        if key not in data:
            continue
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        if _is_dataclass_type(inner) and isinstance(data[key], dict):
            # A section's own default (e.g. greedy sampling for an eval) is the base the given keys overlay.
            default = _default_of(f)
            base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[f.name] = config_from_dict(inner, _overlay(base, data[key]), f"{where}.{f.name}")
        elif data[key] is None and _default_of(f) is None:
            kwargs[f.name] = None  # an unset field left at its own None default (e.g. from a section overlay)
        else:
            kwargs[f.name] = _convert(data[key], tp, f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _overlay(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        k2 = k.replace("-", "_")
        out[k2] = _overlay(out[k2], v) if isinstance(v, dict) and isinstance(out.get(k2), dict) else v
    return out


def config_to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def save_config(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(_plain(config_to_dict(obj)), allow_unicode=True, sort_keys=False)
    from xiaolm.utils import atomic_write_text

    atomic_write_text(path, text)
    return path


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------ command line


def _leaves(cls, prefix: str = ""):
    """Yield (dotted_name, field, type) for every non-dataclass leaf of the tree."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(inner):
            yield from _leaves(inner, name + ".")
        else:
            yield name, f, tp


def _default_of(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_config_args(parser: argparse.ArgumentParser, cls, positionals: dict[str, str] | None = None) -> None:
    """Add ``--config`` and a flag for every leaf of ``cls``.

    ``positionals`` maps a dotted field to its metavar; those fields are taken as positional arguments.
    """
    positionals = positionals or {}
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe; flags given here override it")
    leaves = list(_leaves(cls))
    short_counts: dict[str, int] = {}
    for name, _f, _tp in leaves:
        short = name.rsplit(".", 1)[-1]
        short_counts[short] = short_counts.get(short, 0) + 1
    group = parser.add_argument_group("options (also settable in a --config recipe)")
    for name, f, tp in leaves:
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        default = _default_of(f)
        inner, optional = _unwrap_optional(tp)
        if name in positionals:
            nargs = "+" if get_origin(inner) in (list, tuple) else ("?" if optional else None)
            parser.add_argument(
                name.replace(".", "__"), metavar=positionals[name], nargs=nargs, default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        short = name.rsplit(".", 1)[-1]
        flags = []
        if "." in name:
            flags.append(f"--{name}")
            if "_" in name:
                flags.append(f"--{name.replace('_', '-')}")
        if short_counts[short] == 1 and f.metadata.get("short", True):
            flags.append(f"--{short.replace('_', '-')}")
            if "_" in short:
                flags.append(f"--{short}")
        elif "." not in name:
            flags.append(f"--{name.replace('_', '-')}")
        kwargs: dict[str, Any] = {"dest": name.replace(".", "__"), "default": argparse.SUPPRESS}
        shown = "" if default in (None, "", []) else f" (default: {default})".replace("%", "%%")
        if get_origin(inner) is Literal:
            kwargs["choices"] = [str(c) for c in get_args(inner)]
        if inner is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text + shown, **kwargs)
            continue
        if get_origin(inner) in (list, tuple):
            kwargs["nargs"] = "+"
        metavar = {int: "N", float: "X", str: "S"}.get(inner, None)
        if metavar and "choices" not in kwargs:
            kwargs["metavar"] = metavar
        group.add_argument(*flags, help=help_text + shown, **kwargs)


def resolve_config(cls, args: argparse.Namespace):
    """Defaults < --config recipe < flags. Returns an instance of ``cls``."""
    data: dict = {}
    recipe = getattr(args, "config", None)
    if recipe:
        data = load_yaml(recipe)
        # Recipes may wrap a verb's options in a top-level key naming the class (ignored if absent).
    for name, _f, _tp in _leaves(cls):
        dest = name.replace(".", "__")
        if hasattr(args, dest):
            node = data
            parts = name.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{recipe}: {part} must be a mapping")
            node[parts[-1]] = getattr(args, dest)
    return config_from_dict(cls, data, where=str(recipe) if recipe else "config")


def parse_config(cls, argv: list[str] | None, prog: str, description: str,
                 positionals: dict[str, str] | None = None, epilog: str | None = None,
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None):
    """Build the parser for one verb, parse ``argv`` and resolve the config.

    Returns ``(config, namespace)``; ``extra`` may add flags that are not part of the config.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, cls, positionals)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(cls, args)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, args
