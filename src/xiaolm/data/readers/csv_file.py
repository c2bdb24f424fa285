"""``.csv``: a header row, then rows; the field is a column name."""
from __future__ import annotations

import csv
import io
from typing import Iterator

from xiaolm.data.readers.base import Reader, Record, _check_text, csv_records


class CsvReader(Reader):
    def iter(self) -> Iterator[Record]:
        data = self._read_all()
        if data is None:
            return
        text, had_bad = self._decode_all(data)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.options.csv_delimiter)
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
