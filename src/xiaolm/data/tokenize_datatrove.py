"""``xiaolm data tokenize --engine datatrove``: token shards written by datatrove tasks, read as one split.

The inputs, in order, are treated as one byte stream and cut into ``--tasks`` equal byte ranges; task ``r``
encodes the lines that start in its range (a ``.gz`` file, which cannot be cut, goes whole to the task in whose
range it starts), with our tokenizer and our shard writer, into ``OUT/.datatrove/tokenize/{r}/{split}/``. A last
single task renames every task's shards, in task order, to ``OUT/{split}/shard_NNNNN.bin/.json`` (our format:
sidecars with the tokenizer fingerprint and document offsets) and writes ``meta.json`` with the counters summed,
so :class:`~xiaolm.data.shards.TokenShards` reads one split whose tokens and documents are, in order, exactly
those of the default engine (only where shards end differs: each task closes its own last shard).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from xiaolm.data.prepare_datatrove import PipelineStep, _executor, _need_datatrove, _quiet

WORK = Path(".datatrove") / "tokenize"


def _ranges(sources, rank: int, world_size: int):
    """(source, start byte, end byte or None for a whole .gz file) for task ``rank``."""
    sizes = [s.path.stat().st_size for s in sources]
    total = sum(sizes)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    at = 0
    for source, size in zip(sources, sizes):
        a, b = at, at + size
        at = b
        if source.path.name.lower().endswith(".gz"):
            if lo <= a < hi:
                yield source, 0, None
        elif max(lo, a) < min(hi, b):
            yield source, max(lo, a) - a, min(hi, b) - a


def _lines_from(path: Path, start: int, end: int, batch_lines: int):
    """Batches ``(first line number, lines)`` of the lines of ``path`` that start in ``[start, end)``."""
    with open(path, "rb") as fh:
        lineno = 1
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line in progress belongs to the task before
            first = fh.tell()
            # Line numbers in reports are the file's own: count the newlines before this range.
            fh.seek(0)
            left = first
            while left > 0:
                chunk = fh.read(min(left, 16 << 20))
                lineno += chunk.count(b"\n")
                left -= len(chunk)
            fh.seek(first)
        batch: list[bytes] = []
        batch_first = lineno
        while fh.tell() < end:
            line = fh.readline()
            if not line:
                break
            if not batch:
                batch_first = lineno
            batch.append(line)
            lineno += 1
            if len(batch) >= batch_lines:
                yield batch_first, batch
                batch = []
        if batch:
            yield batch_first, batch


class XiaolmTokenizeRange(PipelineStep):
    """One task: encode its byte range of the inputs into its own shard set."""

    name = "xiaolm tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from xiaolm.data.shard_writer import _encode_task, _init_worker_in_process, _SplitWriter, add_encoded, \
            dtype_for_vocab
        from xiaolm.data.sources import read_line_batches, resolve_inputs
        from xiaolm.tokenizer import load_tokenizer

        cfg = self.cfg
        tok = load_tokenizer(cfg.tokenizer)
        dtype = dtype_for_vocab(tok.vocab_size)
        _init_worker_in_process(tok, dtype)
        task_dir = Path(cfg.out) / WORK / f"{rank:05d}"
        writers: dict[str, _SplitWriter] = {}
        stats = {"documents": 0, "malformed": 0, "malformed_records": [], "empty": 0, "chars": 0, "bytes": 0,
                 "splits": {}}
        for source, start, end in _ranges(resolve_inputs(cfg.inputs, split=cfg.split), rank, world_size):
            batches = (read_line_batches(source, max(1, cfg.batch_size)) if end is None
                       else _lines_from(source.path, start, end, max(1, cfg.batch_size)))
            for first, lines in batches:
                result = _encode_task((str(source.path), source.kind, cfg.field, first, lines))
                add_encoded(writers, task_dir, dtype, cfg.shard_tokens, tok.fingerprint, source, result, stats,
                            stats["splits"])
                self.stat_update("documents", value=len(result["lengths"]))
        for name, writer in writers.items():
            writer.finish()
            stats["splits"][name].update(tokens=writer.tokens, documents=writer.documents, shards=writer.shards)
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "stats.json").write_text(json.dumps(stats, ensure_ascii=False), encoding="utf-8")
        return
        yield


class XiaolmMergeShards(PipelineStep):
    """Last task: every task's shards renamed into ``OUT/{split}/`` in task order, and one ``meta.json``."""

    name = "xiaolm merge shards"
    type = "💽 - WRITER"

    def __init__(self, cfg, tasks: int, started: float):
        super().__init__()
        self.cfg, self.tasks, self.started = cfg, tasks, started

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        merge_task_shards(self.cfg, self.tasks, self.started)
        return
        yield


