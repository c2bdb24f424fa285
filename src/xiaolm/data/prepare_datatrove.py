"""``xiaolm data prepare --engine datatrove``: the same pipeline and output, its parallel part run as datatrove tasks.

Hugging Face's datatrove (the engine FineWeb was built with) runs pipelines of blocks as tasks on one machine
(``LocalPipelineExecutor``), on Slurm or on Ray. Here the pipeline is made of our own blocks, so the rules are
exactly those of the default engine:

    stage 1, ``--tasks`` tasks:  XiaolmReader -> XiaolmCleanFilterMinhash -> XiaolmStage1Writer
    stage 2, one task:           XiaolmDedupSplit

Stage 1: task ``r`` reads a contiguous run of the input files (``iter_records``, malformed records logged with
file and line), cleans, splits long documents, filters, and computes MinHash signatures (character 5-grams,
:class:`~xiaolm.data.dedup.MinHasher`), writing ``OUT/.datatrove/stage1/{r}.jsonl`` (text, source, file),
``{r}.sig`` (uint32 signatures) and ``{r}.stats.json`` (its counters and read log). Stage 2 reads the tasks'
outputs in task order, which is input order, and hands them to :func:`xiaolm.data.prepare_core.run_prepare`'s own
deduplication, split and report code: ``train.jsonl``, ``val.jsonl`` and ``report.json`` (counters summed over the
tasks) are the same as the default engine's for the same inputs, whatever the number of tasks.

Why our deduplication rather than datatrove's MinHash stages: those cluster every LSH band match transitively and
keep one document per cluster without checking the estimated Jaccard similarity, so they drop a different (larger)
set than "keep the first occurrence, drop a document whose similarity to a kept one reaches the threshold". Their
defaults also do not suit Chinese: ``MinhashDedupSignature`` shingles *word* n-grams after ``simplify_text``
(punctuation removed) with the English spaCy word tokenizer by default (``language="zh"``: spaCy + jieba words),
never character n-grams. Deduplication is the one sequential step; at about 6,000
documents/s per core (bench/dedup_throughput.py) it is not the limit up to tens of millions of documents.

Slurm: ``--executor slurm --slurm-partition P`` submits stage 1 as an array job of ``--tasks`` tasks and stage 2 as
a job that depends on it, and returns; ``report.json`` appears when stage 2 finishes (logs in
``OUT/.datatrove/logs``). Ray: ``--executor ray`` runs the tasks on the Ray cluster ``ray.init()`` finds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

try:  # datatrove is an optional extra: pip install 'xiaolm[datatrove]'
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # pragma: no cover - exercised only without the extra
    PipelineStep = object  # type: ignore[assignment,misc]
    Document = None  # type: ignore[assignment]

WORK = ".datatrove"


def _need_datatrove() -> None:
    if Document is None:
        raise ValueError("--engine datatrove needs datatrove: pip install 'xiaolm[datatrove]'")


def task_slice(n: int, rank: int, world_size: int) -> range:
    """Contiguous items of task ``rank``: order across tasks is input order."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def _stage1_dir(out: str | Path) -> Path:
    return Path(out) / WORK / "stage1"


