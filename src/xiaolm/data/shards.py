"""Token shards: documents encoded in parallel into flat, memory-mapped token files, and the reader that
pretraining uses.

``xiaolm data tokenize DIR_OR_FILES... --tokenizer TOKDIR --out SHARDDIR`` writes::

    SHARDDIR/meta.json                    tokenizer fingerprint, dtype, per-split token/document counts, sources
    SHARDDIR/{split}/shard_NNNNN.bin      raw little-endian uint16 (vocab <= 65,536) or uint32 token ids
    SHARDDIR/{split}/shard_NNNNN.json     sidecar: dtype, tokens, documents, document offsets, fingerprint, sources

Every document ends with ``<|endoftext|>`` (id 0). A document never spans two shards: a shard closes after the
document that takes it past ``--shard-tokens``, so a document's tokens are ``bin[offset_i : offset_{i+1}]``.

How the work is split: the main process only reads raw lines and writes shard files; worker processes (one
tokenizer each, loaded once) parse the lines, encode a whole batch with the Rust ``encode_batch`` and return one
numpy array per batch. Batches are formed from the input alone and results are written in submission order, so the
shards are byte-identical for any number of workers. At most a few batches per worker are in flight: the corpus is
streamed, never held in memory.

Inputs: ``xiaolm.data.sources`` (the readers shared with tokenizer training and ``xiaolm eval ppl``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from xiaolm.config import opt
from xiaolm.data.shard_writer import _WORKER, META_FILE, _clear_previous_output, _encode_task, \
    _init_worker, _init_worker_in_process, _SplitWriter, add_encoded, dtype_for_vocab, \
    shards_meta
from xiaolm.data.sources import TextSource, _note_malformed, input_batches, resolve_inputs


def default_workers() -> int:
    """All the cores this process may run on (respects CPU affinity and container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ================================================================================================ the stage


@dataclass
class TokenizeConfig:
    """Encode documents into memory-mapped token shards, in parallel.

    Each document ends with <|endoftext|>; shards are uint16 when the vocabulary fits, else
    uint32, each with a JSON sidecar (tokens, documents, offsets, tokenizer fingerprint).
    """

    inputs: list[str] = opt([], "prepared corpus directories (train.jsonl/val.jsonl) or .jsonl/.txt files")
    tokenizer: str = opt("", "tokenizer directory made by `xiaolm tokenizer train`")
    out: str = opt("", "output directory for meta.json and SPLIT/shard_NNNNN.bin files")
    workers: int = opt(0, "encoding processes; 0 = all cores")
    shard_tokens: int = opt(100_000_000, "close a shard after the document that takes it past this many tokens")
    batch_size: int = opt(1024, "documents (lines) per batch sent to a worker")
    field: str = opt("text", "JSON field holding the text in .jsonl inputs (dotted path allowed)")
    split: str = opt("train", "split name for inputs that are not a prepared corpus directory")
    progress: bool = opt(True, "show a progress bar")
    engine: str = opt("xiaolm", "xiaolm: this process and its workers; datatrove: --tasks datatrove tasks, each "
                                "encoding an equal byte range of the inputs into its own shards, merged into one "
                                "split in input order")
    tasks: int = opt(4, "datatrove engine: parallel tasks")
    executor: str = opt("local", "datatrove engine: local, slurm or ray")
    slurm_partition: str = opt("", "datatrove engine, slurm executor: partition to submit to")
    slurm_time: str = opt("24:00:00", "datatrove engine, slurm executor: time limit per task")


def tokenize_to_shards(inputs: Sequence[str | Path], tokenizer_dir, out_dir: str | Path,
                       workers: int | None = None, **options) -> dict:
    """Encode ``inputs`` with the tokenizer in ``tokenizer_dir`` into shards under ``out_dir``.

    Returns the report that is also written to ``out_dir/meta.json``. Options: the fields of ``TokenizeConfig``.
    """
    tok_path = getattr(tokenizer_dir, "path", tokenizer_dir)  # an XTokenizer is accepted too
    cfg = TokenizeConfig(inputs=[str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)],
                         tokenizer=str(tok_path), out=str(out_dir), workers=int(workers or 0), **options)
    return run(cfg)


