"""``.jsonl``: one JSON value per line."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from xiaolm.data.readers.base import Reader, Record


class JsonLinesReader(Reader):
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

    def iter(self) -> Iterator[Record]:
        yield from self._iter_json_lines(self._binary_lines())
