"""Reading text inputs: the files, directories and prepared corpora that tokenizer training, ``xiaolm data
tokenize`` and ``xiaolm eval ppl`` take.

``resolve_inputs`` / ``iter_documents`` read: a prepared corpus directory
(``train.jsonl`` -> split ``train``, ``val.jsonl`` -> split ``val``), other directories (their ``.jsonl`` and
``.txt`` files), ``.jsonl`` files (text in ``--field``), ``.txt`` files (one document per line), each optionally
``.gz``; ``.json``, ``.csv``, ``.parquet``, ``.arrow`` files and ``datasets`` ``save_to_disk`` directories are read
through the shared reader (``xiaolm.data.readers``, text in ``--field``). A malformed record is counted and
reported with file and line (or row), never fatal.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

MAX_MALFORMED_LISTED = 1000  # all are counted; the first this many are listed with file and line


@dataclass(frozen=True)
class TextSource:
    """One input file and the split its documents go to. ``kind`` is ``jsonl`` or ``txt``."""

    path: Path
    split: str
    kind: str


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return None


def _record_kind(path: Path) -> str | None:
    """``records`` for what only the shared reader reads: other formats and ``save_to_disk`` directories."""
    from xiaolm.data.readers import _format_of, is_saved_dataset

    return "records" if is_saved_dataset(path) or _format_of(str(path))[0] in ("json", "csv", "parquet", "arrow") \
        else None


def resolve_inputs(inputs: Sequence[str | Path], split: str = "train") -> list[TextSource]:
    """Turn command-line inputs into ``TextSource``s, checking that every one exists and is readable first.

    A directory holding ``train.jsonl`` or ``val.jsonl`` is a prepared corpus and gives splits ``train``/``val``;
    any other directory contributes its ``.jsonl``/``.txt`` files (sorted, recursively) to ``split``.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given: name a prepared corpus directory or .jsonl/.txt files")
    sources: list[TextSource] = []
    for item in inputs:
        path = Path(item)
        if _record_kind(path):
            from xiaolm.data.readers import resolve_inputs as check_readable

            check_readable([str(path)])  # raises InputError (a ValueError) naming the path
            sources.append(TextSource(path, split, "records"))
        elif path.is_dir():
            prepared = [(path / f"{name}.jsonl", name) for name in ("train", "val")]
            if any(p.is_file() for p, _ in prepared):
                sources += [TextSource(p, name, "jsonl") for p, name in prepared if p.is_file()]
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p))
            if not found:
                raise ValueError(f"{path}: directory has no train.jsonl/val.jsonl and no .jsonl or .txt files")
            sources += [TextSource(p, split, _kind_of(p)) for p in found]  # type: ignore[arg-type]
        elif path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise ValueError(f"{path}: unsupported input (expected a directory, .jsonl or .txt, optionally .gz); "
                                 f"convert other formats with `xiaolm data prepare`")
            sources.append(TextSource(path, split, kind))
        else:
            raise FileNotFoundError(f"input not found: {path}")
    for source in sources:
        if not os.access(source.path, os.R_OK):
            raise PermissionError(f"input not readable: {source.path}")
    return sources


