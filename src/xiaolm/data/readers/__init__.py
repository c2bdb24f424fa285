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
- ``.json``: an array of records (streamed with ijson: constant memory; items are numbered by row, ``file#N``),
  or an object holding a list of records (``json_key`` names it; otherwise the object's only list-valued key), or
  a single record. A ``.json`` file that is really JSON Lines is read as such.
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

Text formats (txt, jsonl, json, csv) are read in the encoding ``encoding`` names (``auto``: a byte-order mark,
else UTF-8 when the file starts as UTF-8, else what charset-normalizer detects, e.g. GB18030 or UTF-16; see
``encoding.py``); the encoding used is kept per file in ``ReadLog.files``.

One module per format: ``text`` (.txt), ``json_lines`` (.jsonl), ``json_file`` (.json), ``csv_file`` (.csv),
``columnar`` (parquet, Arrow, ``hf:``); ``base`` holds the records, the ReadLog, field paths and the ``Reader`` every
format subclasses; ``inputs`` resolves what a user typed into input files.

A malformed record (bad JSON, missing field, non-string field, non-UTF-8 bytes, bad CSV row) is never fatal and
never silently skipped: it goes to a :class:`ReadLog` with its file, line (or row) and reason.
"""
from __future__ import annotations

import csv
import os
import re
import sys
from typing import Any, Iterable, Iterator

from xiaolm.data.readers.base import (FORMATS, HF_PREFIX, ROW_FORMATS, TXT_MODES, FileStats, InputError, InputFile,
                                      Malformed, ReadLog, ReadOptions, Record, csv_records, extract_field)
from xiaolm.data.readers.columnar import ArrowReader, HFReader, ParquetReader
from xiaolm.data.readers.csv_file import CsvReader
from xiaolm.data.readers.encoding import detect_encoding, normalise_encoding
from xiaolm.data.readers.inputs import _format_of, is_saved_dataset, resolve_inputs, saved_dataset_files
from xiaolm.data.readers.json_file import JsonReader
from xiaolm.data.readers.json_lines import JsonLinesReader
from xiaolm.data.readers.text import TextReader

READERS = {"txt": TextReader, "jsonl": JsonLinesReader, "json": JsonReader, "csv": CsvReader,
           "parquet": ParquetReader, "arrow": ArrowReader, "hf": HFReader}


def check_encoding(encoding: str) -> str:
    """``auto`` or a codec Python knows, by its canonical name; ValueError naming the option otherwise."""
    if encoding == "auto":
        return encoding
    try:
        return normalise_encoding(encoding)
    except LookupError:
        raise ValueError(f"--encoding {encoding!r}: not an encoding Python knows (e.g. auto, utf-8, gb18030, "
                         f"utf-16)") from None


def iter_records(inputs: Iterable[str | os.PathLike | InputFile], field: str = "text", *,
                 joiner: str = "", txt_mode: str = "line", chapter_regex: str = r"第.+回",
                 json_key: str | None = None, csv_delimiter: str = ",", hf_split: str = "train",
                 hf_config: str | None = None, hf_cache_dir: str | None = None, encoding: str = "auto",
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
    encoding = check_encoding(encoding)
    files = resolve_inputs(inputs, hf_split=hf_split, hf_config=hf_config, hf_cache_dir=hf_cache_dir)
    collector = collector if collector is not None else ReadLog(echo=True)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be long

    options = ReadOptions(field, joiner, txt_mode, heading, json_key, csv_delimiter, encoding)

    def generate() -> Iterator[Record]:
        for item in files:
            yield from READERS[item.format](item, collector, options).records()

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
        reader = READERS[item.format](item, collector, ReadOptions(field=None, chapter_re=re.compile("$^")))
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
             "hf_cache_dir", "encoding")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


__all__ = [
    "FORMATS", "TXT_MODES", "InputError", "InputFile", "Record", "Malformed", "FileStats", "ReadLog",
    "resolve_inputs", "iter_records", "iter_raw_records", "is_saved_dataset", "saved_dataset_files", "extract_field",
    "read_options_from", "check_encoding", "csv_records", "detect_encoding",
]
