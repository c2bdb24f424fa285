"""``xiaolm tokenizer train``: byte-level BPE (``xiaolm.tokenizer.train``) trained on a corpus read by the data layer,
saved as a Hugging Face tokenizer directory.

The inputs are those of ``xiaolm data tokenize`` (``xiaolm.data.sources``): prepared corpus directories (train.jsonl
is trained on, val.jsonl measured) or .jsonl/.txt files. A corpus larger than ``--max-train-mb`` is sampled evenly
by document hash, since BPE training memory grows with the text (see ``xiaolm.tokenizer.train``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from xiaolm.config import opt
from xiaolm.tokenizer.core import XTokenizer


@dataclass
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer (lossless for any Unicode text) on a corpus.

    Special tokens take ids 0-7: <|endoftext|>, <|im_start|>, <|im_end|>, <|reserved_0..4|>; then 8-13 the
    thinking / tool markers (<think> ... </tool_response>).
    The output directory loads with transformers.AutoTokenizer and carries a ChatML template.
    """

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


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 8192, **options) -> XTokenizer:
    """Train on ``inputs`` and save to ``out_dir``. Options: the fields of ``TokenizerTrainConfig``."""
    cfg = TokenizerTrainConfig(inputs=[str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)],
                               out=str(out_dir), vocab_size=int(vocab_size), **options)
    return run(cfg)


def run(cfg: TokenizerTrainConfig) -> XTokenizer:
    from xiaolm.config import save_config
    from xiaolm.data.sources import iter_documents, resolve_inputs
    from xiaolm.tokenizer.train import check_vocab_size, measure_chars_per_token, train_bpe
    from xiaolm.utils import log, stable_hash

    check_vocab_size(cfg.vocab_size)
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
    used = {"documents": 0, "chars": 0, "bytes": 0}

    def documents() -> Iterator[str]:
        for _source, text in iter_documents(train_sources, cfg.field, stats=train_stats):
            # Unlike English, Chinese text has few repeated "words" for BPE's count table to merge, so training
            # memory grows with the text itself: a large corpus is sampled evenly (by hash, deterministic) and cut
            # off at the budget rather than read up to the budget from its first file.
            if keep < 1.0 and (stable_hash(text) % 1_000_000) >= keep * 1_000_000:
                continue
            used["documents"] += 1
            used["chars"] += len(text)
            used["bytes"] += len(text.encode("utf-8"))
            yield text
            if budget and used["bytes"] >= budget:
                break

    xtok, trained = train_bpe(documents(), cfg.vocab_size, cfg.min_frequency, cfg.max_token_length,
                              cfg.max_chunk_chars, cfg.progress)
    if used["documents"] == 0:
        raise ValueError(f"no documents found in {', '.join(str(s.path) for s in train_sources)} "
                         f"(field {cfg.field!r}; malformed: {train_stats.get('malformed', 0)})")
    if xtok.vocab_size < cfg.vocab_size:
        log(f"tokenizer: the corpus supports only {xtok.vocab_size} tokens of the {cfg.vocab_size} asked for "
            f"(no pair left occurring {cfg.min_frequency}+ times); use more text or a smaller --vocab-size")

    eval_texts = (text for _source, text in iter_documents(eval_sources or train_sources, cfg.field))
    evaluation = measure_chars_per_token(xtok, eval_texts, cfg.max_eval_chars)
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
            "chunks": trained["chunks"],
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
            "wall_time_s": round(trained["wall_time_s"], 3),
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


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail, log

    cfg, _ = parse_config(
        TokenizerTrainConfig, argv, prog="xiaolm tokenizer train",
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
