"""Finding and reading raw text inputs, for every stage that takes a corpus.

``resolve_inputs`` turns what a user typed (files, directories, globs, ``hf:NAME``) into a checked list of input
files and raises :class:`InputError`, naming the path, for anything missing, unreadable or of an unknown kind,
before any work starts. ``iter_records`` then yields one :class:`Record` (text, file, line) per document.

Formats (each also gzip-compressed as ``NAME.EXT.gz``):

- ``.txt``: ``txt_mode`` ``line`` (one document per non-blank line), ``paragraph`` (blank-line separated
  blocks), ``file`` (the whole file), or ``chapter`` (a new document starts at every line that
  ``chapter_regex`` matches *at the start of the line*, e.g. ``第.+回``; an indented mention inside a paragraph
  does not split; text before the first heading is a document of its own). CRLF and CR line ends are read as LF.
- ``.jsonl``: one JSON value per line.
- ``.json``: an array of records, or an object holding a list of records (``json_key`` names it; otherwise the
  object's only list-valued key), or a single record. A ``.json`` file that is really JSON Lines is read as such.
- ``.csv``: header row, then rows; the field is a column name.
- ``.parquet``: rows; the field's first component is a column (structs are followed by the rest of the path).
- ``.arrow``: Arrow IPC files (the stream format ``datasets`` writes, or the file format), read like parquet.
- a ``datasets`` ``save_to_disk`` directory (``state.json`` + ``data-*.arrow``; a ``DatasetDict`` directory gives
  its ``hf_split`` split): its Arrow files, in order. Its JSON bookkeeping files are never read as data.
- ``hf:NAME`` (e.g. ``hf:adam89/TinyStoriesChinese`` or ``hf:/path/to/local/dataset``): loaded with
  ``datasets.load_dataset(NAME, hf_config, split=hf_split, cache_dir=hf_cache_dir)``.

The text of a record is chosen by a field path: ``story_zh``, ``modern``, nested ``a.b.c`` (a numeric component
indexes a list), ``""`` for a record that is itself a string, or alternatives ``modern|paragraphs`` (the first the
record has; lets inputs of different layouts share one run). A list of strings is joined with ``joiner``
(default ``""``, right for lines of Chinese verse).

A malformed record (bad JSON, missing field, non-string field, non-UTF-8 bytes, bad CSV row) is never fatal and
never silently skipped: it goes to a :class:`ReadLog` with its file, line (or row) and reason.
"""
from __future__ import annotations

import bisect
import csv
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from xiaolm.errors import DataError
from xiaolm.utils import log

FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "arrow")
ROW_FORMATS = ("csv", "parquet", "arrow")  # what the conversation / pair loaders read through ``iter_raw_records``
TXT_MODES = ("line", "paragraph", "file", "chapter")
HF_PREFIX = "hf:"

# Errors raised by a damaged gzip stream part-way through a file.
_STREAM_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(DataError):
    """An input that cannot be used (missing, unreadable, unknown kind); raised before any work starts."""


# ------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class InputFile:
    """One resolved input: a local file of a known format, or a Hugging Face dataset."""

    path: str
    format: str  # one of FORMATS, or "hf"
    compressed: bool = False
    handle: Any = field(default=None, compare=False, repr=False)  # the loaded HF dataset


@dataclass
class Record:
    """One document's raw text and where it came from.

    ``line`` is the 1-based line where the record starts, for formats that have lines (txt, jsonl, csv, json
    arrays); for row formats (parquet, ``hf:``, a JSON object holding a list) ``line`` is None and ``row`` is the
    1-based row number.
    """

    text: str
    source_file: str
    line: int | None = None
    row: int | None = None
    value: Any = None  # the whole record, for ``iter_raw_records``

    @property
    def source(self) -> str:
        """``file:line`` or ``file#row``."""
        if self.line is not None:
            return f"{self.source_file}:{self.line}"
        return f"{self.source_file}#{self.row}"