def run(cfg: TokenizeConfig) -> dict:
    from xiaolm.config import save_config
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.utils import atomic_write_json, log

    # Everything that can be wrong with the inputs is found before any work starts.
    if not cfg.tokenizer:
        raise ValueError("no tokenizer given (--tokenizer TOKDIR)")
    if not cfg.out:
        raise ValueError("no output directory given (--out SHARDDIR)")
    if cfg.engine not in ("xiaolm", "datatrove"):
        raise ValueError(f"--engine must be xiaolm or datatrove, got {cfg.engine!r}")
    if cfg.engine == "datatrove":
        from xiaolm.data.tokenize_datatrove import tokenize_datatrove

        return tokenize_datatrove(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    sources = resolve_inputs(cfg.inputs, split=cfg.split)
    workers = cfg.workers if cfg.workers and cfg.workers > 0 else default_workers()
    dtype = dtype_for_vocab(tok.vocab_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out)

    started = time.perf_counter()
    writers: dict[str, _SplitWriter] = {}
    stats = {"documents": 0, "malformed": 0, "malformed_records": [], "empty": 0, "chars": 0, "bytes": 0}
    split_stats: dict[str, dict] = {}
    # The bar counts raw input bytes; a gzip file's uncompressed size is unknown, so then there is no total.
    compressed = any(s.path.name.lower().endswith(".gz") or s.kind == "records" for s in sources)
    total_bytes = None if compressed else sum(s.path.stat().st_size for s in sources)

    def tasks() -> Iterator[tuple[TextSource, tuple]]:
        for source in sources:
            unreadable: list[dict] = []
            for first, lines in input_batches(source, cfg.field, max(1, cfg.batch_size), errors=unreadable):
                yield source, (str(source.path), source.kind, cfg.field, first, lines)
            for err in unreadable:
                log(f"tokenize: {err['file']}:{err['line']}: {err['reason']}")
            _note_malformed(stats, unreadable)

    def consume(source: TextSource, result: dict, raw_size: int) -> None:
        add_encoded(writers, out, dtype, cfg.shard_tokens, tok.fingerprint, source, result, stats, split_stats)
        if bar is not None:
            bar.update(raw_size)

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
                   disable=None, dynamic_ncols=True)
    try:
        if workers == 1:
            _init_worker_in_process(tok, dtype)
            for source, task in tasks():
                consume(source, _encode_task(task), sum(len(x) for x in task[4]))
        else:
            ctx = _process_context()
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(str(tok.path), dtype.str)) as pool:
                pending: deque = deque()
                for source, task in tasks():
                    pending.append((source, pool.submit(_encode_task, task), sum(len(x) for x in task[4])))
                    if len(pending) >= 3 * workers:  # bounded: the corpus is streamed, not loaded
                        src, fut, size = pending.popleft()
                        consume(src, fut.result(), size)
                while pending:
                    src, fut, size = pending.popleft()
                    consume(src, fut.result(), size)
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        _WORKER.clear()
    wall = time.perf_counter() - started

    splits = {}
    for name, writer in sorted(writers.items()):
        splits[name] = {"tokens": writer.tokens, "documents": writer.documents, "shards": writer.shards,
                        **split_stats.get(name, {})}
    total_tokens = sum(s["tokens"] for s in splits.values())
    # A file's unreadable end is noted when reading stops, before its last batches come back from the workers.
    order = {str(src.path): i for i, src in enumerate(sources)}
    stats["malformed_records"].sort(key=lambda r: (order.get(r["file"], len(order)), r["line"]))
    if total_tokens == 0:
        raise ValueError(_nothing_written(cfg, out, stats))
    meta = shards_meta(tok, dtype, splits, stats, sources, workers, wall)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / META_FILE, meta)
    if stats["malformed"]:
        first = stats["malformed_records"][0]
        log(f"tokenize: {stats['malformed']} malformed record(s) skipped and listed in {out / META_FILE} "
            f"(first: {first['file']}:{first['line']}: {first['reason']})")
    return meta


