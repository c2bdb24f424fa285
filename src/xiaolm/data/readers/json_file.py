"""``.json``: an array of records (streamed with ijson, so a file of any size is read in constant memory), an
object holding a list of records (``json_key`` names it; otherwise the object's only list-valued key), or a single
record. A ``.json`` file that is really JSON Lines is read as such. Array items are numbered by row (``file#N``).
"""
from __future__ import annotations

import bisect
import json
import re
from typing import Iterator

from xiaolm.data.readers.base import _STREAM_ERRORS, _SURROGATE, Record, extract_field
from xiaolm.data.readers.encoding import SAMPLE_BYTES
from xiaolm.data.readers.json_lines import JsonLinesReader


class _CheckedUtf8:
    """Passes UTF-8 bytes on to the JSON parser with any invalid byte replaced by U+FFFD (the parser would stop at
    it, losing the rest of the file); ``bad`` says one was seen, so that the records holding U+FFFD are refused."""

    def __init__(self, stream):
        import codecs

        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.bad = False

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(SAMPLE_BYTES if size is None or size < 0 else size)
        text = self.decoder.decode(chunk, final=not chunk)
        if _SURROGATE.search(text):
            self.bad = True
            text = _SURROGATE.sub("\ufffd", text)
        return text.encode("utf-8")


class JsonReader(JsonLinesReader):
    def iter(self) -> Iterator[Record]:
        try:
            stream = self._open()
        except _STREAM_ERRORS as exc:
            self.bad(None, f"unreadable file: {exc}; file skipped")
            return
        with stream:
            try:
                first = stream.peek(SAMPLE_BYTES).lstrip()[:1]
                if first == b"[":
                    yield from self._iter_array(stream)
                    return
                data = stream.read()
            except _STREAM_ERRORS as exc:
                self.bad(None, f"unreadable file: {exc}; file skipped")
                return
        yield from self._iter_whole(data)

    def _iter_array(self, stream) -> Iterator[Record]:
        import ijson

        checked = _CheckedUtf8(stream)
        index = 0
        try:
            for value in ijson.items(checked, "item", use_float=True):
                index += 1
                if checked.bad and "\ufffd" in json.dumps(value, ensure_ascii=False):
                    self.bad(None, f"non-UTF-8 bytes: the record holds bytes that are not valid UTF-8 (row {index})",
                             index)
                    continue
                rec = self._emit(value, None, index)
                if rec is not None:
                    yield rec
        except ijson.IncompleteJSONError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid JSON"
            if "premature EOF" in message:
                message = "array not closed (file truncated?)"
            self.bad(None, f"bad JSON: {message} in array item {index + 1}; rest of file skipped", index + 1)
        except _STREAM_ERRORS as exc:
            self.bad(None, f"unreadable file: {exc}; rest of file skipped", index + 1)

    def _iter_whole(self, data: bytes) -> Iterator[Record]:
        """A file that is not an array: one object (a record, or holding a list of them), or JSON Lines."""
        text, had_bad = self._decode_all(data)
        start = len(text) - len(text.lstrip())
        if start == len(text):
            self.log.warn(f"{self.file}: empty JSON file")
            return
        newlines = [m.start() for m in re.finditer("\n", text)]

        def line_of(pos: int) -> int:
            return bisect.bisect_right(newlines, pos - 1) + 1

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
        if self.options.json_key is not None:
            value = obj.get(self.options.json_key)
            if not isinstance(value, list):
                self.bad(1, f"missing field: json_key '{self.options.json_key}' is not a list in this object; file skipped")
                return []
            return value
        if self.field and extract_field(obj, self.field, self.joiner)[1] is None:
            return None  # the object has the field: it is a single record
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], (dict, str))]
        if len(lists) == 1:
            return obj[lists[0]]
        return None