@dataclass
class Malformed:
    file: str
    line: int | None
    reason: str
    row: int | None = None

    def to_dict(self) -> dict:
        out = {"file": self.file, "line": self.line, "reason": self.reason}
        if self.row is not None:
            out["row"] = self.row
        return out


@dataclass
class FileStats:
    file: str
    format: str
    records: int = 0  # documents yielded
    malformed: int = 0


class ReadLog:
    """Collects malformed records, warnings and per-file counts while reading.

    Every malformed record is counted (``malformed_total``, ``by_reason``, per file); the first ``max_listed``
    are kept in full with file, line and reason. ``echo=True`` also prints each one to stderr (the default when
    ``iter_records`` is called without a collector, so nothing goes unseen).
    """

    def __init__(self, max_listed: int = 10_000, echo: bool = False):
        self.max_listed = max_listed
        self.echo = echo
        self.malformed: list[Malformed] = []
        self.malformed_total = 0
        self.by_reason: dict[str, int] = {}
        self.warnings: list[str] = []
        self.files: dict[str, FileStats] = {}

    def add_malformed(self, file: str, line: int | None, reason: str, row: int | None = None) -> None:
        self.malformed_total += 1
        kind = reason.split(":", 1)[0]
        self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
        if file in self.files:
            self.files[file].malformed += 1
        if len(self.malformed) < self.max_listed:
            self.malformed.append(Malformed(file, line, reason, row))
        if self.echo:
            where = f"{file}:{line}" if line is not None else f"{file}#{row}"
            log(f"xiaolm: malformed record {where}: {reason}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log(f"xiaolm: warning: {message}")


# ------------------------------------------------------------------------------------- resolving inputs


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


# ---------------------------------------------------------------------------------------- field paths


def extract_field(record: Any, path: str, joiner: str = "") -> tuple[str | None, str | None]:
    """Return ``(text, None)`` or ``(None, reason)`` for the value at ``path`` (dotted) in ``record``.

    ``path`` may list alternatives, ``modern|paragraphs``: the first one the record has is used (so inputs of
    different layouts can share one run).
    """
    if "|" in path:
        first_reason = None
        for alternative in path.split("|"):
            text, reason = _extract_one(record, alternative, joiner)
            if reason is None or not reason.startswith("missing field"):
                return text, reason
            first_reason = first_reason or reason
        return None, f"missing field: none of '{path}' ({first_reason.split('(', 1)[-1]}"
    return _extract_one(record, path, joiner)


def _extract_one(record: Any, path: str, joiner: str) -> tuple[str | None, str | None]:
    value = record
    if path:
        rest = path
        while rest:
            if isinstance(value, dict):
                if rest in value:  # a key that itself contains dots
                    value, rest = value[rest], ""
                    continue
                key, _, rest = rest.partition(".")
                if key not in value:
                    shown = ", ".join(map(str, list(value)[:8]))
                    return None, f"missing field: '{path}' (no key '{key}'; keys: {shown})"
                value = value[key]
            elif isinstance(value, list):
                key, _, rest = rest.partition(".")
                if not key.isdigit() or int(key) >= len(value):
                    return None, f"missing field: '{path}' (no item '{key}' in a list of {len(value)})"
                value = value[int(key)]
            else:
                return None, f"missing field: '{path}' (a {type(value).__name__} has no '{rest.split('.')[0]}')"
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return joiner.join(value), None
        bad = next(type(v).__name__ for v in value if not isinstance(v, str))
        return None, f"non-string field: '{path}' is a list holding {bad}"
    if value is None:
        return None, f"non-string field: '{path}' is null"
    return None, f"non-string field: '{path}' is {type(value).__name__}"


def _check_text(text: str, had_bad_bytes: bool) -> str | None:
    """A reason if ``text`` holds lone surrogates (from undecodable bytes or a ``\\udXXX`` JSON escape)."""
    if _SURROGATE.search(text) is None:
        return None
    if had_bad_bytes:
        return "non-UTF-8 bytes: the record holds bytes that are not valid UTF-8"
    return "invalid Unicode: the record holds an unpaired surrogate escape"


def csv_records(reader) -> Iterator[tuple[int, int, list[str] | None, csv.Error | None]]:
    """The records of a ``csv.reader`` past its header, each with its first and last line in the file (a quoted
    field may span lines); a record the csv module cannot read comes as row None with its error, and reading goes on."""
    previous_end = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield previous_end + 1, reader.line_num, None, exc
        else:
            yield previous_end + 1, reader.line_num, row, None
        previous_end = reader.line_num


# -------------------------------------------------------------------------------------------- readers


class _Reader:
    """Reads one input file, feeding a ReadLog. Each ``_iter_FORMAT`` yields Records."""

    def __init__(self, item: InputFile, collector: ReadLog, field_path: str, joiner: str, txt_mode: str,
                 chapter_regex: re.Pattern, json_key: str | None, csv_delimiter: str):
        self.item = item
        self.file = item.path
        self.log = collector
        self.field = field_path
        self.joiner = joiner
        self.txt_mode = txt_mode
        self.chapter_re = chapter_regex
        self.json_key = json_key
        self.csv_delimiter = csv_delimiter
        self.missing_field = 0  # records lacking the field, to warn when it is missing everywhere
        self.seen_keys: list[str] = []

    def bad(self, line: int | None, reason: str, row: int | None = None) -> None:
        self.log.add_malformed(self.file, line, reason, row)
        if reason.startswith("missing field"):
            self.missing_field += 1

    def _open(self):
        return gzip.open(self.file, "rb") if self.item.compressed else open(self.file, "rb")

    def _read_all(self) -> bytes | None:
        try:
            with self._open() as fh:
                return fh.read()
        except _STREAM_ERRORS as exc:
            self.bad(None, f"unreadable file: {exc}; file skipped")
            return None

    def _decode_all(self, data: bytes) -> tuple[str, bool]:
        """Decode a whole file; undecodable bytes survive as surrogates so that only their records are lost."""
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="surrogateescape"), True

    def _emit(self, value: Any, line: int | None, row: int | None = None, raw_bad: bool = False) -> Record | None:
        if self.field is None:  # iter_raw_records: the record itself
            return Record("", self.file, line, row, value=value)
        text, reason = extract_field(value, self.field, self.joiner)
        if reason is None:
            reason = _check_text(text, raw_bad)
        if reason is not None:
            if reason.startswith("missing field") and isinstance(value, dict) and not self.seen_keys:
                self.seen_keys = list(map(str, value))[:20]
            self.bad(line, reason if row is None else f"{reason} (row {row})", row)
            return None
        return Record(text, self.file, line, row)

    # -- line-oriented JSON

    def _iter_json_lines(self, lines: Iterable[tuple[int, bytes]]) -> Iterator[Record]:
        for lineno, raw in lines:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad(lineno, f"non-UTF-8 bytes: invalid UTF-8 at byte {exc.start + 1} of the line")
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                self.bad(lineno, f"bad JSON: {exc.msg} (column {exc.colno})")
                continue
            rec = self._emit(value, lineno)
            if rec is not None:
                yield rec

    def _binary_lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes without the line end); a damaged gzip tail is reported, not raised."""
        lineno = 0
        try:
            with self._open() as fh:
                for lineno, raw in enumerate(fh, 1):
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    yield lineno, raw.rstrip(b"\n").rstrip(b"\r")
        except _STREAM_ERRORS as exc:
            self.bad(lineno + 1, f"unreadable file: {exc}; rest of file skipped")

    def _iter_jsonl(self) -> Iterator[Record]:
        yield from self._iter_json_lines(self._binary_lines())

    # -- whole-file JSON

    def _iter_json(self) -> Iterator[Record]:
        data = self._read_all()
        if data is None:
            return
        text, had_bad = self._decode_all(data)
        start = len(text) - len(text.lstrip())
        if start == len(text):
            self.log.warn(f"{self.file}: empty JSON file")
            return
        newlines = [m.start() for m in re.finditer("\n", text)]

        def line_of(pos: int) -> int:
            return bisect.bisect_right(newlines, pos - 1) + 1

        if text[start] == "[":
            yield from self._iter_json_array(text, start + 1, line_of, had_bad)
            return
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text[start] == "{":  # JSON Lines under a .json name
                lines = ((i, raw.rstrip(b"\r")) for i, raw in enumerate(data.split(b"\n"), 1))
                yield from self._iter_json_lines(lines)
            else:
                self.bad(exc.lineno, f"bad JSON: {exc.msg} (column {exc.colno}); file skipped")
            return
        if isinstance(value, dict):
            records = self._records_in_object(value)
            if records is not None:
                for row, rec_value in enumerate(records, 1):
                    rec = self._emit(rec_value, None, row, had_bad)
                    if rec is not None:
                        yield rec
                return
        rec = self._emit(value, line_of(start), None, had_bad)
        if rec is not None:
            yield rec

    def _records_in_object(self, obj: dict) -> list | None:
        """The list of records inside a top-level object, or None when the object is itself one record."""
        if self.json_key is not None:
            value = obj.get(self.json_key)
            if not isinstance(value, list):
                self.bad(1, f"missing field: json_key '{self.json_key}' is not a list in this object; file skipped")
                return []
            return value
        if self.field and extract_field(obj, self.field, self.joiner)[1] is None:
            return None  # the object has the field: it is a single record
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], (dict, str))]
        if len(lists) == 1:
            return obj[lists[0]]
        return None

    def _iter_json_array(self, text: str, pos: int, line_of, had_bad: bool) -> Iterator[Record]:
        decoder = json.JSONDecoder()
        space = re.compile(r"\s*")
        index = 0
        while True:
            pos = space.match(text, pos).end()
            if pos >= len(text):
                self.bad(line_of(pos), "bad JSON: array not closed (file truncated?)")
                return
            if text[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                self.bad(line_of(exc.pos), f"bad JSON: {exc.msg} in array item {index + 1}; rest of file skipped")
                return
            index += 1
            raw_bad = had_bad and _SURROGATE.search(text, pos, end) is not None
            rec = self._emit(value, line_of(pos), None, raw_bad)
            if rec is not None:
                yield rec
            pos = space.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] == "]":
                return
            else:
                self.bad(line_of(pos), "bad JSON: expected ',' or ']' after an array item; rest of file skipped")
                return

    # -- CSV

    def _iter_csv(self) -> Iterator[Record]:
        data = self._read_all()
        if data is None:
            return
        text, had_bad = self._decode_all(data)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.csv_delimiter)
        try:
            header = next(reader)
        except StopIteration:
            self.log.warn(f"{self.file}: empty CSV file")
            return
        except csv.Error as exc:
            self.bad(1, f"bad CSV row: header: {exc}; file skipped")
            return
        column = None if self.field is None else next(
            (header.index(f) for f in self.field.split("|") if f in header), None)
        if column is None and self.field is not None:
            self.seen_keys = header[:20]
        for line, _end, row, exc in csv_records(reader):
            if exc is not None:
                self.bad(line, f"bad CSV row: {exc}")
                continue
            if not row:
                continue
            if len(row) != len(header):
                self.bad(line, f"bad CSV row: {len(row)} fields, header has {len(header)}")
                continue
            if column is None and self.field is not None:
                self.bad(line, f"missing field: no column '{self.field}' (columns: {', '.join(header[:8])})")
                continue
            reason = _check_text("".join(row), had_bad)
            if reason is not None:
                self.bad(line, reason)
                continue
            if self.field is None:
                yield Record("", self.file, line, value=dict(zip(header, row)))
            else:
                yield Record(row[column], self.file, line)

    # -- parquet and Hugging Face rows

    def _iter_rows(self, rows: Iterable[Any], top_column_missing: bool = False) -> Iterator[Record]:
        for row, value in enumerate(rows, 1):
            if top_column_missing:
                self.bad(None, f"missing field: '{self.field}' (row {row})", row)
                continue
            rec = self._emit(value, None, row)
            if rec is not None:
                yield rec

    def _iter_parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        if self.item.compressed:
            data = self._read_all()
            if data is None:
                return
            source: Any = io.BytesIO(data)
        else:
            source = self.file
        try:
            pf = pq.ParquetFile(source)
        except Exception as exc:
            self.bad(None, f"unreadable file: {exc}; file skipped")
            return
        columns = self._columns(pf.schema_arrow.names)
        if columns == []:
            yield from self._iter_rows((None for _ in range(pf.metadata.num_rows)), top_column_missing=True)
            return

        def rows():
            for batch in pf.iter_batches(columns=columns, batch_size=4096):
                yield from batch.to_pylist()
        try:
            yield from self._iter_rows(rows())
        except Exception as exc:  # a damaged row group part-way
            self.bad(None, f"unreadable file: {exc}; rest of file skipped")

    def _columns(self, names: list[str]) -> list[str] | None:
        """The columns the field path needs (None: all, for raw records; []: none of them is there)."""
        if self.field is None:
            return None
        tops = [f.split(".", 1)[0] for f in self.field.split("|")] if self.field else []
        columns = [t for t in dict.fromkeys(tops) if t in names]
        if not columns:
            self.seen_keys = names[:20]
        return columns

    def _iter_arrow(self) -> Iterator[Record]:
        source: Any = self.file
        if self.item.compressed:
            source = self._read_all()
            if source is None:
                return
        try:
            reader = _arrow_reader(source)
            columns = self._columns(reader.schema.names)
        except Exception as exc:  # pyarrow's own error types
            self.bad(None, f"unreadable file: {exc}; file skipped")
            return

        def batches():
            for batch in _arrow_batches(reader):
                yield batch if columns is None else batch.select(columns)
        try:
            if columns == []:
                yield from self._iter_rows((None for b in batches() for _ in range(b.num_rows)),
                                           top_column_missing=True)
                return
            yield from self._iter_rows(row for b in batches() for row in b.to_pylist())
        except Exception as exc:  # a damaged batch part-way
            self.bad(None, f"unreadable file: {exc}; rest of file skipped")

    def _iter_hf(self) -> Iterator[Record]:
        yield from self._iter_rows(iter(self.item.handle))

    # -- plain text

    def _text_lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text) for every line; bare CR also ends a line. Undecodable lines are reported."""
        for lineno, raw in self._binary_lines():
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = "dropped" if self.txt_mode == "line" else "line dropped from its document"
                self.bad(lineno, f"non-UTF-8 bytes: invalid UTF-8 at byte {exc.start + 1} of the line; {where}")
                continue
            if "\r" in line:
                for part in line.split("\r"):
                    yield lineno, part
            else:
                yield lineno, line

    def _iter_txt(self) -> Iterator[Record]:
        mode = self.txt_mode
        if mode == "line":
            for lineno, line in self._text_lines():
                if line.strip():
                    yield Record(line, self.file, lineno)
            return
        block: list[str] = []
        block_start: int | None = None
        headings = 0

        def flush() -> Record | None:
            nonlocal block, block_start
            text = "\n".join(block)
            rec = Record(text, self.file, block_start) if text.strip() else None
            block, block_start = [], None
            return rec

        for lineno, line in self._text_lines():
            if mode == "paragraph" and not line.strip():
                rec = flush()
                if rec:
                    yield rec
                continue
            if mode == "chapter" and self.chapter_re.match(line):
                headings += 1
                rec = flush()
                if rec:
                    yield rec
            if block_start is None:
                if not line.strip():
                    continue
                block_start = lineno
            block.append(line)
        rec = flush()
        if rec:
            yield rec
        if mode == "chapter" and headings == 0:
            self.log.warn(f"{self.file}: chapter_regex {self.chapter_re.pattern!r} matched no line; "
                          "the whole file is one document")

    def records(self) -> Iterator[Record]:
        reader = {
            "txt": self._iter_txt, "jsonl": self._iter_jsonl, "json": self._iter_json, "csv": self._iter_csv,
            "parquet": self._iter_parquet, "arrow": self._iter_arrow, "hf": self._iter_hf,
        }[self.item.format]
        stats = self.log.files.setdefault(self.file, FileStats(self.file, self.item.format))
        for rec in reader():
            stats.records += 1
            yield rec
        if self.field and stats.records == 0 and self.missing_field and self.missing_field == stats.malformed:
            keys = f"; fields seen: {', '.join(self.seen_keys)}" if self.seen_keys else ""
            self.log.warn(f"{self.file}: field '{self.field}' is missing from every record{keys}")


