"""``.txt``: one document per line, per blank-line paragraph, per file, or per chapter."""
from __future__ import annotations

from typing import Iterator

from xiaolm.data.readers.base import Reader, Record


class TextReader(Reader):
    def _text_lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text) for every line; bare CR also ends a line. Undecodable lines are reported."""
        for lineno, raw in self._binary_lines():
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = "dropped" if self.options.txt_mode == "line" else "line dropped from its document"
                self.bad(lineno, f"non-UTF-8 bytes: invalid UTF-8 at byte {exc.start + 1} of the line; {where}")
                continue
            if "\r" in line:
                for part in line.split("\r"):
                    yield lineno, part
            else:
                yield lineno, line

    def iter(self) -> Iterator[Record]:
        mode = self.options.txt_mode
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
            if mode == "chapter" and self.options.chapter_re.match(line):
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
            self.log.warn(f"{self.file}: chapter_regex {self.options.chapter_re.pattern!r} matched no line; "
                          "the whole file is one document")
