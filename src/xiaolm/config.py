"""Typed configuration: dataclasses, YAML recipes, command-line overrides.

Every verb describes its options as a (possibly nested) dataclass. Values come from, in rising precedence:
the dataclass defaults, a YAML recipe given with ``--config``, and command-line flags. Every leaf field
``a.b`` is settable as ``--a.b VALUE``; a leaf whose name is unique in the tree is also settable by its short
form (``--max-steps`` for ``train.max_steps``), and ``opt(short="--seed")`` claims a short form where the name
clashes. ``--help`` lists one spelling per option (the short form, else ``--a.b-c``); the underscore and dotted
variants are accepted without being listed. A verb names the shared fields it ignores (``unused=``): they are
hidden and refused. Each run writes the fully resolved config beside its outputs, so a recipe can always be
replayed exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from xiaolm.errors import ConfigError  # noqa: F401 - raised here, and imported from here by callers


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, short: bool | str = True,
        required: str | None = None):
    """A dataclass field with a help string.

    The short flag (``--max-steps`` for ``train.max_steps``) exists while the leaf name is unique in a verb's tree;
    ``short=False`` hides it, and ``short="--seed"`` claims that flag explicitly, so that it also exists where the
    name clashes (``train.seed`` beside ``sampling.seed``). A flag claimed by two leaves of one tree goes to neither.
    ``required="--data is required"`` makes ``parse_config`` refuse a verb's top-level field left empty (None, ""
    or []) once the recipe and the flags are applied, with that message.
    """
    meta = {"help": help, "short": short}
    if required is not None:
        meta["required"] = required
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


def _flag(where: str) -> str:
    """``config.sampling.top_k`` -> ``--top-k``: how the option is spelled on the command line."""
    return "--" + where.rsplit(".", 1)[-1].split("[")[0].replace("_", "-")


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
                value = int(value)
            text = str(value).replace("_", "")
            if any(c in text for c in "eE."):  # 1e6 is a count; 1.5 is not, and is refused, not truncated
                number = float(text)
                if not number.is_integer():
                    raise ConfigError(f"{where}: expected an integer, got {value!r}")
                number = int(number)
            else:
                number = int(text)
            if not INT_RANGE[0] <= number <= INT_RANGE[1]:  # seeds, counts, sizes: nothing wider (torch's limit)
                raise ConfigError(f"{where} ({_flag(where)}): {value!r} is out of range (a 64-bit integer)")
            return number
        if inner is float:
            number = float(value)
            if not math.isfinite(number):  # no option means anything by NaN or infinity
                raise ConfigError(f"{where} ({_flag(where)}): expected a finite number, got {value!r}")
            return number
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


def _claimed_shorts(leaves) -> dict[str, str]:
    """Dotted name -> the short flag it claims with ``opt(short="--flag")``, where exactly one leaf claims it and no
    top-level field is spelt so."""
    claims: dict[str, list[str]] = {}
    for name, f, _tp in leaves:
        flag = f.metadata.get("short", True)
        if isinstance(flag, str):
            claims.setdefault(flag, []).append(name)
    top = {f"--{name.replace('_', '-')}" for name, _f, _tp in leaves if "." not in name}
    return {names[0]: flag for flag, names in claims.items() if len(names) == 1 and flag not in top}


def config_flags(cls) -> dict[str, list[str]]:
    """Dotted name -> every flag that sets it, the one ``--help`` shows first (the short form where there is one,
    else the dotted form with dashes). The others (underscore and dotted variants) are accepted silently."""
    leaves = list(_leaves(cls))
    short_counts: dict[str, int] = {}
    for name, _f, _tp in leaves:
        short = name.rsplit(".", 1)[-1]
        short_counts[short] = short_counts.get(short, 0) + 1
    claimed = _claimed_shorts(leaves)
    out: dict[str, list[str]] = {}
    for name, f, _tp in leaves:
        short = name.rsplit(".", 1)[-1]
        flags = []
        if "." in name:
            flags.append(f"--{name}")
            if "_" in name:
                flags.append(f"--{name.replace('_', '-')}")
        auto = f"--{short.replace('_', '-')}"
        if short_counts[short] == 1 and f.metadata.get("short", True) is not False and (
                auto not in claimed.values() or claimed.get(name) == auto):
            flags.append(auto)
            if "_" in short:
                flags.append(f"--{short}")
        elif "." not in name:
            flags.append(auto)
        if name in claimed:
            flags += [x for x in (claimed[name], "--" + claimed[name][2:].replace("-", "_")) if x not in flags]
        shown = claimed.get(name) or (auto if auto in flags else f"--{name.replace('_', '-')}")
        out[name] = [shown] + [x for x in flags if x != shown]
    return out


def add_config_args(parser: argparse.ArgumentParser, cls, positionals: dict[str, str] | None = None,
                    unused: typing.Collection[str] = ()) -> None:
    """Add ``--config`` and a flag for every leaf of ``cls``.

    ``positionals`` maps a dotted field to its metavar; those fields are taken as positional arguments. ``unused``
    fields (shared options this verb ignores) are left out of ``--help``; ``refuse_unused`` refuses them.
    """
    positionals = positionals or {}
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe; flags given here override it")
    leaves = list(_leaves(cls))
    all_flags = config_flags(cls)
    if set(unused) - set(all_flags):
        raise ValueError(f"unused= names no field of {cls.__name__}: {sorted(set(unused) - set(all_flags))}")
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
        # One spelling in --help; the others are the same option, accepted without being listed.
        shown, *aliases = all_flags[name]
        if name in unused:
            shown, aliases = None, [shown, *aliases]
        kwargs: dict[str, Any] = {"dest": name.replace(".", "__"), "default": argparse.SUPPRESS}
        default_text = "" if default in (None, "", []) else f" (default: {default})".replace("%", "%%")
        if get_origin(inner) is Literal:
            kwargs["choices"] = [str(c) for c in get_args(inner)]
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if get_origin(inner) in (list, tuple):
                kwargs["nargs"] = "+"
                kwargs["action"] = "extend"  # `--prompt a --prompt b` is both, as `--prompt a b` is
                if "choices" not in kwargs:
                    kwargs["metavar"] = name.rsplit(".", 1)[-1].upper()  # not the dest's PAIRS__SAMPLING__STOP
            metavar = {int: "N", float: "X", str: "S"}.get(inner, None)
            if metavar and "choices" not in kwargs and "metavar" not in kwargs:
                kwargs["metavar"] = metavar
        if shown is not None:
            group.add_argument(shown, help=help_text + default_text, **kwargs)
        if aliases:
            group.add_argument(*aliases, help=argparse.SUPPRESS, **kwargs)


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


def _default_at(cls, dotted: str):
    """The default of a dotted leaf, as the sections' own defaults set it."""
    tp, value = cls, dataclasses.MISSING
    for part in dotted.split("."):
        f = {f.name: f for f in dataclasses.fields(tp)}[part]
        value = _default_of(f) if value is dataclasses.MISSING else getattr(value, part)
        tp = _unwrap_optional(_field_types(tp)[part])[0]
    return value