# ------------------------------------------------------------------------------------------ public API


def iter_records(inputs: Iterable[str | os.PathLike | InputFile], field: str = "text", *,
                 joiner: str = "", txt_mode: str = "line", chapter_regex: str = r"第.+回",
                 json_key: str | None = None, csv_delimiter: str = ",", hf_split: str = "train",
                 hf_config: str | None = None, hf_cache_dir: str | None = None,
                 collector: ReadLog | None = None) -> Iterator[Record]:
    """Yield a :class:`Record` for every document in ``inputs``, in input order.

    The inputs are resolved and checked *now* (an :class:`InputError` is raised before anything is read);
    the returned iterator then reads lazily. Malformed records go to ``collector`` (a :class:`ReadLog`); without
    one they are printed to stderr as they occur.
    """
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    try:
        heading = re.compile(chapter_regex)
    except re.error as exc:
        raise ValueError(f"chapter_regex {chapter_regex!r} is not a valid regular expression: {exc}") from None
    if len(csv_delimiter) != 1:
        raise ValueError(f"csv_delimiter must be one character, got {csv_delimiter!r}")
    files = resolve_inputs(inputs, hf_split=hf_split, hf_config=hf_config, hf_cache_dir=hf_cache_dir)
    collector = collector if collector is not None else ReadLog(echo=True)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be long

    def generate() -> Iterator[Record]:
        for item in files:
            reader = _Reader(item, collector, field, joiner, txt_mode, heading, json_key, csv_delimiter)
            yield from reader.records()

    return generate()


