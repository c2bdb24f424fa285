"""``xiaolm eval ppl``: loss, perplexity and bits per character of a model on text or token shards.

Bits per character (and per UTF-8 byte) do not depend on the tokenizer, so they compare models with different
vocabularies, which per-token loss and perplexity cannot.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from xiaolm.config import opt, parse_config
from xiaolm.utils import atomic_write_json, fail, pick_device


@dataclass
class PplConfig:
    """Loss, perplexity and bits per character (tokenizer-independent) on text or token shards."""

    run: str = opt(None, "RUNDIR, checkpoint, quantised or Hugging Face directory")
    data: list[str] = opt([], "token shard directory, prepared corpus directory, or .jsonl/.txt files",
                          required="--data is required (token shards, a prepared corpus, or .jsonl/.txt files)")
    out: Optional[str] = opt(None, "write the result as JSON here")
    split: str = opt("val", "split to read from a shard or prepared directory (falls back to train)")
    field: str = opt("text", "JSON field holding the text in .jsonl inputs")
    max_tokens: int = opt(1_000_000, "evaluate at most this many tokens")
    seq_len: Optional[int] = opt(None, "window length (default: the model's context)")
    batch_size: int = opt(8, "windows per forward pass")
    doc_mask: bool = opt(True, "score each document on its own, as text is generated (attention and positions "
                               "restart after every end-of-text); --no-doc-mask lets a window see the documents "
                               "before it, as a model pretrained with --no-doc-mask was trained")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    by_position: int = opt(0, "also report bits/char in position buckets of this many tokens (e.g. 256), on windows "
                              "cut from documents longer than --seq-len (long-context check; 0: off)")
    rope_scaling: Optional[str] = opt(None, "evaluate with this RoPE scaling added, no training (linear, dynamic, yarn, "
                                            "llama3); the context becomes --seq-len")
    rope_factor: Optional[float] = opt(None, "its factor (default: --seq-len / the model's context)")


def token_stream(data: list[str], tokenizer, split: str, field: str, max_tokens: int) -> tuple[np.ndarray, str]:
    """Tokens to evaluate (each document followed by end-of-text), and a description of where they came from."""
    first = Path(data[0])
    if len(data) == 1 and (first / "meta.json").is_file():
        from xiaolm.data.shards import TokenShards

        meta_splits = TokenShards(first, "train").meta.get("splits", {})
        use = split if split in meta_splits else "train"
        shards = TokenShards(first, use, expect_fingerprint=tokenizer.fingerprint)
        n = min(shards.num_tokens, max_tokens + 1)
        return shards.read(0, n), f"{first} ({use} split, {n} tokens)"
    from xiaolm.data.sources import iter_documents, resolve_inputs

    sources = resolve_inputs(data)
    splits = {s.split for s in sources}
    wanted = [split] if split in splits else None
    ids: list[int] = [tokenizer.eot_id]
    for _src, text in iter_documents(sources, field=field, splits=wanted):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_id)
        if len(ids) > max_tokens + 1:
            break
    return np.asarray(ids[: max_tokens + 1], dtype=np.int64), ", ".join(str(s.path) for s in sources)


def evaluate_ppl(model, tokenizer, tokens: np.ndarray, seq_len: int, batch_size: int, doc_mask: bool = True) -> dict:
    """Each document scored on its own by default: pretraining's default (``--doc-mask``) trains exactly that way,
    and a model trained so has never seen a previous document in its window (it scores far worse if shown one)."""
    from xiaolm.eval.loss import StreamEvaluator

    seq_len = min(seq_len, len(tokens) - 1)
    return StreamEvaluator(tokens, tokenizer, seq_len, batch_size, doc_mask=doc_mask)(model)


def main(argv: list[str]) -> int:
    from xiaolm.model.io import load_model

    cfg, _ = parse_config(PplConfig, argv, "xiaolm eval ppl", positionals={"run": "RUNDIR"})
    # a CheckpointError is an XiaolmError: the CLI prints it as one line
    model, tokenizer, info = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    try:
        tokens, where = token_stream(cfg.data, tokenizer, cfg.split, cfg.field, cfg.max_tokens)
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        raise fail(str(exc))
    if len(tokens) < 2:
        raise fail(f"{where}: no text to evaluate")
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    if cfg.by_position < 0:
        raise fail(f"--by-position must be >= 0, got {cfg.by_position}")
    from xiaolm.eval.context import apply_eval_scaling, bits_per_char_by_position, long_windows

    apply_eval_scaling(model, seq_len, cfg.rope_scaling, cfg.rope_factor)
    buckets = None
    if cfg.by_position:
        try:
            windows = long_windows(tokens, tokenizer.eot_id, seq_len)
        except ValueError as exc:
            raise fail(f"{where}: {exc}") from None
        buckets = bits_per_char_by_position(model, tokenizer, windows, cfg.by_position, cfg.batch_size)
    result = evaluate_ppl(model, tokenizer, tokens, seq_len, cfg.batch_size, cfg.doc_mask)
    result = {"model": str(info.path), "data": where, "loss": result["val_loss"], "perplexity": result["val_ppl"],
              "bits_per_char": result["val_bpc"], "bits_per_byte": result["val_bpb"], "tokens": result["val_tokens"],
              "chars_per_token": result["chars_per_token"], "seq_len": min(seq_len, len(tokens) - 1),
              "doc_mask": cfg.doc_mask, "rope_scaling": model.config.rope_scaling}
    if buckets is not None:
        result["by_position"] = {"windows": len(windows), "buckets": buckets}
    if cfg.out:
        atomic_write_json(cfg.out, result)
    print(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_char']:.4f} bits/char, {result['bits_per_byte']:.4f} bits/byte "
          f"over {result['tokens']:,} tokens of {where}", file=sys.stdout)
    for b in buckets or []:
        print(f"  positions {b['start']:>5}-{b['end']:<5} {b['bits_per_char']:.4f} bits/char", file=sys.stdout)
    return 0