def _nothing_written(cfg: TokenizeConfig, out: Path, stats: dict) -> str:
    """Why a tokenize run produced no tokens, for its error message."""
    why = f"{stats['malformed']} malformed record(s)"
    if stats["malformed_records"]:
        first = stats["malformed_records"][0]
        why += f" (first: {first['file']}:{first['line']}: {first['reason']})"
    why += f", {stats['empty']} empty"
    if cfg.field != "text" or stats["malformed"]:
        why += f"; the text is read from field {cfg.field!r} (--field)"
    return f"no tokens written to {out}: the inputs hold no documents: {why}"


def _process_context():
    """``fork`` on Linux (instant start, works from notebooks and ``python -``), ``spawn`` elsewhere. Forking a
    parent that already used the Rust thread pool is safe here because workers never use that pool: they set
    TOKENIZERS_PARALLELISM=false before their first encode, and tokenizers itself disables the pool in forked
    children."""
    import multiprocessing as mp

    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


# ==================================================================================================== reader


class ShardMismatchError(ValueError):
    """Shards made with a different tokenizer from the one a run uses."""


def _describe_expected(expected) -> tuple[str, str]:
    """(fingerprint, description) of what the caller expects: a fingerprint, an XTokenizer or a tokenizer dir."""
    if hasattr(expected, "fingerprint"):
        return expected.fingerprint, f"tokenizer {expected.fingerprint} (vocab {expected.vocab_size}, {expected.path})"
    if isinstance(expected, Path) or (isinstance(expected, str) and Path(expected).is_dir()):
        from xiaolm.tokenizer import load_tokenizer

        tok = load_tokenizer(expected)
        return tok.fingerprint, f"tokenizer {tok.fingerprint} (vocab {tok.vocab_size}, {tok.path})"
    return str(expected), f"tokenizer {expected}"


