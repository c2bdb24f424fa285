"""Character encodings of text inputs: Chinese corpora often arrive in GB18030/GBK or UTF-16.

``open_utf8`` decides how to read a file: a byte-order mark wins, then the encoding asked for (``--encoding``),
else (``auto``) UTF-8 unless most of the non-ASCII bytes in the first 64 KB are not UTF-8 and charset-normalizer
finds a Chinese or Unicode encoding in them (a UTF-8 file with a few bad lines stays UTF-8 and loses those lines,
counted). GBK and GB2312 are read as GB18030, their superset. ``RecodedStream`` turns the file into UTF-8 bytes as
it is read, so every reader goes on working on UTF-8 lines; a byte the encoding cannot decode passes through
unchanged and so still drops (and counts) only its own line or record.
"""
from __future__ import annotations

import codecs
import io
import re
import zlib

SAMPLE_BYTES = 1 << 16
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_SUPERSETS = {"gbk": "gb18030", "gb2312": "gb18030", "ascii": "utf-8"}
# What a detection may switch a Chinese corpus to; anything else it guesses (cp1250 for a few stray bytes) is
# less likely than a UTF-8 file with some bad lines.
DETECTABLE = ("gb18030", "big5", "big5hkscs", "hz", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
              "utf-32-be")
_ESCAPED = re.compile("[\udc80-\udcff]")
_READ_ERRORS = (EOFError, OSError, zlib.error)


def normalise_encoding(name: str) -> str:
    """The codec's canonical name (``GBK`` -> ``gb18030``, ``UTF8`` -> ``utf-8``); LookupError for an unknown one."""
    canonical = codecs.lookup(name).name  # e.g. 'utf-8', 'gbk', 'utf-16-le'
    return _SUPERSETS.get(canonical, canonical)


def _mostly_utf8(sample: bytes, complete: bool) -> bool:
    if not complete:  # a character cut by the end of the sample is not an error
        sample = sample[: len(sample) - 3] + sample[len(sample) - 3:].rstrip(bytes(range(0x80, 0x100)))
    bad = len(_ESCAPED.findall(sample.decode("utf-8", errors="surrogateescape")))
    if bad == 0:
        return True
    non_ascii = sum(1 for b in sample if b >= 0x80)
    return b"\x00" not in sample and bad < 0.3 * non_ascii


def detect_encoding(sample: bytes, complete: bool = False) -> str:
    """The encoding of a file that starts with ``sample`` (``complete``: the sample is the whole file)."""
    for bom, name in _BOMS:
        if sample.startswith(bom):
            return name
    if _mostly_utf8(sample, complete):
        return "utf-8"
    from charset_normalizer import from_bytes

    best = from_bytes(sample).best()
    found = normalise_encoding(best.encoding) if best is not None else None
    if found in DETECTABLE:
        return found
    # charset-normalizer gives up on a sample with a few bytes no encoding decodes: GB18030 still wins when it
    # leaves a tenth of UTF-8's undecodable bytes or fewer (the bad lines are then counted)
    bad = {enc: len(_ESCAPED.findall(sample.decode(enc, errors="surrogateescape"))) for enc in ("utf-8", "gb18030")}
    return "gb18030" if bad["gb18030"] * 10 <= bad["utf-8"] else "utf-8"


def open_utf8(raw, asked: str = "auto"):
    """(stream, encoding): a buffered binary stream of the UTF-8 bytes of ``raw`` (a binary file), read in the
    encoding its byte-order mark names, else ``asked``, else (``auto``) the one detected from its first 64 KB."""
    head, error = b"", None
    try:  # small reads: a damaged gzip stream still gives what came before the damage
        while len(head) < SAMPLE_BYTES:
            chunk = raw.read(4096)
            if not chunk:
                break
            head += chunk
    except _READ_ERRORS as exc:
        if not head:
            raise
        error = exc
    encoding, skip = None, 0
    for bom, name in _BOMS:
        if head.startswith(bom):
            encoding, skip = name, len(bom)
            break
    if encoding is None:
        encoding = normalise_encoding(asked) if asked != "auto" else detect_encoding(
            head, complete=len(head) < SAMPLE_BYTES)
    return io.BufferedReader(RecodedStream(raw, encoding, head[skip:], error), SAMPLE_BYTES), encoding


class RecodedStream(io.RawIOBase):
    """UTF-8 bytes read from ``raw`` (after ``head``, bytes already read from it) in ``encoding``; UTF-8 passes
    through as it is."""

    def __init__(self, raw, encoding: str, head: bytes = b"", error: BaseException | None = None):
        super().__init__()
        self.raw = raw
        self.decoder = None if encoding == "utf-8" else codecs.getincrementaldecoder(encoding)(
            errors="surrogateescape")
        self.head = head
        self.error = error  # met while reading ``head``: raised once ``head`` is used up
        self.pending = b""
        self.done = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        if self.head:
            chunk, self.head = self.head, b""
        elif self.error is not None:
            raise self.error
        else:
            chunk = self.raw.read(SAMPLE_BYTES)
        self.done = not chunk
        if self.decoder is None:
            return chunk
        return self.decoder.decode(chunk, final=self.done).encode("utf-8", errors="surrogateescape")

    def readinto(self, buffer) -> int:
        while not self.pending and not self.done:
            self.pending = self._next_chunk()
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()
