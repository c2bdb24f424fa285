"""``xiaolm tokenizer train``: byte-level BPE on a corpus, saved as a Hugging Face tokenizer directory.

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
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from xiaolm.config import opt
from xiaolm.tokenizer.core import SPECIAL_TOKENS, XTokenizer

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


@dataclass
class TokenizerTrainConfig:
    inputs: list[str] = opt([], "prepared corpus directories (train.jsonl is trained on, val.jsonl measured) "
                                "or .jsonl/.txt files")
    out: str = opt("", "output tokenizer directory (loads with transformers.AutoTokenizer)")
    vocab_size: int = opt(8192, "vocabulary size, special tokens and the 256 byte tokens included")
    field: str = opt("text", "JSON field holding the text in .jsonl inputs (dotted path allowed)")
    min_frequency: int = opt(2, "a pair must occur this often to be merged")
    max_token_length: int = opt(16, "longest token, in bytes (a Han character is 3 bytes); 0 = no limit")
    max_chunk_chars: int = opt(32, "training only: longest piece of text counted as one word")
    max_train_mb: float = opt(100.0, "train on at most this many MB of text; a larger corpus is sampled evenly by "
                                     "document hash (BPE training needs ~85 bytes of RAM per byte of Chinese text); "
                                     "0 = no limit")
    max_eval_chars: int = opt(5_000_000, "characters of held-out text used to measure characters per token")
    split: str = opt("train", "split name for inputs that are not a prepared corpus directory")
    progress: bool = opt(True, "show progress bars")


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 8192, **options) -> XTokenizer:
    """Train on ``inputs`` and save to ``out_dir``. Options: the fields of ``TokenizerTrainConfig``."""
    cfg = TokenizerTrainConfig(inputs=[str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)],
                               out=str(out_dir), vocab_size=int(vocab_size), **options)
    return run(cfg)


def run(cfg: TokenizerTrainConfig) -> XTokenizer:
    from tokenizers import pre_tokenizers, trainers

    from xiaolm.config import save_config
    from xiaolm.data.sources import iter_documents, resolve_inputs
    from xiaolm.utils import log, stable_hash

    minimum = len(SPECIAL_TOKENS) + 256
    if cfg.vocab_size <= minimum:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens and "
                         f"256 byte tokens need {minimum}, and merges need more")
    if cfg.vocab_size > 1 << 20:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is unreasonably large for a small model")
    if not cfg.out:
        raise ValueError("no output directory given (--out TOKDIR)")
    sources = resolve_inputs(cfg.inputs, split=cfg.split)  # errors before any work
    train_sources = [s for s in sources if s.split != "val"]
    eval_sources = [s for s in sources if s.split == "val"]
    if not train_sources:
        raise ValueError("no training text: the inputs hold only validation files (val.jsonl)")

    train_stats: dict = {}
    budget = int(cfg.max_train_mb * 1e6) if cfg.max_train_mb and cfg.max_train_mb > 0 else 0
    keep = sampling_fraction(train_sources, budget)
    used = {"documents": 0, "chars": 0, "bytes": 0, "chunks": 0}

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for _source, text in iter_documents(train_sources, cfg.field, stats=train_stats):
            # Unlike English, Chinese text has few repeated "words" for BPE's count table to merge, so training
            # memory grows with the text itself: a large corpus is sampled evenly (by hash, deterministic) and cut
            # off at the budget rather than read up to the budget from its first file.
            if keep < 1.0 and (stable_hash(text) % 1_000_000) >= keep * 1_000_000:
                continue
            used["documents"] += 1
            used["chars"] += len(text)
            used["bytes"] += len(text.encode("utf-8"))
            batch.extend(training_chunks(text, cfg.max_chunk_chars))
            if len(batch) >= 2048:
                used["chunks"] += len(batch)
                yield batch
                batch = []
            if budget and used["bytes"] >= budget:
                break
        if batch:
            used["chunks"] += len(batch)
            yield batch

    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        show_progress=cfg.progress,
        special_tokens=list(SPECIAL_TOKENS),  # added first, so they get ids 0..7
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        max_token_length=cfg.max_token_length or None,
    )
    tok = _build_tokenizer()
    started = time.perf_counter()
    tok.train_from_iterator(batches(), trainer=trainer)
    train_wall = time.perf_counter() - started
    if used["documents"] == 0:
        raise ValueError(f"no documents found in {', '.join(str(s.path) for s in train_sources)} "
                         f"(field {cfg.field!r}; malformed: {train_stats.get('malformed', 0)})")
    xtok = XTokenizer(tok)
    if xtok.vocab_size < cfg.vocab_size:
        log(f"tokenizer: the corpus supports only {xtok.vocab_size} tokens of the {cfg.vocab_size} asked for "
            f"(no pair left occurring {cfg.min_frequency}+ times); use more text or a smaller --vocab-size")

    evaluation = measure_chars_per_token(xtok, eval_sources or train_sources, cfg.field, cfg.max_eval_chars)
    evaluation["measured_on"] = "val" if eval_sources else "train (no validation split given)"
    info = {
        "format": "xiaolm-tokenizer",
        "format_version": 1,
        "model": "byte-level BPE",
        "pre_tokenizer": "gpt-2",
        "requested_vocab_size": cfg.vocab_size,
        "training": {
            "documents": used["documents"],
            "chars": used["chars"],
            "bytes": used["bytes"],
            "chunks": used["chunks"],
            "documents_read": train_stats["documents"],
            "sampled_fraction": round(keep, 6),
            "budget_reached": bool(budget and used["bytes"] >= budget),
            "empty_documents": train_stats["empty"],
            "malformed": train_stats["malformed"],
            "malformed_records": train_stats["malformed_records"],
            "sources": [str(s.path) for s in train_sources],
            "min_frequency": cfg.min_frequency,
            "max_token_length": cfg.max_token_length,
            "max_chunk_chars": cfg.max_chunk_chars,
            "wall_time_s": round(train_wall, 3),
        },
        "eval": evaluation,
    }
    out = Path(cfg.out)
    xtok.save(out, extra_info=info)
    save_config(cfg, out / "config.yaml")
    return xtok


def sampling_fraction(sources, budget_bytes: int) -> float:
    """Share of documents to keep so that about ``budget_bytes`` of text are read from ``sources`` (estimated from
    file sizes: JSON overhead is small for Chinese text; gzip is taken as 3x). 1.0 when all fits."""
    if not budget_bytes:
        return 1.0
    total = sum(s.path.stat().st_size * (3 if s.path.name.lower().endswith(".gz") else 1) for s in sources)
    if total <= budget_bytes:
        return 1.0
    return min(1.0, 1.1 * budget_bytes / total)  # a little over, so the budget and not the sample ends training


def measure_chars_per_token(tok: XTokenizer, sources, field: str, max_chars: int) -> dict:
    """Characters (and UTF-8 bytes) per token over up to ``max_chars`` characters of ``sources``' documents."""
    from xiaolm.data.sources import iter_documents

    docs = chars = nbytes = tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens
        tokens += sum(len(ids) for ids in tok.encode_batch(batch, allow_special=False))
        batch.clear()

    for _source, text in iter_documents(sources, field):
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


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail, log

    cfg, _ = parse_config(
        TokenizerTrainConfig, argv, prog="xiaolm tokenizer train",
        description="Train a byte-level BPE tokenizer (lossless for any Unicode text) on a corpus.\n\n"
                    "Special tokens take ids 0-7: <|endoftext|>, <|im_start|>, <|im_end|>, <|reserved_0..4|>.\n"
                    "The output directory loads with transformers.AutoTokenizer and carries a ChatML template.",
        positionals={"inputs": "DIR_OR_FILES"},
        epilog="example:\n  xiaolm tokenizer train prepared/ --vocab-size 8192 --out tok/",
    )
    try:
        tok = run(cfg)
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        raise fail(str(exc)) from None
    training, evaluation = tok.info["training"], tok.info["eval"]
    sampled = (f", an even {training['sampled_fraction']:.1%} sample (--max-train-mb {cfg.max_train_mb:g})"
               if training["sampled_fraction"] < 1 or training["budget_reached"] else "")
    log(f"tokenizer: trained on {training['documents']:,} documents ({training['chars']:,} chars{sampled}) in "
        f"{training['wall_time_s']:.1f} s; vocab {tok.vocab_size}, fingerprint {tok.fingerprint}")
    log(f"tokenizer: {evaluation['chars_per_token']} chars/token ({evaluation['bytes_per_token']} bytes/token) on "
        f"{evaluation['chars']:,} chars of {evaluation['measured_on']} text")
    if training["malformed"]:
        log(f"tokenizer: {training['malformed']} malformed record(s) skipped, listed in {cfg.out}/xiaolm_tokenizer.json")
    log(f"tokenizer: saved to {cfg.out}")
    print(cfg.out)
    return 0
