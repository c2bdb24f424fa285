"""The core of ``xiaolm data prepare`` (see :mod:`xiaolm.data.prepare` for the pipeline and its outputs): the
config, the batch worker and :func:`run_prepare`, the pipeline itself.

Both engines use it: :func:`xiaolm.data.prepare.prepare` runs it directly (engine ``xiaolm``) or through
:mod:`xiaolm.data.prepare_datatrove`, whose last task hands it the cleaned batches; so neither of those imports
the other.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xiaolm.config import opt, save_config
from xiaolm.data.clean import FILTER_RULES, Cleaner, CleanConfig, FilterConfig, filter_reasons, split_long, \
    validate_filters
from xiaolm.data.dedup import DedupConfig, Deduplicator, MinHasher, validate_dedup
from xiaolm.data.readers import TXT_MODES, ReadLog, check_encoding, iter_records, read_options_from, resolve_inputs
from xiaolm.utils import atomic_write_json, stable_hash

SPLIT_BUCKETS = 10_000
BATCH_DOCS = 1024
PARALLEL_MIN_BYTES = 16 << 20  # inputs smaller than this are cleaned in the main process
MAX_EXAMPLES = 20
MAX_EXAMPLES_PER_RULE = 5


@dataclass
class PrepareConfig:
    """Ingest raw Chinese text, clean it, filter it, remove exact and near duplicates, and split it into train.jsonl \