class TokenShards:
    """Read-only, memory-mapped view of one split of a shard directory as one long token sequence.

    ``read(start, length)`` returns int64 ids and may span shard boundaries; ``doc_starts`` holds the global start
    of every document (its tokens run to the next start, the last ``<|endoftext|>`` included), for
    document-boundary attention masks (``doc_ids``). Pickling re-opens the memory maps instead of copying data.
    """

    def __init__(self, shard_dir: str | Path, split: str = "train", expect_fingerprint=None):
        self.shard_dir = Path(shard_dir)
        self.split = split
        self._expect = expect_fingerprint
        self._open()
        if expect_fingerprint is not None:
            self.check_tokenizer(expect_fingerprint)

    def _open(self) -> None:
        meta_path = self.shard_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.shard_dir}: not a shard directory (no {META_FILE}); "
                                    f"make one with `xiaolm data tokenize`")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tok_meta = self.meta["tokenizer"]
        self.fingerprint: str = tok_meta["fingerprint"]
        self.vocab_size: int = int(tok_meta["vocab_size"])
        self.tokenizer_path: str | None = tok_meta.get("path")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.eot_id = int(self.meta.get("eot_id", 0))
        split_dir = self.shard_dir / self.split
        sidecars = sorted(split_dir.glob("shard_*.json")) if split_dir.is_dir() else []
        if not sidecars:
            present = ", ".join(f"{k} ({v['tokens']} tokens)" for k, v in self.meta.get("splits", {}).items())
            raise ValueError(f"{self.shard_dir}: split {self.split!r} has no shards (splits here: {present or 'none'})")
        self._maps: list[np.memmap] = []
        starts = [0]
        doc_starts = []
        for sidecar_path in sidecars:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            bin_path = sidecar_path.with_suffix(".bin")
            if sidecar.get("tokenizer_fingerprint") != self.fingerprint:
                raise ShardMismatchError(
                    f"{sidecar_path}: made with tokenizer {sidecar.get('tokenizer_fingerprint')} but {META_FILE} "
                    f"says {self.fingerprint}; shards from different runs are mixed in {split_dir}")
            n = int(sidecar["tokens"])
            expected_bytes = n * self.dtype.itemsize
            actual = bin_path.stat().st_size if bin_path.is_file() else -1
            if actual != expected_bytes:
                raise ValueError(f"{bin_path}: {'missing' if actual < 0 else f'{actual} bytes'}, expected "
                                 f"{expected_bytes} ({n} {self.dtype.name} tokens); the shard is truncated or "
                                 f"incomplete, re-run `xiaolm data tokenize`")
            self._maps.append(np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n,)))
            self._check_ids(bin_path, sidecar, self._maps[-1])
            doc_starts.append(np.asarray(sidecar["document_offsets"], dtype=np.int64) + starts[-1])
            starts.append(starts[-1] + n)
        self._starts = np.asarray(starts, dtype=np.int64)
        self.num_tokens = int(self._starts[-1])
        self.doc_starts = np.concatenate(doc_starts) if doc_starts else np.zeros(0, np.int64)
        self.num_docs = int(len(self.doc_starts))
        self.num_shards = len(self._maps)

    def _check_ids(self, bin_path: Path, sidecar: dict, tokens: np.ndarray) -> None:
        """Ids at or beyond the vocabulary would index past the embedding: refuse them now. The sidecar's recorded
        range makes this free; sidecars written before it was recorded cost one scan of their shard."""
        top = sidecar.get("max_id")
        if top is None and len(tokens):
            top = int(tokens.max())
        if top is not None and top >= self.vocab_size:
            raise ValueError(
                f"{bin_path}: token ids up to {top}, beyond the vocabulary of {self.vocab_size} of tokenizer "
                f"{self.fingerprint}; the shard is damaged or from another tokenizer (check with "
                f"`xiaolm data verify {self.shard_dir}`, or re-run `xiaolm data tokenize`)")

    def check_tokenizer(self, expected) -> None:
        """Raise ``ShardMismatchError`` unless the shards were made with ``expected`` (fingerprint, XTokenizer,
        or tokenizer directory)."""
        fingerprint, description = _describe_expected(expected)
        if fingerprint != self.fingerprint:
            made_by = f"tokenizer {self.fingerprint} (vocab {self.vocab_size}, {self.tokenizer_path})"
            raise ShardMismatchError(
                f"{self.shard_dir} was tokenized with {made_by}, but this run expects {description}. "
                f"Re-run `xiaolm data tokenize ... --tokenizer TOKDIR` with the run's tokenizer, or use the "
                f"tokenizer that made the shards.")

    # --------------------------------------------------------------------------------------------- reads

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across shard boundaries."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) is outside the {self.num_tokens} tokens of "
                             f"{self.shard_dir}/{self.split}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self._starts[shard])
            take = min(length - filled, len(self._maps[shard]) - local)
            out[filled:filled + take] = self._maps[shard][local:local + take]
            filled += take
            shard += 1
        return out

    def random_start(self, rng: np.random.Generator | int | None, length: int) -> int:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        if length > self.num_tokens:
            raise ValueError(f"window of {length} tokens is longer than the {self.num_tokens} tokens of "
                             f"{self.shard_dir}/{self.split}")
        return int(rng.integers(0, self.num_tokens - length + 1))

    def random_window(self, rng: np.random.Generator | int | None, length: int) -> np.ndarray:
        """A window of ``length`` tokens at a uniformly random start (documents are concatenated)."""
        return self.read(self.random_start(rng, length), length)

    def iter_sequential(self, length: int, stride: int | None = None, start: int = 0,
                        drop_last: bool = True) -> Iterator[np.ndarray]:
        """Windows of ``length`` tokens from ``start``, every ``stride`` (default ``length``) tokens. With
        ``drop_last=False`` a final shorter window covers the remaining tokens."""
        stride = stride or length
        if length <= 0 or stride <= 0:
            raise ValueError("length and stride must be positive")
        pos = int(start)
        while pos + length <= self.num_tokens:
            yield self.read(pos, length)
            pos += stride
        if not drop_last and pos < self.num_tokens:
            yield self.read(pos, self.num_tokens - pos)

    def doc_ids(self, start: int, length: int) -> np.ndarray:
        """The document index of every token in ``[start, start + length)`` (int64), for attention masks that
        stop at document boundaries: tokens attend only to earlier tokens with the same id."""
        positions = np.arange(int(start), int(start) + int(length), dtype=np.int64)
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def doc_positions(self, start: int, length: int) -> np.ndarray:
        """Position of every token within its own document (restarts at 0 at each document start)."""
        positions = np.arange(int(start), int(start) + int(length), dtype=np.int64)
        return positions - self.doc_starts[self.doc_ids(start, length)]

    def document(self, index: int) -> np.ndarray:
        """The tokens of document ``index``, its closing ``<|endoftext|>`` included."""
        begin = int(self.doc_starts[index])
        end = int(self.doc_starts[index + 1]) if index + 1 < self.num_docs else self.num_tokens
        return self.read(begin, end - begin)

    def __getstate__(self):
        return {"shard_dir": self.shard_dir, "split": self.split}

    def __setstate__(self, state):
        self.shard_dir = state["shard_dir"]
        self.split = state["split"]
        self._expect = None
        self._open()

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.shard_dir)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"docs={self.num_docs}, shards={self.num_shards}, dtype={self.dtype.name}, "
                f"fingerprint={self.fingerprint!r})")


