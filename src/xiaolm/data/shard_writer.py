"""Writing token shards: the format's constants, the encoding worker (raw lines -> token arrays) and the shard writer.

Shared by both engines of ``xiaolm data tokenize``: :mod:`xiaolm.data.shards` (its ``run`` picks the engine) and
:mod:`xiaolm.data.tokenize_datatrove`, which import these from here, so neither imports the other.
"""
from __future__ import annotations

import hashlib
import os
from itertools import chain
from pathlib import Path

import numpy as np

from xiaolm.data.sources import _note_malformed, parse_lines

META_FILE = "meta.json"
FORMAT_VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# ======================================================================================== encoding (workers)

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    # One Rust thread per worker process: the parallelism comes from the processes, and nested thread pools
    # would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from xiaolm.tokenizer import load_tokenizer

    _WORKER["tok"] = load_tokenizer(tokenizer_dir)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_task(task: tuple) -> dict:
    """Worker: raw lines -> one flat token array (each document followed by EOT) plus document lengths."""
    path, kind, field, first_lineno, lines = task
    tok = _WORKER["tok"]
    texts, malformed, empty = parse_lines(path, kind, field, first_lineno, lines)
    # Corpus text is text: a literal "<|endoftext|>" inside a document must not become a document boundary.
    ids = tok.encode_batch(texts, allow_special=False) if texts else []
    eot = tok.eot_id
    for doc in ids:
        doc.append(eot)
    lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(ids), dtype=_WORKER["dtype"], count=total)
    return {
        "tokens": tokens, "lengths": lengths, "malformed": malformed, "empty": empty,
        "chars": sum(len(t) for t in texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
    }


# ============================================================================================= shard writing


class _SplitWriter:
    """Appends documents to ``split_dir/shard_NNNNN.bin``; closes a shard after the document that reaches the
    size target, writing the ``.bin`` under a temporary name and renaming it when its sidecar is written."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int, fingerprint: str):
        self.dir = split_dir
        self.dtype = dtype
        self.shard_tokens = max(1, int(shard_tokens))
        self.fingerprint = fingerprint
        self.index = 0
        self.tokens = 0
        self.documents = 0
        self.shards: list[str] = []
        self._fh = None
        self._shard_tokens = 0
        self._offsets: list[int] = []
        self._sources: list[str] = []

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.dir / f"shard_{self.index:05d}.bin.tmp", "wb")
        self._shard_tokens = 0
        self._hash = hashlib.sha256()
        self._min_id, self._max_id = None, None
        self._offsets = []
        self._sources = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, source: str) -> None:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        doc = 0
        while doc < len(lengths):
            if self._fh is None:
                self._open()
            # Documents [doc, last] go into this shard; `last` is the first one that reaches the target.
            room = self.shard_tokens - self._shard_tokens
            reach = starts[doc] + room
            last = int(np.searchsorted(ends, reach, side="left"))
            last = min(last, len(lengths) - 1)
            lo, hi = int(starts[doc]), int(ends[last])
            self._offsets.extend((starts[doc:last + 1] - lo + self._shard_tokens).tolist())
            self._write(np.ascontiguousarray(tokens[lo:hi], dtype=self.dtype))
            self._shard_tokens += hi - lo
            if source not in self._sources:
                self._sources.append(source)
            doc = last + 1
            if self._shard_tokens >= self.shard_tokens:
                self._close_shard()

    def _write(self, ids: np.ndarray) -> None:
        """Write ids, keeping the shard's checksum and id range for the sidecar (readers check ids cheaply)."""
        data = ids.tobytes()
        self._fh.write(data)
        self._hash.update(data)
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            self._min_id = lo if self._min_id is None else min(self._min_id, lo)
            self._max_id = hi if self._max_id is None else max(self._max_id, hi)

    def _close_shard(self) -> None:
        from xiaolm.utils import atomic_write_json

        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        name = f"shard_{self.index:05d}"
        os.replace(self.dir / f"{name}.bin.tmp", self.dir / f"{name}.bin")
        atomic_write_json(self.dir / f"{name}.json", {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "byte_order": "little",
            "tokens": self._shard_tokens,
            "documents": len(self._offsets),
            "tokenizer_fingerprint": self.fingerprint,
            "min_id": self._min_id,
            "max_id": self._max_id,
            "sha256": self._hash.hexdigest(),
            "sources": self._sources,
            "document_offsets": self._offsets,
        }, indent=None)
        self.shards.append(f"{name}.bin")
        self.tokens += self._shard_tokens
        self.documents += len(self._offsets)
        self.index += 1

    def finish(self) -> None:
        """The final flush: the last, partly filled shard is written too."""
        if self._fh is not None:
            self._close_shard()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            (self.dir / f"shard_{self.index:05d}.bin.tmp").unlink(missing_ok=True)


def add_encoded(writers: dict[str, _SplitWriter], out: Path, dtype: np.dtype, shard_tokens: int, fingerprint: str,
                source, result: dict, stats: dict, split_stats: dict[str, dict]) -> None:
    """File one encoded batch of ``source`` (an ``_encode_task`` result): its documents go to the split's writer
    under ``out`` (opened on first use), its counts into ``stats`` and ``split_stats[split]``."""
    writer = writers.get(source.split)
    if writer is None:
        writer = writers[source.split] = _SplitWriter(out / source.split, dtype, shard_tokens, fingerprint)
    if len(result["lengths"]):
        writer.add(result["tokens"], result["lengths"], str(source.path))
    _note_malformed(stats, result["malformed"])
    for key in ("empty", "chars", "bytes"):
        stats[key] += result[key]
    stats["documents"] += len(result["lengths"])
    split = split_stats.setdefault(source.split, {"chars": 0, "bytes": 0})
    split["chars"] += result["chars"]
    split["bytes"] += result["bytes"]


def shards_meta(tok, dtype: np.dtype, splits: dict[str, dict], stats: dict, sources, workers: int, wall: float,
                engine: str | None = None) -> dict:
    """The content of a shard directory's meta.json: ``splits`` (per split: tokens, documents, shards, chars,
    bytes) and the run's counts in ``stats``, from ``workers`` processes (or tasks) in ``wall`` seconds."""
    total_tokens = sum(s["tokens"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "path": str(Path(tok.path).resolve()) if tok.path else None},
        "dtype": dtype.name,
        "byte_order": "little",
        "eot_id": tok.eot_id,
        "splits": splits,
        "tokens": total_tokens,
        "documents": stats["documents"],
        "chars": stats["chars"],
        "bytes": stats["bytes"],
        "chars_per_token": round(stats["chars"] / max(1, total_tokens - stats["documents"]), 4),
        "empty_documents": stats["empty"],
        "malformed": stats["malformed"],
        "malformed_records": stats["malformed_records"],
        "sources": [{"path": str(s.path), "split": s.split, "kind": s.kind} for s in sources],
        "workers": workers,
        **({"engine": engine} if engine else {}),
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(total_tokens / wall, 1) if wall > 0 else None,
        "mb_per_s": round(stats["bytes"] / 1e6 / wall, 3) if wall > 0 else None,
    }


def _clear_previous_output(out: Path) -> None:
    """Remove shards a previous run left in ``out`` (only files this stage writes)."""
    (out / META_FILE).unlink(missing_ok=True)
    if not out.is_dir():
        return
    for split_dir in out.iterdir():
        if split_dir.is_dir():
            for f in split_dir.glob("shard_*"):
                if f.is_file() and (f.suffix in (".bin", ".json", ".tmp")):
                    f.unlink()


def _init_worker_in_process(tok, dtype: np.dtype) -> None:
    _WORKER["tok"] = tok
    _WORKER["dtype"] = np.dtype(dtype)