/ val.jsonl with a report.json of what was kept and dropped."""

    inputs: list[str] = opt([], "input files, directories (recursive), globs, or hf:NAME datasets "
                                ".txt .jsonl .json .csv .parquet, each optionally .gz", short="--inputs")
    out: str = opt("", "output directory for train.jsonl, val.jsonl, report.json, config.yaml",
                   required="--out DIR is required")
    field: str = opt("text", "field path of the text in each record: story_zh, modern, paragraphs (a list is "
                             "joined), nested a.b.c, alternatives modern|paragraphs (first present); ignored for "
                             ".txt")
    joiner: str = opt("", "string placed between the items of a list field (\"\" suits Chinese lines; \\n means "
                          "a newline)")
    txt_mode: Literal["line", "paragraph", "file", "chapter"] = opt(
        "line", "how a .txt file is cut into documents: one per line, per blank-line paragraph, per file, or per "
                "chapter (a line matching chapter_regex starts a new one)")
    chapter_regex: str = opt(r"第.+回", "heading regex for txt_mode chapter, matched at the start of a line")
    json_key: str | None = opt(None, "key of the record list in a .json file holding one object (default: its "
                                     "only list-valued key)")
    csv_delimiter: str = opt(",", "field delimiter of .csv inputs")
    encoding: str = opt("auto", "character encoding of text inputs (.txt .jsonl .json .csv): auto (a byte-order "
                                "mark, else UTF-8 when the file starts as UTF-8, else detected, e.g. GB18030 or "
                                "UTF-16), or a name such as utf-8, gb18030, gbk, utf-16")
    hf_split: str = opt("train", "split to load for hf:NAME inputs")
    hf_config: str | None = opt(None, "configuration name for hf:NAME inputs")
    hf_cache_dir: str | None = opt(None, "cache directory for hf:NAME inputs")
    val_fraction: float = opt(0.02, "share of documents (by text hash, stable as data is added) sent to "
                                    "val.jsonl")
    workers: int = opt(-1, "extra processes that clean, filter and MinHash while the main process reads and "
                           "deduplicates in input order (0: none; -1: automatic, cores-1 up to 3 for inputs of "
                           "16 MB or more, else none)")
    quiet: bool = opt(False, "no progress bar or summary")
    engine: Literal["xiaolm", "datatrove"] = opt(
        "xiaolm", "xiaolm: this process (and its workers); datatrove: reading, cleaning, filtering and MinHash "
                  "signatures as --tasks datatrove tasks, then one task deduplicates and splits (same output)")
    tasks: int = opt(4, "datatrove engine: parallel tasks (each takes a contiguous run of the input files)")
    executor: Literal["local", "slurm", "ray"] = opt("local", "datatrove engine: where the tasks run")
    slurm_partition: str = opt("", "datatrove engine, slurm executor: partition to submit to")
    slurm_time: str = opt("24:00:00", "datatrove engine, slurm executor: time limit per task")
    near_dedup: Literal["xiaolm", "datatrove"] = opt(
        "xiaolm", "datatrove engine: near-duplicates by our MinHash check in one task (the default engine's "
                  "output exactly) or by datatrove's sort-based MinHash stages over the tasks (character 5-gram "
                  "shingles, 14 bands of 8; no similarity check, one document kept per cluster: a different set)")
    max_malformed_listed: int = opt(10_000, "malformed records listed in full in report.json (all are counted)")
    clean: CleanConfig = opt(factory=CleanConfig, help="cleaning")
    filters: FilterConfig = opt(factory=FilterConfig, help="quality filters")
    dedup: DedupConfig = opt(factory=DedupConfig, help="deduplication")


# -------------------------------------------------------------------------------------------- config


def _leaf_paths(cls, prefix: str = "") -> dict[str, list[str]]:
    """leaf name -> the dotted paths that have that name (sections are the fields whose default is a dataclass)."""
    found: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        factory = f.default_factory  # type: ignore[misc]
        section = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            for name, paths in _leaf_paths(type(section), path + ".").items():
                found.setdefault(name, []).extend(paths)
        else:
            found.setdefault(f.name, []).append(path)
    return found


def apply_overrides(cfg: PrepareConfig, overrides: dict[str, Any]) -> PrepareConfig:
    """A copy of ``cfg`` with ``overrides`` applied: top-level names (``field``), dotted paths
    (``"filters.min_chars"``), or the bare name of a nested option when it is unique (``min_chars``)."""
    cfg = dataclasses.replace(cfg, clean=dataclasses.replace(cfg.clean), filters=dataclasses.replace(cfg.filters),
                              dedup=dataclasses.replace(cfg.dedup))
    leaves = _leaf_paths(PrepareConfig)
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if "." in key:
            path = key
        elif key in leaves and len(leaves[key]) == 1:
            path = leaves[key][0]
        elif key in leaves:
            raise TypeError(f"prepare(): option {key!r} is ambiguous; use one of {leaves[key]}")
        elif key in ("clean", "filters", "dedup"):
            path = key
        else:
            raise TypeError(f"prepare(): unknown option {key!r}")
        *parents, name = path.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        if not hasattr(node, name):
            raise TypeError(f"prepare(): unknown option {key!r}")
        setattr(node, name, value)
    return cfg


def validate_config(cfg: PrepareConfig) -> None:
    """Raise ValueError naming the option for settings out of range."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {cfg.txt_mode!r}")
    try:
        re.compile(cfg.chapter_regex)
    except re.error as exc:
        raise ValueError(f"chapter_regex {cfg.chapter_regex!r} is not a valid regular expression: {exc}") from None
    check_encoding(cfg.encoding)
    if cfg.workers < -1:
        raise ValueError(f"workers must be -1 (automatic), 0 or more, got {cfg.workers}")
    if cfg.tasks < 1:
        raise ValueError(f"tasks must be at least 1, got {cfg.tasks}")
    validate_filters(cfg.filters)
    validate_dedup(cfg.dedup)


# --------------------------------------------------------------------------------------------- helpers