def parse_data_dirs(data, weights=None) -> tuple[list[str], list[float] | None]:
    """``--data`` values (one directory, or several, each optionally ``DIR:WEIGHT``) and ``--data-weights`` ->
    (directories, weights or None). Raises ValueError naming the bad value."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    dirs: list[str] = []
    inline: list[float | None] = []
    for item in items:
        item = str(item)
        head, sep, tail = item.rpartition(":")
        weight = None
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                head = item  # a ':' that is part of the path
        dirs.append(head if weight is not None else item)
        inline.append(weight)
    given = [w for w in inline if w is not None]
    if given and weights:
        raise ValueError("give mixing weights either as --data DIR:WEIGHT or as --data-weights, not both")
    if given and len(given) != len(dirs):
        raise ValueError(f"--data: either every directory has a :WEIGHT or none does, got {items}")
    weights = list(weights) if weights else (given or None)
    if weights is not None:
        if len(weights) != len(dirs):
            raise ValueError(f"--data-weights: {len(weights)} weights for {len(dirs)} --data directories")
        if any(not (w >= 0) or w == float("inf") for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-weights must be non-negative numbers with a positive sum, got {weights}")
    return dirs, weights


class MixedShards:
    """Several shard directories read as one training stream, each window drawn from a directory with
    probability given by its weight (default: its share of the tokens, which is plain concatenation).

    All directories must come from the same tokenizer (``ShardMismatchError`` names the one that differs), so
    corpora tokenised separately combine without re-tokenising. :meth:`windows` plans the draws: in every pass
    of ``num_windows`` (the windows of all directories together) directory ``s`` supplies exactly its rounded
    share of them, and its own windows are visited in a seeded order that only repeats once it has been seen
    in full, so a small directory with a large weight repeats and a large one with a small weight is sampled.
    """

    def __init__(self, shard_dirs, weights=None, split: str = "train", expect_fingerprint=None):
        dirs, weights = parse_data_dirs(shard_dirs, weights)
        if not dirs:
            raise ValueError("MixedShards needs at least one shard directory")
        self.parts = [TokenShards(d, split) for d in dirs]
        first = self.parts[0]
        for part in self.parts[1:]:
            if part.fingerprint != first.fingerprint:
                raise ShardMismatchError(
                    f"{part.shard_dir} was tokenized with tokenizer {part.fingerprint} ({part.tokenizer_path}) but "
                    f"{first.shard_dir} with {first.fingerprint} ({first.tokenizer_path}); mixed directories must "
                    f"share one tokenizer: re-run `xiaolm data tokenize` on one of them with the other's")
        if expect_fingerprint is not None:
            first.check_tokenizer(expect_fingerprint)
        self.split = split
        self.fingerprint, self.vocab_size, self.eot_id = first.fingerprint, first.vocab_size, first.eot_id
        self.tokenizer_path, self.dtype = first.tokenizer_path, first.dtype
        sizes = np.array([p.num_tokens for p in self.parts], dtype=np.float64)
        raw = np.asarray(weights if weights is not None else sizes, dtype=np.float64)
        self.weights = raw / raw.sum()
        self.num_tokens = int(sizes.sum())

    def head(self, n: int) -> np.ndarray:
        """About ``n`` tokens for evaluation: the start of each directory in proportion to its weight."""
        pieces = []
        for part, w in zip(self.parts, self.weights):
            take = min(part.num_tokens, int(round(w * n)))
            if take:
                pieces.append(part.read(0, take))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def windows(self, seq_len: int, seed: int) -> "MixedWindows":
        return MixedWindows(self, seq_len, seed)

    def __repr__(self) -> str:
        parts = ", ".join(f"{p.shard_dir}:{w:.3f}" for p, w in zip(self.parts, self.weights))
        return f"MixedShards([{parts}], split={self.split!r}, tokens={self.num_tokens})"


class MixedWindows:
    """Window ``g`` of a mixed stream (see :class:`MixedShards`): deterministic in (seed, g), so resuming at a
    step reads the same windows."""

    def __init__(self, mixed: MixedShards, seq_len: int, seed: int):
        self.mixed, self.seq_len, self.seed = mixed, seq_len, seed
        self.part_windows = np.array([(p.num_tokens - 1) // seq_len for p in mixed.parts], dtype=np.int64)
        for part, n in zip(mixed.parts, self.part_windows):
            if n < 1:
                raise ValueError(f"{part.shard_dir}/{mixed.split}: {part.num_tokens} tokens are too few for one "
                                 f"window of {seq_len + 1}")
        self.num_windows = int(self.part_windows.sum())
        # Largest-remainder rounding: the shares sum to num_windows exactly.
        exact = mixed.weights * self.num_windows
        share = np.floor(exact).astype(np.int64)
        share[np.argsort(-(exact - share), kind="stable")[: self.num_windows - int(share.sum())]] += 1
        self.share = share
        self._slot_part = np.repeat(np.arange(len(share), dtype=np.int32), share)
        self._slot_rank = np.concatenate([np.arange(c, dtype=np.int64) for c in share])
        self._pass, self._order = -1, None
        self._part_orders: dict[tuple[int, int], np.ndarray] = {}

    def locate(self, g: int) -> tuple[int, int]:
        """(directory index, window index within it) of global window ``g``."""
        epoch, pos = divmod(int(g), self.num_windows)
        if epoch != self._pass:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._pass = epoch
        slot = int(self._order[pos])
        part = int(self._slot_part[slot])
        visit = epoch * int(self.share[part]) + int(self._slot_rank[slot])
        cycle, index = divmod(visit, int(self.part_windows[part]))
        key = (part, cycle)
        order = self._part_orders.get(key)
        if order is None:
            if len(self._part_orders) > 2 * len(self.share):
                self._part_orders.clear()
            order = np.random.default_rng([self.seed, 1 + part, cycle]).permutation(int(self.part_windows[part]))
            self._part_orders[key] = order
        return part, int(order[index])

    def read(self, g: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of global window ``g``."""
        part, window = self.locate(g)
        return self.mixed.parts[part].read(window * self.seq_len, self.seq_len + 1)


