"""Row formats: ``.parquet``, ``.arrow`` (and ``datasets`` ``save_to_disk`` directories), ``hf:NAME``."""
from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

from xiaolm.data.readers.base import Reader, Record
from xiaolm.data.readers.inputs import _arrow_batches, _arrow_reader


class RowsReader(Reader):
    """A reader of rows (dicts), numbered from 1."""

    def _iter_rows(self, rows: Iterable[Any], top_column_missing: bool = False) -> Iterator[Record]:
        for row, value in enumerate(rows, 1):
            if top_column_missing:
                self.bad(None, f"missing field: '{self.field}' (row {row})", row)
                continue
            rec = self._emit(value, None, row)
            if rec is not None:
                yield rec

    def _columns(self, names: list[str]) -> list[str] | None:
        """The columns the field path needs (None: all, for raw records; []: none of them is there)."""
        if self.field is None:
            return None
        tops = [f.split(".", 1)[0] for f in self.field.split("|")] if self.field else []
        columns = [t for t in dict.fromkeys(tops) if t in names]
        if not columns:
            self.seen_keys = names[:20]
        return columns


class ParquetReader(RowsReader):
    def iter(self) -> Iterator[Record]:
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


class ArrowReader(RowsReader):
    def iter(self) -> Iterator[Record]:
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


class HFReader(RowsReader):
    def iter(self) -> Iterator[Record]:
        yield from self._iter_rows(iter(self.item.handle))
