"""Log-probabilities in the two shapes OpenAI's API uses, built from the engine's :class:`TokenLogprob` entries.

Chat (``logprobs: true``, ``top_logprobs: N``)::

    {"content": [{"token": "从", "logprob": -0.3, "bytes": [228, 187, 142],
                  "top_logprobs": [{"token": ..., "logprob": ..., "bytes": [...]}, ...]}, ...], "refusal": null}

Completions (``logprobs: N``, the legacy shape lm-evaluation-harness reads)::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}

A byte-level BPE token may hold part of a character: its ``bytes`` are exact, its ``token`` string shows the
incomplete part as U+FFFD, and ``text_offset`` counts characters of the choice's text (where the token's first
complete character starts; broken characters are dropped from the text, ``xiaolm.tokenizer.detok``).
"""
from __future__ import annotations

from typing import Optional

from xiaolm.serve.request import TokenLogprob
from xiaolm.tokenizer.core import SPECIAL_TOKENS
from xiaolm.tokenizer.detok import Detokenizer, token_bytes


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
        self._detok = None  # the choice's own detokenizer rule, so offsets count the characters its text has

    def feed(self, tokenizer, tokens: list[int]) -> list[int]:
        if self._detok is None:
            self._detok = Detokenizer(tokenizer)
        offsets = []
        for token in tokens:
            offsets.append(self.chars)
            self.chars += len(self._detok.push(token))
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