def input_batches(source: TextSource, field: str, batch_lines: int,
                  errors: list[dict] | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """``read_line_batches``, or for a ``records`` source the texts the shared reader finds (one JSON string per
    line; its malformed records are reported with file:line / file#row as they are met)."""
    if source.kind != "records":
        yield from read_line_batches(source, batch_lines=batch_lines, errors=errors)
        return
    from xiaolm.data.readers import iter_records

    batch: list[bytes] = []
    for n, rec in enumerate(iter_records([str(source.path)], field=field), 1):
        batch.append(json.dumps(rec.text, ensure_ascii=False).encode("utf-8") + b"\n")
        if len(batch) >= batch_lines:
            yield n - len(batch) + 1, batch
            batch = []
    if batch:
        yield n - len(batch) + 1, batch


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_line_batches(source: TextSource, batch_lines: int, batch_bytes: int = 8 << 20,
                      errors: list[dict] | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(first_line_number, raw_lines)`` batches of at most ``batch_lines`` lines / ~``batch_bytes``.

    With ``errors`` a damaged compressed stream (a truncated .gz) ends the file instead of the run: the lines read
    so far are yielded and ``{file, line, reason}`` is appended, as ``xiaolm data prepare`` reports it."""
    batch: list[bytes] = []
    size = 0
    first = 1
    lineno = 0
    try:
        with _open_binary(source.path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not batch:
                    first = lineno
                batch.append(line)
                size += len(line)
                if len(batch) >= batch_lines or size >= batch_bytes:
                    yield first, batch
                    batch, size = [], 0
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        if errors is None:
            raise
        errors.append({"file": str(source.path), "line": lineno + 1,
                       "reason": f"unreadable file: {exc}; rest of file skipped"})
    if batch:
        yield first, batch


def _field_value(record: object, field: str):
    """Follow a dotted field path; a list of strings is joined with newlines (e.g. poem ``paragraphs``)."""
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    return value


def parse_lines(path: str, kind: str, field: str, first_lineno: int, lines: Sequence[bytes]
                ) -> tuple[list[str], list[dict], int]:
    """Decode raw lines into documents. Returns ``(texts, malformed, empty)`` where ``malformed`` lists
    ``{file, line, reason}`` and ``empty`` counts JSON records whose text is empty or blank.

    ``.txt``: a line is a document (line ending removed, everything else kept); blank lines separate, they are not
    documents. ``.jsonl``: the text is ``field`` of each JSON object.
    """
    texts: list[str] = []
    malformed: list[dict] = []
    empty = 0
    for lineno, raw in enumerate(lines, first_lineno):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            malformed.append({"file": path, "line": lineno, "reason": f"not UTF-8 (byte {exc.start})"})
            continue
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        if kind == "txt":
            if line.strip():
                texts.append(line)
            continue
        if kind == "records":  # already read and checked by the shared reader
            text = json.loads(line)
            if text.strip():
                texts.append(text)
            else:
                empty += 1
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            malformed.append({"file": path, "line": lineno, "reason": f"not valid JSON: {exc.msg}"})
            continue
        try:
            text = _field_value(record, field)
        except KeyError:
            malformed.append({"file": path, "line": lineno, "reason": f"missing field {field!r}"})
            continue
        if not isinstance(text, str):
            malformed.append({"file": path, "line": lineno,
                              "reason": f"field {field!r} is {type(text).__name__}, not text"})
            continue
        if not text.strip():
            empty += 1
            continue
        texts.append(text)
    return texts, malformed, empty


def iter_documents(sources: Iterable[TextSource], field: str = "text", splits: Sequence[str] | None = None,
                   stats: dict | None = None) -> Iterator[tuple[TextSource, str]]:
    """Stream ``(source, text)`` for every document of ``sources`` (optionally only the given splits).

    ``stats`` (if given) accumulates ``documents``, ``malformed`` (count), ``malformed_records`` (first ones),
    ``empty`` and ``chars``.
    """
    stats = stats if stats is not None else {}
    for key in ("documents", "malformed", "empty", "chars"):
        stats.setdefault(key, 0)
    stats.setdefault("malformed_records", [])
    for source in sources:
        if splits is not None and source.split not in splits:
            continue
        unreadable: list[dict] = []
        for first, lines in input_batches(source, field, 4096, errors=unreadable):
            texts, malformed, empty = parse_lines(str(source.path), source.kind, field, first, lines)
            _note_malformed(stats, unreadable)
            unreadable.clear()
            _note_malformed(stats, malformed)
            stats["empty"] += empty
            for text in texts:
                stats["documents"] += 1
                stats["chars"] += len(text)
                yield source, text


def _note_malformed(stats: dict, malformed: list[dict]) -> None:
    stats["malformed"] += len(malformed)
    room = MAX_MALFORMED_LISTED - len(stats["malformed_records"])
    if room > 0:
        stats["malformed_records"].extend(malformed[:room])
