"""What every reader shares: the records and their problems (``Record``, ``ReadLog``), field paths, and the
``Reader`` base class (opening a file, decoded from its encoding into UTF-8, and reporting a malformed record)."""
from __future__ import annotations

import csv
import gzip
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from xiaolm.data.readers.encoding import open_utf8
from xiaolm.errors import DataError
from xiaolm.utils import log

FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "arrow")
ROW_FORMATS = ("csv", "parquet", "arrow")  # what the conversation / pair loaders read through ``iter_raw_records``
TXT_MODES = ("line", "paragraph", "file", "chapter")
HF_PREFIX = "hf:"
TEXT_FORMATS = ("txt", "jsonl", "json", "csv")  # the formats that have a character encoding

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
    encoding: str = "utf-8"  # what the file was read as (given with --encoding, or detected)


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
    try:
        text.encode("utf-8")  # in C: ~20x faster than searching for a surrogate, and only they fail
        return None
    except UnicodeEncodeError:
        pass
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


# -------------------------------------------------------------------------------------------- the base reader


@dataclass(frozen=True)
class ReadOptions:
    """How to read: the field path and the format options of ``iter_records``."""

    field: str | None = "text"  # None: the whole record (``iter_raw_records``)
    joiner: str = ""
    txt_mode: str = "line"
    chapter_re: re.Pattern = re.compile(r"第.+回")
    json_key: str | None = None
    csv_delimiter: str = ","
    encoding: str = "auto"


class Reader:
    """Reads one input file, feeding a ReadLog; a subclass per format yields its Records from ``iter``."""

    def __init__(self, item, collector: ReadLog, options: ReadOptions):
        self.item = item
        self.file = item.path
        self.log = collector
        self.options = options
        self.field = options.field
        self.joiner = options.joiner
        self.missing_field = 0  # records lacking the field, to warn when it is missing everywhere
        self.seen_keys: list[str] = []
        self.encoding = "utf-8"

    def bad(self, line: int | None, reason: str, row: int | None = None) -> None:
        self.log.add_malformed(self.file, line, reason, row)
        if reason.startswith("missing field"):
            self.missing_field += 1

    def _raw(self):
        return gzip.open(self.file, "rb") if self.item.compressed else open(self.file, "rb")

    def _open(self):
        """The file's bytes as UTF-8: read as they are when the file is UTF-8, else decoded from its encoding
        (``--encoding``, or detected from the first bytes). A byte the encoding cannot decode is passed on as it
        is, so that only its line or record is dropped, and counted."""
        if self.item.format not in TEXT_FORMATS:
            return self._raw()
        raw = self._raw()
        try:
            stream, self.encoding = open_utf8(raw, self.options.encoding)
        except BaseException:
            raw.close()
            raise
        stats = self.log.files.get(self.file)
        if stats is not None:
            stats.encoding = self.encoding
        return stream

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

    def iter(self) -> Iterator[Record]:
        raise NotImplementedError

    def records(self) -> Iterator[Record]:
        stats = self.log.files.setdefault(self.file, FileStats(self.file, self.item.format))
        for rec in self.iter():
            stats.records += 1
            yield rec
        if self.field and stats.records == 0 and self.missing_field and self.missing_field == stats.malformed:
            keys = f"; fields seen: {', '.join(self.seen_keys)}" if self.seen_keys else ""
            self.log.warn(f"{self.file}: field '{self.field}' is missing from every record{keys}")