def merge_task_shards(cfg, tasks: int, started: float) -> dict:
    from xiaolm.config import save_config
    from xiaolm.data.shard_writer import META_FILE, dtype_for_vocab, shards_meta
    from xiaolm.data.sources import MAX_MALFORMED_LISTED, resolve_inputs
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.utils import atomic_write_json

    out = Path(cfg.out)
    tok = load_tokenizer(cfg.tokenizer)
    totals = {"documents": 0, "malformed": 0, "malformed_records": [], "empty": 0, "chars": 0, "bytes": 0}
    splits: dict[str, dict] = {}
    for r in range(tasks):
        task_dir = out / WORK / f"{r:05d}"
        stats_path = task_dir / "stats.json"
        if not stats_path.is_file():
            raise RuntimeError(f"datatrove tokenize task {r} did not finish (logs in {out / '.datatrove' / 'logs'})")
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        for key in ("documents", "malformed", "empty", "chars", "bytes"):
            totals[key] += stats[key]
        room = MAX_MALFORMED_LISTED - len(totals["malformed_records"])
        totals["malformed_records"].extend(stats["malformed_records"][:max(room, 0)])
        for name, s in stats["splits"].items():
            merged = splits.setdefault(name, {"tokens": 0, "documents": 0, "shards": [], "chars": 0, "bytes": 0})
            (out / name).mkdir(parents=True, exist_ok=True)
            for shard in s.get("shards", []):
                new = f"shard_{len(merged['shards']):05d}"
                stem = shard[: -len(".bin")]
                (task_dir / name / f"{stem}.bin").replace(out / name / f"{new}.bin")
                (task_dir / name / f"{stem}.json").replace(out / name / f"{new}.json")
                merged["shards"].append(f"{new}.bin")
            for key in ("tokens", "documents", "chars", "bytes"):
                merged[key] += s.get(key, 0)
    wall = time.time() - started
    sources = resolve_inputs(cfg.inputs, split=cfg.split)
    meta = shards_meta(tok, dtype_for_vocab(tok.vocab_size), dict(sorted(splits.items())), totals, sources, tasks,
                       wall, engine="datatrove")
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / META_FILE, meta)
    return meta


def tokenize_datatrove(cfg) -> dict | None:
    """Run the tasks and the merge; returns meta.json's content (None with Slurm, whose jobs finish later)."""
    from xiaolm.data.shard_writer import _clear_previous_output
    from xiaolm.data.sources import resolve_inputs
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.utils import log

    _need_datatrove()
    if cfg.executor not in ("local", "slurm", "ray"):
        raise ValueError(f"--executor must be local, slurm or ray, got {cfg.executor!r}")
    if cfg.tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {cfg.tasks}")
    load_tokenizer(cfg.tokenizer)
    resolve_inputs(cfg.inputs, split=cfg.split)  # every input checked before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out)
    shutil.rmtree(out / ".datatrove", ignore_errors=True)
    started = time.time()
    logs = out / ".datatrove" / "logs"
    encode = _executor(cfg.executor, [XiaolmTokenizeRange(cfg)], cfg.tasks, logs / "tokenize", cfg,
                       name="xiaolm-tokenize")
    merge = _executor(cfg.executor, [XiaolmMergeShards(cfg, cfg.tasks, started)], 1, logs / "merge", cfg,
                      depends=encode if cfg.executor == "slurm" else None, name="xiaolm-tokenize-merge")
    if cfg.executor == "slurm":
        merge.run()
        log(f"submitted to Slurm: {cfg.tasks} tokenize tasks and the merge; meta.json appears in {out} when they "
            f"finish")
        return None
    with _quiet(not cfg.progress):
        encode.run()
        merge.run()
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise RuntimeError(f"the datatrove merge task did not write {meta_path} (logs in {logs})")
    shutil.rmtree(out / WORK, ignore_errors=True)
    return json.loads(meta_path.read_text(encoding="utf-8"))
