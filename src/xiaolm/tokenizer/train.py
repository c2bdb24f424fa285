"""Byte-level BPE trained on texts (``xiaolm tokenizer train`` runs it on a corpus, saved as a Hugging Face tokenizer
directory).

The model is GPT-2-style byte-level BPE from Hugging Face ``tokenizers``: the GPT-2 pre-tokenizer regex
(``ByteLevel(add_prefix_space=False, use_regex=True)``, which GGUF export declares to llama.cpp as ``gpt-2``), no
normaliser, all 256 bytes in the initial alphabet and the ByteLevel decoder, so every Unicode string encodes and
decodes back to itself exactly.

Chinese needs one guard. It has no spaces, so the GPT-2 regex makes each run of Han characters between two
punctuation marks a single "word", and BPE training keeps a count table of every distinct word with its symbols;
on long unpunctuated text (classical Chinese, stripped web text) that table grows like the corpus itself. The
training iterator therefore cuts text into sentences and clauses at Chinese and ASCII punctuation and newlines and
caps each piece at ``max_chunk_chars`` characters, and ``max_token_length`` caps how many bytes a learnt token may
span. The cut only shapes the training statistics; encoding never cuts anything. Training streams the corpus.

Measured with tokenizers 0.23 (vocab 8,192, 23 MB of real Chinese text): peak memory is about 85 bytes per byte of
training text whether or not the text is cut, because Chinese clauses rarely repeat, so BPE's word table holds the
whole text either way. The cut mainly keeps pathological unpunctuated lines from becoming huge words; what bounds
memory is ``max_train_mb``: a corpus larger than that is sampled evenly by document hash (a tokenizer needs far less
text than pretraining does).

This module trains on texts; reading a corpus for it (inputs, sampling, the ``xiaolm tokenizer train`` verb) is
``xiaolm.data.vocab``'s, since the tokenizer sits below the data layer.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Iterable, Iterator

from xiaolm.tokenizer.core import TRAINED_SPECIAL_TOKENS, XTokenizer

# Sentence and clause ends: Chinese full-width and ASCII punctuation, closing quotes/brackets, newlines.
_SEPARATORS = "\n\r。！？；，、：…!?;,:.\u3000”’」』）)》"
_CHUNK_RE = re.compile(f"[^{re.escape(_SEPARATORS)}]*[{re.escape(_SEPARATORS)}]+|[^{re.escape(_SEPARATORS)}]+")


def training_chunks(text: str, max_chunk_chars: int) -> Iterator[str]:
    """Cut ``text`` after each run of punctuation/newlines, then into pieces of at most ``max_chunk_chars``.
    The pieces concatenate back to ``text``."""
    for match in _CHUNK_RE.finditer(text):
        piece = match.group()
        if len(piece) <= max_chunk_chars:
            yield piece
        else:
            for i in range(0, len(piece), max_chunk_chars):
                yield piece[i:i + max_chunk_chars]


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def check_vocab_size(vocab_size: int) -> None:
    minimum = len(TRAINED_SPECIAL_TOKENS) + 256
    if vocab_size <= minimum:
        raise ValueError(f"--vocab-size {vocab_size} is too small: {len(TRAINED_SPECIAL_TOKENS)} special tokens and "
                         f"256 byte tokens need {minimum}, and merges need more")
    if vocab_size > 1 << 20:
        raise ValueError(f"--vocab-size {vocab_size} is unreasonably large for a small model")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_token_length: int = 16,
              max_chunk_chars: int = 32, progress: bool = True) -> tuple[XTokenizer, dict]:
    """Train byte-level BPE on ``texts`` (documents, streamed once); returns the tokenizer and
    ``{"chunks", "wall_time_s"}``. Reading, sampling and saving a corpus is ``xiaolm.data.vocab``'s."""
    from tokenizers import pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    used = {"chunks": 0}

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in texts:
            batch.extend(training_chunks(text, max_chunk_chars))
            if len(batch) >= 2048:
                used["chunks"] += len(batch)
                yield batch
                batch = []
        if batch:
            used["chunks"] += len(batch)
            yield batch

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # the Rust progress bars print a bare newline per stage where there is no terminal to draw on
        show_progress=progress and sys.stdout.isatty() and sys.stderr.isatty(),
        special_tokens=list(TRAINED_SPECIAL_TOKENS),  # added first: ids 0..7, then the markers 8..13
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        max_token_length=max_token_length or None,
    )
    tok = _build_tokenizer()
    started = time.perf_counter()
    tok.train_from_iterator(batches(), trainer=trainer)
    return XTokenizer(tok), {"chunks": used["chunks"], "wall_time_s": time.perf_counter() - started}


def measure_chars_per_token(tok: XTokenizer, texts: Iterable[str], max_chars: int) -> dict:
    """Characters (and UTF-8 bytes) per token over up to ``max_chars`` characters of ``texts`` (documents)."""
    docs = chars = nbytes = tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens
        tokens += sum(len(ids) for ids in tok.encode_batch(batch, allow_special=False))
        batch.clear()

    for text in texts:
        batch.append(text)
        docs += 1
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
        if len(batch) >= 1024:
            flush()
        if max_chars and chars >= max_chars:
            break
    if batch:
        flush()
    return {
        "documents": docs, "chars": chars, "bytes": nbytes, "tokens": tokens,
        "chars_per_token": round(chars / tokens, 4) if tokens else None,
        "bytes_per_token": round(nbytes / tokens, 4) if tokens else None,
    }