def refuse_unused(cls, cfg, args: argparse.Namespace, unused: typing.Collection[str], prog: str) -> None:
    """A shared option this verb ignores, set on the command line or to a non-default value in a recipe, is an
    error: silently ignoring it would let a user believe it took effect."""
    for name in unused:
        flag = f"--{name.replace('_', '-')}"
        if hasattr(args, name.replace(".", "__")):
            raise ConfigError(f"{flag} is not used by {prog}")
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value != _default_at(cls, name):
            raise ConfigError(f"{getattr(args, 'config', None)}: {name} is not used by {prog} (remove it)")


def config_description(cls) -> str | None:
    """The docstring written on ``cls`` (indentation removed), or None where it has none: a dataclass without one
    gets a generated ``Cls(field=...)`` signature as its ``__doc__``, which is no description."""
    import inspect

    doc = cls.__dict__.get("__doc__")
    if not doc or (doc.startswith(f"{cls.__name__}(") and doc.endswith(")")):
        return None
    return inspect.cleandoc(doc)


def refuse_missing(cls, cfg) -> None:
    """Raise the ``opt(required=...)`` message of the first top-level field of ``cls`` left empty in ``cfg``. Only
    the verb's own fields count: a config nested as a section (``pipeline``'s ``prepare``) is filled by its owner."""
    for f in dataclasses.fields(cls):
        message = f.metadata.get("required")
        if message is not None and not getattr(cfg, f.name):
            raise ConfigError(message)


_PARSERS: dict = {}
INT_RANGE = (-(2 ** 63), 2 ** 64 - 1)


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is a ConfigError like any other: one ``xiaolm: error:`` line through the CLI (not
    argparse's usage block and exit), naming the verb and pointing at its --help."""

    def error(self, message: str):
        verb = self.prog[len("xiaolm "):] if self.prog.startswith("xiaolm ") else self.prog
        raise ConfigError(f"{verb}: {message} (see {self.prog} --help)")


def parse_config(cls, argv: list[str] | None, prog: str, description: str | None = None,
                 positionals: dict[str, str] | None = None, epilog: str | None = None,
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
                 unused: typing.Collection[str] = ()):
    """Build the parser for one verb, parse ``argv`` and resolve the config.

    Returns ``(config, namespace)``; ``extra`` may add flags that are not part of the config. ``unused`` names the
    shared fields this verb ignores: hidden from ``--help`` and refused when set (one line, through the CLI).
    ``description`` defaults to the config class's own docstring, so a config documents its verb; fields declared
    with ``opt(required=...)`` are refused when still empty once the recipe and the flags are applied.
    """
    key = (cls, prog, description, epilog, tuple((positionals or {}).items()), extra, tuple(unused))
    parser = _PARSERS.get(key)
    if parser is None:  # built once per verb and process: a parser is not changed by parsing
        parser = _Parser(prog=prog, description=config_description(cls) if description is None else description,
                         epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(parser, cls, positionals, unused)
        if extra is not None:
            extra(parser)
        _PARSERS[key] = parser
    args = parser.parse_args(argv)
    cfg = resolve_config(cls, args)  # a ConfigError names the field; the CLI prints it as one line
    refuse_unused(cls, cfg, args, unused, prog)
    refuse_missing(cls, cfg)
    return cfg, args
