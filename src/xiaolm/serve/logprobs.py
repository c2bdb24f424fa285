"""Log-probabilities in the two shapes OpenAI's API uses, built from the engine's :class:`TokenLogprob` entries.

Chat (``logprobs: true``, ``top_logprobs: N``)::

    {"content": [{"token": "从", "logprob": -0.3, "bytes": [228, 187, 142],
                  "top_logprobs": [{"token": ..., "logprob": ..., "bytes": [...]}, ...]}, ...], "refusal": null}

Completions (``logprobs: N``, the legacy shape lm-evaluation-harness reads)::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}

A byte-level BPE token may hold part of a character: its ``bytes`` are exact, its ``token`` string shows the
incomplete part as U+FFFD, and ``text_offset`` counts characters of the choice's text (where the token's first
complete character starts).
"""
from __future__ import annotations

import codecs
from typing import Optional

from xiaolm.serve.engine import TokenLogprob
from xiaolm.tokenizer.core import SPECIAL_TOKENS


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


_BYTES_OF = _unicode_to_byte()


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for; a special token (which decoding skips) stands for none."""
    if token < len(SPECIAL_TOKENS):
        return b""
    piece = tokenizer.id_to_token(token) or ""
    return bytes(_BYTES_OF[c] for c in piece) if all(c in _BYTES_OF for c in piece) else piece.encode("utf-8")


def token_text(tokenizer, token: int) -> str:
    if token < len(SPECIAL_TOKENS):
        return SPECIAL_TOKENS[token]
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": logprob,
                "bytes": list(token_bytes(tokenizer, token))}

    # The end-of-turn token a reply stopped at is not content (completions do list it, as OpenAI's legacy API did).
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries if e.token >= len(SPECIAL_TOKENS)], "refusal": None}


class TextOffsets:
    """Character offset of each token in a text that the tokens decode to, fed a few tokens at a time."""

    def __init__(self, start: int = 0):
        self.chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokenizer, tokens: list[int]) -> list[int]:
        offsets = []
        for token in tokens:
            offsets.append(self.chars)
            self.chars += len(self._decoder.decode(token_bytes(tokenizer, token)))
        return offsets


def completion_logprobs(tokenizer, entries: list[Optional[TokenLogprob]], tokens: list[int],
                        offsets: TextOffsets, top_n: int) -> dict:
    """The legacy shape for ``tokens`` (their ``entries``; ``None`` for a first prompt token, which has no
    context and so no log-probability, as OpenAI reports it)."""
    top: list[Optional[dict]] = []
    for e in entries:
        if e is None:
            top.append(None)
        else:
            top.append({token_text(tokenizer, t): lp for t, lp in e.top[:top_n]})
    return {"tokens": [token_text(tokenizer, t) for t in tokens],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets.feed(tokenizer, tokens)}