def iter_raw_records(path: str | os.PathLike, hf_split: str = "train"
                     ) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, error)`` for every record of one CSV, Parquet or Arrow file or ``save_to_disk`` directory,
    in the shape of ``xiaolm.data.formats.iter_json_records`` (the conversation and pair loaders): ``record`` is the
    whole row (a dict; a CSV row maps its header to strings), ``line`` the CSV line or the 1-based row, so that
    ``f"{path}:{line}"`` names it. Problems come as ``(line, None, reason)`` in reading order."""
    inputs = resolve_inputs([path], hf_split=hf_split, formats=ROW_FORMATS)
    pending: list[Malformed] = []

    class _Collect(ReadLog):
        def add_malformed(self, file, line, reason, row=None):
            pending.append(Malformed(file, line, reason, row))

    collector = _Collect()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    offset = 0  # rows continue across the Arrow files of one saved dataset
    for item in inputs:
        reader = _Reader(item, collector, None, "", "line", re.compile("$^"), None, ",")
        last = 0
        for rec in reader.records():
            while pending:
                m = pending.pop(0)
                yield (m.line if m.line is not None else offset + (m.row or 0)), None, m.reason
            last = rec.row or 0
            yield (rec.line if rec.line is not None else offset + rec.row), rec.value, None
        while pending:
            m = pending.pop(0)
            yield (m.line if m.line is not None else offset + (m.row or 0)), None, m.reason
        offset += last


def read_options_from(cfg: Any) -> dict:
    """The keyword arguments of :func:`iter_records` taken from any config object that has those attributes."""
    names = ("field", "joiner", "txt_mode", "chapter_regex", "json_key", "csv_delimiter", "hf_split", "hf_config",
             "hf_cache_dir")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


__all__ = [
    "FORMATS", "TXT_MODES", "InputError", "InputFile", "Record", "Malformed", "FileStats", "ReadLog",
    "resolve_inputs", "iter_records", "iter_raw_records", "is_saved_dataset", "saved_dataset_files", "extract_field",
    "read_options_from",
]