def _unescape(joiner: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line mean a newline and a tab."""
    return joiner.replace("\\n", "\n").replace("\\t", "\t")


def is_validation(text: str, val_fraction: float) -> bool:
    """The split rule: depends only on the text, so it never changes when other documents come or go."""
    return stable_hash(text) % SPLIT_BUCKETS < round(val_fraction * SPLIT_BUCKETS)


def document_id(text: str) -> str:
    return f"{stable_hash(text):016x}"


class _SplitWriter:
    """train.jsonl / val.jsonl written to temporary files in OUT and renamed into place at the end."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.paths = {}
        self.handles = {}
        self.counts = {"train": 0, "val": 0}
        self.chars = {"train": 0, "val": 0}
        for split in ("train", "val"):
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.jsonl.", suffix=".tmp")
            self.paths[split] = tmp
            self.handles[split] = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, split: str, record: dict) -> None:
        self.handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts[split] += 1
        self.chars[split] += len(record["text"])

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for split, fh in self.handles.items():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.chmod(self.paths[split], 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
            os.replace(self.paths[split], self.out_dir / f"{split}.jsonl")

    def abort(self) -> None:
        for split, fh in self.handles.items():
            fh.close()
            try:
                os.unlink(self.paths[split])
            except FileNotFoundError:
                pass


class _KeptSources:
    """The source of every kept document in an unnamed temporary file (one JSON string a line), so the few
    named in the report's near-duplicate examples can be looked up at the end without holding them all."""

    def __init__(self, out_dir: Path):
        self.file = tempfile.TemporaryFile(mode="w+", encoding="utf-8", dir=out_dir, prefix=".sources.")

    def add(self, source: str) -> None:
        self.file.write(json.dumps(source, ensure_ascii=False) + "\n")

    def close(self, wanted: list[int]) -> dict[int, str]:
        """Sources of the kept documents numbered ``wanted``; then the file is removed."""
        found: dict[int, str] = {}
        want = set(wanted)
        if want:
            self.file.seek(0)
            for n, line in enumerate(self.file):
                if n in want:
                    found[n] = json.loads(line)
                    if len(found) == len(want):
                        break
        self.file.close()
        return found


@dataclass
class _Cleaned:
    """What a worker returns for one batch of raw records."""

    texts: list[str]  # documents that passed the filters (pieces of split documents are separate)
    sources: list[str]
    files: list[str]
    signatures: Any  # numpy [len(texts), num_perm] or None when near-dedup is off
    characters_after_cleaning: int
    long_documents_split: int
    pieces_added_by_split: int
    dropped: dict[str, int]
    dropped_sources: dict[str, list[str]]  # the first few per rule, for the report's examples
    seconds: float


class _BatchWorker:
    """Clean, split, filter and MinHash one batch of raw records; runs in the main process or in a pool."""

    def __init__(self, clean_cfg: CleanConfig, filter_cfg: FilterConfig, dedup_cfg: DedupConfig):
        self.cleaner = Cleaner(clean_cfg)
        self.filters = filter_cfg
        self.hasher = MinHasher(dedup_cfg.num_perm, dedup_cfg.seed, dedup_cfg.ngram) if dedup_cfg.near else None

    def __call__(self, raw: list[tuple[str, str, str]]) -> _Cleaned:
        start = time.perf_counter()
        fcfg = self.filters
        texts, sources, files = [], [], []
        after_cleaning = long_split = pieces_added = 0
        for text, source, file in raw:
            text = self.cleaner(text)
            after_cleaning += len(text)
            pieces = [text]
            if fcfg.max_chars and len(text) > fcfg.max_chars and fcfg.too_long == "split":
                pieces = split_long(text, fcfg.max_chars)
                long_split += 1
                pieces_added += len(pieces) - 1
            for n, piece in enumerate(pieces, 1):
                texts.append(piece)
                sources.append(source if len(pieces) == 1 else f"{source}/p{n}")
                files.append(file)
        dropped = {rule: 0 for rule in FILTER_RULES}
        dropped_sources: dict[str, list[str]] = {}
        keep = []
        for i, reason in enumerate(filter_reasons(texts, fcfg)):
            if reason is None:
                keep.append(i)
            else:
                dropped[reason] += 1
                examples = dropped_sources.setdefault(reason, [])
                if len(examples) < MAX_EXAMPLES_PER_RULE:
                    examples.append(sources[i])
        texts = [texts[i] for i in keep]
        signatures = self.hasher.signatures(texts) if self.hasher is not None else None
        return _Cleaned(texts, [sources[i] for i in keep], [files[i] for i in keep], signatures, after_cleaning,
                        long_split, pieces_added, dropped, dropped_sources, time.perf_counter() - start)


_worker: _BatchWorker | None = None


def _init_worker(clean_cfg: CleanConfig, filter_cfg: FilterConfig, dedup_cfg: DedupConfig) -> None:
    global _worker
    _worker = _BatchWorker(clean_cfg, filter_cfg, dedup_cfg)


def _work(raw: list[tuple[str, str, str]]) -> _Cleaned:
    assert _worker is not None
    return _worker(raw)


def _auto_workers(files: list) -> int:
    """Worker processes for cleaning and hashing: none for small inputs (a pool costs more than it saves), else
    one per core beside the main process, at most 3 (the main process's deduplication is then the limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2:
        return 0
    size = 0
    for item in files:
        if item.format == "hf":
            size = PARALLEL_MIN_BYTES
            break
        size += os.path.getsize(item.path) * (4 if item.compressed else 1)
    return min(cores - 1, 3) if size >= PARALLEL_MIN_BYTES else 0


# ---------------------------------------------------------------------------------------------- prepare


def run_prepare(cfg: PrepareConfig, _stage1: Any = None) -> dict:
    """The pipeline over a resolved, validated config (:func:`xiaolm.data.prepare.prepare` resolves it and picks
    the engine); returns the report (also written to ``cfg.out/report.json``). ``_stage1`` is the datatrove
    engine's hand-over (the cleaned batches of its parallel tasks, read in task order, instead of reading the
    inputs here).
    """
    started = time.perf_counter()
    read_options = read_options_from(cfg)
    read_options["joiner"] = _unescape(cfg.joiner)
    files = resolve_inputs(cfg.inputs, hf_split=cfg.hf_split, hf_config=cfg.hf_config,
                           hf_cache_dir=cfg.hf_cache_dir)  # every input checked before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers if cfg.workers >= 0 else _auto_workers(files)

    collector = ReadLog(max_listed=cfg.max_malformed_listed) if _stage1 is None else _stage1.collector
    dedup_cfg = cfg.dedup
    if _stage1 is not None and _stage1.near_done:  # datatrove's MinHash stages already removed near-duplicates
        dedup_cfg = dataclasses.replace(cfg.dedup, near=False)
    dedup = Deduplicator(dedup_cfg, spill_dir=str(out)) if (dedup_cfg.exact or dedup_cfg.near) else None
    counts = {
        "documents_in": 0, "characters_in": 0, "characters_after_cleaning": 0, "long_documents_split": 0,
        "pieces_added_by_split": 0, "duplicates_exact": 0, "duplicates_near": 0,
    }
    dropped = {rule: 0 for rule in FILTER_RULES}
    per_file: dict[str, dict] = {} if _stage1 is None else _stage1.per_file
    dropped_examples: dict[str, list[str]] = {}
    kept_sources = _KeptSources(out)  # dedup id -> source (on disk), for the near-duplicate examples
    examples: list[dict] = []
    timings = {"read": 0.0, "clean_filter_minhash": 0.0, "dedup": 0.0, "write": 0.0}

    def raw_batches():
        batch: list[tuple[str, str, str]] = []
        t0 = time.perf_counter()
        for rec in iter_records(files, collector=collector, **read_options):
            stats = per_file.get(rec.source_file)
            if stats is None:
                stats = per_file[rec.source_file] = {"documents_in": 0, "documents_kept": 0, "characters_in": 0,
                                                     "characters_kept": 0}
            stats["documents_in"] += 1
            stats["characters_in"] += len(rec.text)
            counts["documents_in"] += 1
            counts["characters_in"] += len(rec.text)
            batch.append((rec.text, rec.source, rec.source_file))
            if len(batch) >= BATCH_DOCS:
                timings["read"] += time.perf_counter() - t0
                yield batch
                t0 = time.perf_counter()
                batch = []
        timings["read"] += time.perf_counter() - t0
        if batch:
            yield batch

    def handle(result: _Cleaned, n_raw: int) -> None:
        timings["clean_filter_minhash"] += result.seconds
        counts["characters_after_cleaning"] += result.characters_after_cleaning
        counts["long_documents_split"] += result.long_documents_split
        counts["pieces_added_by_split"] += result.pieces_added_by_split
        for rule, n in result.dropped.items():
            dropped[rule] += n
        for rule, sources in result.dropped_sources.items():
            room = MAX_EXAMPLES_PER_RULE - len(dropped_examples.setdefault(rule, []))
            dropped_examples[rule].extend(sources[:max(room, 0)])
        t1 = time.perf_counter()
        verdicts = (dedup.check(result.texts, result.signatures) if dedup is not None
                    else [None] * len(result.texts))
        t2 = time.perf_counter()
        timings["dedup"] += t2 - t1
        for text, source, file, verdict in zip(result.texts, result.sources, result.files, verdicts):
            if verdict is not None and verdict.kind is not None:
                counts[f"duplicates_{verdict.kind}"] += 1
                if verdict.kind == "near" and len(examples) < MAX_EXAMPLES:
                    examples.append({"dropped": source, "kept": verdict.match,
                                     "similarity": round(verdict.similarity, 3)})
                continue
            if verdict is not None:
                kept_sources.add(source)
            split = "val" if is_validation(text, cfg.val_fraction) else "train"
            writer.write(split, {"text": text, "id": document_id(text), "source": source})
            per_file[file]["documents_kept"] += 1
            per_file[file]["characters_kept"] += len(text)
        timings["write"] += time.perf_counter() - t2
        if progress is not None:
            progress.update(n_raw)

    writer = _SplitWriter(out)
    progress = None
    if not cfg.quiet:
        from tqdm.auto import tqdm

        progress = tqdm(desc="prepare", unit=" doc", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        if _stage1 is not None:
            workers = _stage1.tasks
            counts["documents_in"], counts["characters_in"] = _stage1.documents_in, _stage1.characters_in
            timings["read"] = _stage1.read_seconds
            for result, n_raw in _stage1.results():
                handle(result, n_raw)
            counts["duplicates_near"] += _stage1.near_removed
        elif workers == 0:
            worker = _BatchWorker(cfg.clean, cfg.filters, cfg.dedup)
            for raw in raw_batches():
                handle(worker(raw), len(raw))
        else:
            import multiprocessing

            # Batches go out in order and come back in order; at most 2 per worker are in flight, so memory
            # stays bounded however large the corpus.
            with multiprocessing.Pool(workers, initializer=_init_worker,
                                      initargs=(cfg.clean, cfg.filters, cfg.dedup)) as pool:
                pending: deque = deque()
                for raw in raw_batches():
                    pending.append((pool.apply_async(_work, (raw,)), len(raw)))
                    if len(pending) >= 2 * workers + 1:
                        job, n_raw = pending.popleft()
                        handle(job.get(), n_raw)
                while pending:
                    job, n_raw = pending.popleft()
                    handle(job.get(), n_raw)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if progress is not None:
            progress.close()
        if dedup is not None:
            dedup.close()
        names = kept_sources.close([e["kept"] for e in examples])
    for example in examples:
        example["kept"] = names[example["kept"]]

    wall = time.perf_counter() - started
    kept = writer.counts["train"] + writer.counts["val"]
    warnings = list(collector.warnings)
    if counts["documents_in"] == 0:
        warnings.append("no documents were read: check --field and the inputs")
    if cfg.val_fraction > 0 and writer.counts["val"] == 0 and kept > 0:
        warnings.append(f"val.jsonl is empty: {kept} documents at val_fraction {cfg.val_fraction} gave none "
                        "(the split is by text hash and is not topped up)")
    files_report = []
    for item in files:
        stats = per_file.get(item.path, {"documents_in": 0, "documents_kept": 0, "characters_in": 0,
                                         "characters_kept": 0})
        read_stats = collector.files.get(item.path)
        files_report.append({"file": item.path, "format": item.format + (".gz" if item.compressed else ""),
                             **stats, "malformed": read_stats.malformed if read_stats else 0,
                             "encoding": read_stats.encoding if read_stats else None})
    report = {
        "inputs": cfg.inputs,
        "out": str(out),
        "documents_in": counts["documents_in"],
        "documents_kept": kept,
        "characters_in": counts["characters_in"],
        "characters_after_cleaning": counts["characters_after_cleaning"],
        "characters_kept": writer.chars["train"] + writer.chars["val"],
        "long_documents_split": counts["long_documents_split"],
        "pieces_added_by_split": counts["pieces_added_by_split"],
        "dropped": dropped,
        "dropped_examples": dropped_examples,
        "duplicates_exact": counts["duplicates_exact"],
        "duplicates_near": counts["duplicates_near"],
        "near_duplicate_examples": examples,
        "malformed_count": collector.malformed_total,
        "malformed_by_reason": collector.by_reason,
        "malformed": [m.to_dict() for m in collector.malformed],
        "files": files_report,
        "train": {"documents": writer.counts["train"], "characters": writer.chars["train"]},
        "val": {"documents": writer.counts["val"], "characters": writer.chars["val"]},
        "val_fraction": cfg.val_fraction,
        "wall_seconds": round(wall, 3),
        "documents_per_second": round(counts["documents_in"] / wall, 1) if wall > 0 else None,
        "dedup_documents_per_second": (round((kept + counts["duplicates_exact"] + counts["duplicates_near"])
                                             / timings["dedup"], 1) if timings["dedup"] > 0 else None),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "workers": workers,
        "warnings": warnings,
    }
    atomic_write_json(out / "report.json", report)
    save_config(cfg, out / "config.yaml")
    return report