class XiaolmReader(PipelineStep):
    """Reads the task's run of input files with :func:`xiaolm.data.readers.iter_records`; counts per file and logs
    malformed records, saved for the report when the task's input is exhausted."""

    name = "xiaolm reader"
    type = "📖 - READER"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from xiaolm.data.prepare_core import _unescape
        from xiaolm.data.readers import ReadLog, iter_records, read_options_from, resolve_inputs

        cfg = self.cfg
        files = resolve_inputs(cfg.inputs, hf_split=cfg.hf_split, hf_config=cfg.hf_config,
                               hf_cache_dir=cfg.hf_cache_dir)
        mine = [files[i] for i in task_slice(len(files), rank, world_size)]
        options = read_options_from(cfg)
        options["joiner"] = _unescape(cfg.joiner)
        collector = ReadLog(max_listed=cfg.max_malformed_listed)
        per_file: dict[str, dict] = {}
        start, n = time.perf_counter(), 0
        if mine:
            for rec in iter_records(mine, collector=collector, **options):
                stats = per_file.setdefault(rec.source_file, {"documents_in": 0, "documents_kept": 0,
                                                              "characters_in": 0, "characters_kept": 0})
                stats["documents_in"] += 1
                stats["characters_in"] += len(rec.text)
                n += 1
                self.stat_update("documents")
                yield Document(text=rec.text, id=rec.source, metadata={"file": rec.source_file})
        read = {
            "per_file": per_file,
            "malformed_total": collector.malformed_total,
            "by_reason": collector.by_reason,
            "malformed": [m.to_dict() for m in collector.malformed],
            "warnings": collector.warnings,
            "file_malformed": {f: s.malformed for f, s in collector.files.items()},
            "documents_in": n,
            "characters_in": sum(s["characters_in"] for s in per_file.values()),
            "read_seconds": time.perf_counter() - start,
        }
        out = _stage1_dir(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{rank:05d}.read.json").write_text(json.dumps(read, ensure_ascii=False), encoding="utf-8")


class XiaolmCleanFilterMinhash(PipelineStep):
    """Our cleaning, long-document split, quality filters and MinHash signatures (prepare's ``_BatchWorker``), a
    batch of documents at a time; forwards the kept pieces with their signature in ``metadata["sig"]``."""

    name = "xiaolm clean + filter + minhash"
    type = "🔻 - FILTER"

    def __init__(self, cfg, batch: int = 1024):
        super().__init__()
        self.cfg, self.batch = cfg, batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        from xiaolm.data.clean import FILTER_RULES
        from xiaolm.data.prepare_core import MAX_EXAMPLES_PER_RULE, _BatchWorker

        worker = _BatchWorker(self.cfg.clean, self.cfg.filters, self.cfg.dedup)
        totals: dict[str, Any] = {"characters_after_cleaning": 0, "long_documents_split": 0,
                                  "pieces_added_by_split": 0, "dropped": {r: 0 for r in FILTER_RULES},
                                  "dropped_sources": {}, "seconds": 0.0}

        def flush(raw):
            result = worker(raw)
            for key in ("characters_after_cleaning", "long_documents_split", "pieces_added_by_split", "seconds"):
                totals[key] += getattr(result, key)
            for rule, k in result.dropped.items():
                totals["dropped"][rule] += k
                if k:
                    self.stat_update(f"dropped_{rule}", value=k)
            for rule, sources in result.dropped_sources.items():
                have = totals["dropped_sources"].setdefault(rule, [])
                have.extend(sources[:max(0, MAX_EXAMPLES_PER_RULE - len(have))])
            for i, (text, source, file) in enumerate(zip(result.texts, result.sources, result.files)):
                sig = result.signatures[i] if result.signatures is not None else None
                yield Document(text=text, id=source, metadata={"file": file, "sig": sig})

        raw: list[tuple[str, str, str]] = []
        for doc in data:
            raw.append((doc.text, doc.id, doc.metadata["file"]))
            if len(raw) >= self.batch:
                yield from flush(raw)
                raw = []
        if raw:
            yield from flush(raw)
        out = _stage1_dir(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{rank:05d}.clean.json").write_text(json.dumps(totals, ensure_ascii=False), encoding="utf-8")


class XiaolmStage1Writer(PipelineStep):
    """Writes the task's surviving documents (one JSON array a line) and their signatures (raw uint32 rows)."""

    name = "xiaolm stage-1 writer"
    type = "💽 - WRITER"

    def __init__(self, cfg, forward: bool = False):
        super().__init__()
        self.cfg, self.forward = cfg, forward

    def run(self, data, rank: int = 0, world_size: int = 1):
        out = _stage1_dir(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(out / f"{rank:05d}.jsonl.tmp", "w", encoding="utf-8") as docs, \
                open(out / f"{rank:05d}.sig.tmp", "wb") as sigs:
            for doc in data:
                docs.write(json.dumps([doc.text, doc.id, doc.metadata["file"]], ensure_ascii=False) + "\n")
                if doc.metadata.get("sig") is not None:
                    sigs.write(np.ascontiguousarray(doc.metadata["sig"], dtype=np.uint32).tobytes())
                n += 1
                self.stat_update("documents")
                if self.forward:  # to datatrove's MinHash signature block, in the same order
                    yield doc
        for suffix in ("jsonl", "sig"):
            (out / f"{rank:05d}.{suffix}.tmp").replace(out / f"{rank:05d}.{suffix}")


def _char_minhash_signature_step():
    """datatrove's MinHash signature block with our shingles: character n-grams of the text with whitespace
    removed, punctuation kept (its default is word n-grams of ``simplify_text``, see the module docstring)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Characters(WordTokenizer):
        """Characters as words: its default word tokenizer would need spaCy and is not used here anyway."""

        def word_tokenize(self, text: str) -> list[str]:
            return [c for c in text if not c.isspace()]

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(i, i + 1) for i, c in enumerate(text) if not c.isspace()]

    class CharShingleMinhashSignature(MinhashDedupSignature):
        name = "🎯 MinHash stage 1 (character shingles)"

        def __init__(self, output_folder, config, ngram: int):
            super().__init__(output_folder, config=config, language=Characters("zh"))
            self.ngram = ngram

        def get_shingles(self, text: str) -> np.ndarray:
            from xiaolm.data.dedup import shingle_hashes

            return np.unique(shingle_hashes(text, self.ngram).astype(np.uint64)).reshape((-1, 1))

    return CharShingleMinhashSignature


def _minhash_config(cfg):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    # 14 bands of 8 rows (datatrove's default: a pair at Jaccard 0.8 becomes a candidate 92% of the time) and
    # sha1 configured only so that xxhash is not required: our shingles replace its hash of word n-grams.
    return MinhashConfig(n_grams=cfg.dedup.ngram, num_buckets=14, hashes_per_bucket=8, seed=cfg.dedup.seed,
                         hash_config=HashConfig(precision=64, hash_fc="sha1"))


class _Stage1Results:
    """Stage 1's outputs, merged in task order, as prepare()'s hand-over (``_stage1``)."""

    def __init__(self, cfg, tasks: int, batch: int = 1024):
        from xiaolm.data.readers import Malformed, ReadLog

        self.cfg, self.tasks, self.batch = cfg, tasks, batch
        self.dir = _stage1_dir(cfg.out)
        self.collector = ReadLog(max_listed=cfg.max_malformed_listed)
        self.per_file: dict[str, dict] = {}
        self.documents_in = self.characters_in = 0
        self.read_seconds = 0.0
        self.cleaned = []
        self.near_done = cfg.near_dedup == "datatrove"
        self.near_removed = 0
        missing = [r for r in range(tasks) if not (self.dir / f"{r:05d}.jsonl").is_file()]
        if missing:
            raise RuntimeError(f"datatrove stage 1 did not finish tasks {missing[:10]} (logs in "
                               f"{Path(cfg.out) / WORK / 'logs'})")
        for r in range(tasks):
            read = json.loads((self.dir / f"{r:05d}.read.json").read_text(encoding="utf-8"))
            c = self.collector
            c.malformed_total += read["malformed_total"]
            for reason, k in read["by_reason"].items():
                c.by_reason[reason] = c.by_reason.get(reason, 0) + k
            room = max(0, c.max_listed - len(c.malformed))
            c.malformed.extend(Malformed(m["file"], m["line"], m["reason"], m.get("row"))
                               for m in read["malformed"][:room])
            c.warnings.extend(read["warnings"])
            for f, k in read["file_malformed"].items():
                from xiaolm.data.readers import FileStats

                c.files.setdefault(f, FileStats(f, "")).malformed += k
            self.per_file.update(read["per_file"])
            self.documents_in += read["documents_in"]
            self.characters_in += read["characters_in"]
            self.read_seconds += read["read_seconds"]
            self.cleaned.append(json.loads((self.dir / f"{r:05d}.clean.json").read_text(encoding="utf-8")))

    def results(self):
        from xiaolm.data.prepare_core import _Cleaned

        num_perm = self.cfg.dedup.num_perm
        near = self.cfg.dedup.near and not self.near_done
        for r in range(self.tasks):
            totals = self.cleaned[r]
            # The task's counters first (a batch with no documents), then its documents in batches.
            yield _Cleaned([], [], [], np.zeros((0, num_perm), np.uint32) if near else None,
                           totals["characters_after_cleaning"], totals["long_documents_split"],
                           totals["pieces_added_by_split"], totals["dropped"], totals["dropped_sources"],
                           totals["seconds"]), 0
            removed = self._removed(r)
            sig_file = open(self.dir / f"{r:05d}.sig", "rb")
            with open(self.dir / f"{r:05d}.jsonl", encoding="utf-8") as docs, sig_file:
                batch: list = []
                for idx, line in enumerate(docs):
                    if idx in removed:
                        self.near_removed += 1
                        continue
                    batch.append(json.loads(line))
                    if len(batch) >= self.batch:
                        yield self._batch(batch, sig_file, num_perm, near), len(batch)
                        batch = []
                if batch:
                    yield self._batch(batch, sig_file, num_perm, near), len(batch)

    def _removed(self, rank: int) -> set[int]:
        """Indices of the task's documents that datatrove's MinHash clustering removed."""
        path = Path(self.cfg.out) / WORK / "minhash" / "remove" / f"{rank:06d}.remove"
        if not self.near_done or not path.is_file():
            return set()
        return set(np.fromfile(path, dtype="<u4").tolist())

    @staticmethod
    def _batch(batch, sig_file, num_perm: int, near: bool):
        from xiaolm.data.prepare_core import _Cleaned

        sigs = None
        if near:
            sigs = np.frombuffer(sig_file.read(len(batch) * num_perm * 4), dtype=np.uint32)
            sigs = sigs.reshape(len(batch), num_perm)
        return _Cleaned([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch], sigs, 0, 0, 0, {}, {},
                        0.0)


class XiaolmDedupSplit(PipelineStep):
    """Stage 2 (one task): prepare()'s deduplication, train/val split and report over stage 1's outputs."""

    name = "xiaolm dedup + split + report"
    type = "🫂 - DEDUP"

    def __init__(self, cfg, tasks: int):
        super().__init__()
        self.cfg, self.tasks = cfg, tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from xiaolm.data.prepare_core import run_prepare

        report = run_prepare(self.cfg, _stage1=_Stage1Results(self.cfg, self.tasks))
        self.stat_update("documents_kept", value=report["documents_kept"])
        return
        yield


def _executor(kind: str, pipeline: list, tasks: int, logs: Path, cfg, depends=None, name: str = "xiaolm"):
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, os.cpu_count() or 1),
                                     logging_dir=str(logs), depends=depends, start_method="fork")
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not cfg.slurm_partition:
            raise ValueError("--executor slurm needs --slurm-partition")
        # The nodes run the pickled pipeline with this Python environment (a shared filesystem is assumed).
        return SlurmPipelineExecutor(pipeline, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                     logging_dir=str(logs), job_name=name, depends=depends,
                                     venv_path=os.environ.get("VIRTUAL_ENV"))
    if kind == "ray":
        try:
            from datatrove.executor import RayPipelineExecutor
        except ImportError as exc:
            raise ValueError(f"--executor ray needs ray: pip install 'datatrove[ray]' ({exc})") from None
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(logs))
    raise ValueError(f"executor must be local, slurm or ray, got {kind!r}")


def _quiet(quiet: bool):
    """datatrove logs every task to stderr; with --quiet only to its log files (OUT/.datatrove/logs)."""
    import contextlib

    if not quiet:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
    return stack


def prepare_datatrove(cfg) -> dict | None:
    """Run both stages; returns the report (None with Slurm, whose jobs finish later)."""
    from xiaolm.data.readers import resolve_inputs
    from xiaolm.utils import log

    _need_datatrove()
    resolve_inputs(cfg.inputs, hf_split=cfg.hf_split, hf_config=cfg.hf_config,
                   hf_cache_dir=cfg.hf_cache_dir)  # every input checked before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK
    shutil.rmtree(work, ignore_errors=True)  # a previous run's tasks must not count as done
    slurm = cfg.executor == "slurm"
    stages = []
    if cfg.near_dedup == "datatrove" and cfg.dedup.near:
        from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster

        mh = _minhash_config(cfg)
        no_sigs = dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, near=False))
        signature = _char_minhash_signature_step()(str(work / "minhash" / "sigs"), mh, cfg.dedup.ngram)
        stages.append(_executor(cfg.executor, [XiaolmReader(cfg), XiaolmCleanFilterMinhash(no_sigs),
                                               XiaolmStage1Writer(cfg, forward=True), signature],
                                cfg.tasks, work / "logs" / "stage1", cfg, name="xiaolm-prepare-1"))
        stages.append(_executor(cfg.executor, [MinhashDedupBuckets(str(work / "minhash" / "sigs"),
                                                                   str(work / "minhash" / "buckets"), config=mh)],
                                mh.num_buckets, work / "logs" / "buckets", cfg, name="xiaolm-minhash-buckets",
                                depends=stages[-1] if slurm else None))
        stages.append(_executor(cfg.executor, [MinhashDedupCluster(str(work / "minhash" / "buckets"),
                                                                   str(work / "minhash" / "remove"), config=mh)],
                                1, work / "logs" / "cluster", cfg, name="xiaolm-minhash-cluster",
                                depends=stages[-1] if slurm else None))
    else:
        stages.append(_executor(cfg.executor, [XiaolmReader(cfg), XiaolmCleanFilterMinhash(cfg),
                                               XiaolmStage1Writer(cfg)],
                                cfg.tasks, work / "logs" / "stage1", cfg, name="xiaolm-prepare-1"))
    stage2 = _executor(cfg.executor, [XiaolmDedupSplit(cfg, cfg.tasks)], 1, work / "logs" / "stage2", cfg,
                       depends=stages[-1] if slurm else None, name="xiaolm-prepare-2")
    if slurm:
        stage2.run()  # submits the stages before it first (its dependencies)
        log(f"submitted to Slurm: {cfg.tasks} stage-1 tasks and the dedup/split task; report.json appears in "
            f"{out} when they finish (logs in {work / 'logs'})")
        return None
    with _quiet(cfg.quiet):
        for stage in stages:
            stage.run()
        stage2.run()
    report_path = out / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"datatrove stage 2 did not write {report_path} (logs in {work / 'logs'})")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    shutil.rmtree(work / "stage1", ignore_errors=True)
    shutil.rmtree(work / "minhash", ignore_errors=True)
    return report
