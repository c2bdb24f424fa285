"""Token ids to text, one token at a time, never showing half a character.

A byte-level BPE token stands for bytes, not characters: a Han character is three UTF-8 bytes and a token may hold
one or two of them, the rest coming in the next token. Decoding a prefix of a generation with ``errors="replace"``
therefore shows U+FFFD where the model will still complete the character ("小美拿着小�"). ``Detokenizer`` keeps the
bytes of every token, emits only whole characters and holds an incomplete tail back until it completes:

- ``push(id) -> str``: the text this token completes ("" while a character is still open);
- a byte that can never complete the open sequence (a new start byte, ASCII, an impossible continuation) drops the
  open bytes: they are counted in ``dropped_bytes`` / ``dropped_chars``, never printed as U+FFFD;
- ``finish() -> int``: drops an incomplete tail at the end (the model stopped inside a character) and returns how
  many bytes it dropped.

This is llama.cpp's rule (its server holds an incomplete UTF-8 tail back and drops a partial character when the
generation ends). The whole text equals ``bytes.decode("utf-8", errors="ignore")`` of all the tokens' bytes, and
streamed pieces concatenate to it; ``tests/test_detok.py`` checks both with forced splits. Special tokens stand for
no bytes (they are skipped, as ``decode(..., skip_special_tokens=True)`` does).
"""
from __future__ import annotations

import json
from typing import Iterable


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


BYTE_OF_CHAR = _unicode_to_byte()


def _uses_byte_level(tok) -> bool:
    """Whether a ``tokenizers.Tokenizer`` decodes with ByteLevel (GPT-2 style pieces), alone or in a sequence."""
    try:
        decoder = json.loads(tok.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or [] if isinstance(d, dict)]
    return "ByteLevel" in kinds


def byte_table(tokenizer) -> list[bytes]:
    """The bytes each id stands for (special tokens: none), computed once per tokenizer object.

    ByteLevel pieces map back through the GPT-2 alphabet; other tokenizers' byte-fallback pieces ``<0xHH>`` are that
    byte, a SentencePiece ``▁`` is a space, and any other piece is its own decoded text."""
    table = getattr(tokenizer, "_xiaolm_byte_table", None)
    if table is not None:
        return table
    tok = tokenizer.tok
    size = tok.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = _uses_byte_level(tok)
    table = []
    for i in range(size):
        piece = tok.id_to_token(i)
        if i in special or piece is None:
            table.append(b"")
        elif byte_level and all(c in BYTE_OF_CHAR for c in piece):
            table.append(bytes(BYTE_OF_CHAR[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        elif "▁" in piece:
            table.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            table.append(tok.decode([i], skip_special_tokens=True).encode("utf-8"))
    tokenizer._xiaolm_byte_table = table
    return table


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes one token stands for (none for a special token or an id outside the vocabulary)."""
    table = byte_table(tokenizer)
    return table[token] if 0 <= token < len(table) else b""


class Detokenizer:
    """Incremental byte-level detokenizer: feed ids, get completed text (see the module docstring)."""

    def __init__(self, tokenizer):
        self.table = byte_table(tokenizer)
        self.pending = b""          # bytes of a character still open
        self.dropped_bytes = 0      # bytes that never became a character (dropped, not shown)
        self.dropped_chars = 0      # how many broken sequences those were

    def push(self, token: int) -> str:
        if 0 <= token < len(self.table):
            self.pending += self.table[token]
        return self._drain(final=False)

    def feed(self, tokens: Iterable[int]) -> str:
        return "".join(self.push(t) for t in tokens)

    def finish(self) -> int:
        """Drop an incomplete tail (the generation ended inside a character); returns the bytes it dropped."""
        before = self.dropped_bytes
        self._drain(final=True)
        return self.dropped_bytes - before

    def _drain(self, final: bool) -> str:
        buf, out = self.pending, []
        while buf:
            try:
                out.append(buf.decode("utf-8"))
                buf = b""
            except UnicodeDecodeError as exc:
                out.append(buf[:exc.start].decode("utf-8"))
                if not final and exc.reason == "unexpected end of data" and exc.end == len(buf):
                    buf = buf[exc.start:]   # the next token may complete it: hold it back
                    break
                self.dropped_bytes += exc.end - exc.start
                self.dropped_chars += 1
                buf = buf[exc.end:]
        self.pending = buf
        return "".join(out)


def decode_clean(tokenizer, ids: Iterable[int]) -> tuple[str, int]:
    """The whole text of ``ids`` with broken characters dropped, and how many bytes were dropped."""
    detok = Detokenizer(tokenizer)
    text = detok.feed(int(i) for i in ids)
    detok.finish()
    return text, detok.dropped_bytes