# ======================================================================================================= CLI


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail, human, log

    cfg, _ = parse_config(
        TokenizeConfig, argv, prog="xiaolm data tokenize",
        positionals={"inputs": "DIR_OR_FILES"},
        epilog="example:\n  xiaolm data tokenize prepared/ --tokenizer tok/ --out shards/",
    )
    try:
        meta = run(cfg)
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        raise fail(str(exc)) from None
    if meta is None:  # datatrove on Slurm: submitted, finishes later
        return 0
    for name, s in meta["splits"].items():
        log(f"tokenize: {name}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    log(f"tokenize: {human(meta['tokens'])} tokens ({meta['dtype']}), {meta['chars_per_token']} chars/token, "
        f"{meta['wall_time_s']:.1f} s with {meta['workers']} worker(s) = {meta['mb_per_s']} MB/s, "
        f"{human(meta['tokens_per_s'] or 0)} tokens/s; malformed {meta['malformed']}, empty {meta['empty_documents']}"
        f" -> {Path(cfg.out) / META_FILE}")
    return 0


# ================================================================================================ verify


def verify_shards(shard_dir: str | Path) -> tuple[list[str], dict]:
    """Check every shard of every split against its sidecar: size, sha256 (where recorded) and token ids within
    the vocabulary. Returns ``(problems, counts)``; each problem names its file."""
    from xiaolm.utils import sha256_file

    shard_dir = Path(shard_dir)
    meta_path = shard_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{shard_dir}: not a shard directory (no {META_FILE}); "
                                f"make one with `xiaolm data tokenize`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    vocab = int(meta["tokenizer"]["vocab_size"])
    fingerprint = meta["tokenizer"]["fingerprint"]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    problems: list[str] = []
    counts = {"shards": 0, "tokens": 0, "no_checksum": 0, "vocab_size": vocab}
    for split in sorted(meta.get("splits", {})):
        listed = meta["splits"][split].get("shards", [])
        for name in listed:
            bin_path = shard_dir / split / name
            sidecar_path = bin_path.with_suffix(".json")
            if not bin_path.is_file() or not sidecar_path.is_file():
                missing = "missing" if not bin_path.is_file() else "its sidecar is missing"
                problems.append(f"{bin_path}: listed in {META_FILE} but {missing}")
                continue
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            n = int(sidecar["tokens"])
            size = bin_path.stat().st_size
            if size != n * dtype.itemsize:
                problems.append(f"{bin_path}: {size} bytes, expected {n * dtype.itemsize} ({n} tokens); truncated")
                continue
            if sidecar.get("tokenizer_fingerprint") != fingerprint:
                problems.append(f"{sidecar_path}: made with tokenizer {sidecar.get('tokenizer_fingerprint')}, "
                                f"{META_FILE} says {fingerprint}")
            digest = sidecar.get("sha256")
            if digest is None:
                counts["no_checksum"] += 1
            elif sha256_file(bin_path) != digest:
                problems.append(f"{bin_path}: does not match the sha256 recorded in {sidecar_path.name} "
                                f"(damaged after it was written)")
            tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
            top = int(tokens.max()) if n else -1
            if top >= vocab:
                beyond = int((tokens >= vocab).sum())
                problems.append(f"{bin_path}: {beyond} token id(s) beyond the vocabulary of {vocab} "
                                f"(largest {top})")
            counts["shards"] += 1
            counts["tokens"] += n
    return problems, counts


@dataclass
class VerifyConfig:
    """Check token shards: sizes, sha256 checksums, token ids within the vocabulary."""

    shard_dir: str = opt("", "token shard directory made by `xiaolm data tokenize`",
                         required="give the shard directory: xiaolm data verify SHARDDIR")


def verify_main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail, log

    cfg, _ = parse_config(VerifyConfig, argv, prog="xiaolm data verify", positionals={"shard_dir": "SHARDDIR"})
    try:
        problems, counts = verify_shards(cfg.shard_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise fail(str(exc) if not isinstance(exc, KeyError) else f"{cfg.shard_dir}: {META_FILE} lacks {exc}")
    for problem in problems:
        log(f"verify: {problem}")
    if problems:
        raise fail(f"{cfg.shard_dir}: {len(problems)} problem(s) in {counts['shards']} shard(s) (listed above)",
                   code=1)
    unchecked = f", {counts['no_checksum']} without a recorded checksum (older shards)" if counts["no_checksum"] else ""
    log(f"verify: {cfg.shard_dir}: ok: {counts['shards']} shard(s), {counts['tokens']:,} tokens, checksums match"
        f"{unchecked}, every id below the vocabulary of {counts['vocab_size']}")
    return 0
