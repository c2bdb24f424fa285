"""Turning what a user typed (files, directories, globs, ``hf:NAME``) into a checked list of ``InputFile``."""
from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterable

from xiaolm.data.readers.base import _STREAM_ERRORS, FORMATS, HF_PREFIX, InputError, InputFile


def _format_of(path: str) -> tuple[str | None, bool]:
    """('jsonl', True) for ``x.jsonl.gz``; (None, ...) for an unknown extension."""
    name = path.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    ext = os.path.splitext(name)[1].lstrip(".")
    return (ext if ext in FORMATS else None), compressed


def _check_readable(path: str, fmt: str, compressed: bool) -> None:
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {path}")
    if not p.is_file():
        raise InputError(f"input is not a regular file: {path}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from None
    if compressed:
        if head[:2] != b"\x1f\x8b":
            raise InputError(f"{path}: named .gz but is not gzip data")
        try:
            with gzip.open(p, "rb") as fh:
                fh.read(1)
        except _STREAM_ERRORS as exc:
            raise InputError(f"{path}: unreadable gzip data: {exc}") from None
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            pq.ParquetFile(p)
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install 'xiaolm[data]')") from None
        except Exception as exc:  # pyarrow raises its own error types for a damaged footer
            raise InputError(f"{path}: not a readable parquet file: {exc}") from None
    elif fmt == "arrow":
        try:
            _arrow_reader(p).schema
        except ImportError:
            raise InputError(f"{path}: reading Arrow files needs pyarrow (pip install 'xiaolm[data]')") from None
        except Exception as exc:
            raise InputError(f"{path}: not a readable Arrow file: {exc}") from None


def _arrow_reader(source):
    """An Arrow IPC reader over a path or bytes: the stream format (what ``datasets`` writes), else the
    random-access file format."""
    import pyarrow as pa

    def buffer():
        return pa.py_buffer(source) if isinstance(source, bytes) else pa.memory_map(str(source))

    try:
        return pa.ipc.open_stream(buffer())
    except pa.ArrowInvalid:
        return pa.ipc.open_file(buffer())


def _arrow_batches(reader):
    if hasattr(reader, "num_record_batches"):  # file format
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of them)."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def saved_dataset_files(path: str | os.PathLike, split: str = "train") -> list[str]:
    """The Arrow files of a ``save_to_disk`` directory, in order; for a DatasetDict, those of ``split``."""
    p = Path(path)
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or []
        except (ValueError, OSError, AttributeError) as exc:
            raise InputError(f"{p / 'dataset_dict.json'}: unreadable ({exc})") from None
        if split not in splits:
            raise InputError(f"{p}: a saved DatasetDict without split {split!r} (splits: {', '.join(splits)}); "
                             f"choose one with --hf-split or name its folder")
        p = p / split
    try:
        state = json.loads((p / "state.json").read_text(encoding="utf-8"))
        files = [str(p / f["filename"]) for f in state["_data_files"]]
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise InputError(f"{p / 'state.json'}: not a datasets save_to_disk state file ({exc})") from None
    if not files:
        raise InputError(f"{p}: the saved dataset lists no data files")
    return files


def _files_in_dir(directory: Path, split: str = "train") -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        if is_saved_dataset(root):  # its data files only, never its state.json / dataset_info.json
            found.extend(saved_dataset_files(root, split))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if _format_of(path)[0] is not None:
                found.append(path)
    return found


def _load_hf(spec: str, hf_split: str, hf_config: str | None, hf_cache_dir: str | None):
    name = spec[len(HF_PREFIX):]
    if not name:
        raise InputError(f"{spec!r}: give a dataset name after 'hf:', e.g. hf:adam89/TinyStoriesChinese")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: Hugging Face inputs need the 'datasets' package (pip install 'xiaolm[data]')") from None
    try:
        return datasets.load_dataset(name, hf_config, split=hf_split, cache_dir=hf_cache_dir)
    except Exception as exc:  # network, missing dataset, bad split: all end the run before work, with the name
        raise InputError(f"{spec}: cannot load Hugging Face dataset (split {hf_split!r}): {exc}") from None


def resolve_inputs(inputs: Iterable[str | os.PathLike | InputFile], *, hf_split: str = "train",
                   hf_config: str | None = None, hf_cache_dir: str | None = None,
                   formats: Iterable[str] = FORMATS) -> list[InputFile]:
    """Expand files, directories (recursively, sorted) and globs (sorted) and check each is readable.

    Raises :class:`InputError` naming the first bad input. Order follows the order given; duplicates (the same
    file reached twice) are read once. ``formats`` limits what a directory or glob picks up.
    """
    allowed = set(formats)
    resolved: list[InputFile] = []
    seen: set[str] = set()

    def add(path: str, explicit: bool) -> None:
        fmt, compressed = _format_of(path)
        if fmt is None or fmt not in allowed:
            if explicit:
                kinds = ", ".join(f".{f}" for f in FORMATS if f in allowed)
                raise InputError(f"{path}: unsupported input type (expected {kinds}, optionally .gz)")
            return
        _check_readable(path, fmt, compressed)
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            resolved.append(InputFile(path, fmt, compressed))

    items = list(inputs)
    if not items:
        raise InputError("no inputs given")
    for item in items:
        if isinstance(item, InputFile):
            if item.format != "hf":
                _check_readable(item.path, item.format, item.compressed)
            resolved.append(item)
            continue
        spec = str(item)
        if spec.startswith(HF_PREFIX):
            resolved.append(InputFile(spec, "hf", False, _load_hf(spec, hf_split, hf_config, hf_cache_dir)))
        elif Path(spec).is_dir():
            files = _files_in_dir(Path(spec), hf_split)
            files = [f for f in files if _format_of(f)[0] in allowed]
            if not files:
                kinds = ", ".join(f".{f}" for f in FORMATS if f in allowed)
                raise InputError(f"{spec}: directory holds no input files ({kinds}, optionally .gz)")
            for f in files:
                add(f, explicit=False)
        elif glob.has_magic(spec):
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            matches = [m for m in matches if _format_of(m)[0] in allowed]
            if not matches:
                raise InputError(f"{spec}: pattern matches no input files")
            for m in matches:
                add(m, explicit=False)
        else:
            add(spec, explicit=True)
    return resolved
