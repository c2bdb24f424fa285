"""Deduplication and ``data prepare`` throughput, in documents per second, with a baseline measured in the same run.

Corpus: N documents of about 8 sentences each, built from the ``modern`` sentences of
../shared/data/classical_modern_bitext (random Han text when the real data is absent), plus planted copies:
``--exact-share`` exact duplicates and ``--near-share`` near-duplicates (a few characters changed). The table shows:

- baseline: datasketch's documented route, one ``MinHash`` per document fed with ``update_batch`` over its
  encoded 5-gram shingles (SHA-1 per shingle), timed on a subset;
- xiaolm batched signatures (numpy, same affine32 permutations);
- the whole Deduplicator (signatures + exact hash + LSH query/insert + Jaccard check), with datasketch's
  MinHashLSH index (the code before) and with the numpy band-key index, each in a forked child so its resident
  memory growth is measured too; the verdicts of the two are compared;
- ``prepare`` end to end (read JSONL, clean, filter, dedup, split, write) on the same corpus, in the main process
  only and with the automatic number of worker processes;
- how many planted duplicates were caught, and how many original documents were wrongly removed.

Usage: python bench/dedup_throughput.py [--docs 100000] [--baseline-docs 5000]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BITEXT = REPO.parent / "shared" / "data" / "classical_modern_bitext" / "bitext_subset.jsonl"


def build_corpus(n_docs: int, exact_share: float, near_share: float, seed: int = 0):
    """Returns (docs, kinds, description) where kinds[i] is 'orig', 'exact' or 'near'."""
    rng = random.Random(seed)
    if BITEXT.is_file():
        sentences = [json.loads(line)["modern"] for line in BITEXT.open(encoding="utf-8")]
        source = "classical_modern_bitext modern sentences"
    else:
        han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        sentences = ["".join(rng.choice(han) for _ in range(rng.randint(10, 40))) + "。" for _ in range(40000)]
        source = "random Han characters (real data absent)"
    n_orig = int(n_docs * (1 - exact_share - near_share))
    docs, kinds = [], []
    for _ in range(n_orig):
        docs.append("".join(rng.choice(sentences) for _ in range(8)))
        kinds.append("orig")
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    while len(docs) < n_docs:
        base = docs[rng.randrange(n_orig)]
        if rng.random() < exact_share / (exact_share + near_share):
            docs.append(base)
            kinds.append("exact")
        else:
            chars = list(base)
            for _ in range(3):  # three single-character substitutions
                chars[rng.randrange(len(chars))] = rng.choice(han)
            docs.append("".join(chars))
            kinds.append("near")
    # Every original comes before its copies, so the original is the copy that is kept.
    return docs, kinds, source


def baseline_docs_per_second(docs: list[str], num_perm: int, ngram: int) -> float:
    from datasketch import MinHash

    start = time.perf_counter()
    for text in docs:
        chars = "".join(text.split())
        shingles = {chars[i:i + ngram].encode("utf-8") for i in range(max(1, len(chars) - ngram + 1))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(shingles)
    return len(docs) / (time.perf_counter() - start)


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _run_dedup_in_child(docs: list[str], num_perm: int, index: str):
    """(documents/s, verdicts, peak resident growth in bytes) of one Deduplicator run in a forked child, so
    each index's memory is measured from the same starting point."""
    import multiprocessing
    import pickle

    def child(conn):
        from xiaolm.data.dedup import DedupConfig, Deduplicator

        before = _rss("VmRSS")
        dedup = Deduplicator(DedupConfig(num_perm=num_perm), index=index)
        verdicts = []
        start = time.perf_counter()
        for i in range(0, len(docs), 1024):
            verdicts.extend(dedup.check(docs[i:i + 1024]))
        rate = len(docs) / (time.perf_counter() - start)
        conn.send_bytes(pickle.dumps((rate, verdicts, _rss("VmHWM") - before)))

    ctx = multiprocessing.get_context("fork")
    parent, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(child_end,))
    proc.start()
    result = pickle.loads(parent.recv_bytes())
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000, help="documents in the corpus")
    parser.add_argument("--baseline-docs", type=int, default=5_000, help="documents timed for the baseline")
    parser.add_argument("--exact-share", type=float, default=0.05)
    parser.add_argument("--near-share", type=float, default=0.10)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--skip-prepare", action="store_true", help="do not time prepare end to end")
    parser.add_argument("--datatrove-tasks", type=int, default=0,
                        help="also run prepare --engine datatrove with this many tasks, with our near-dedup and "
                             "with datatrove's MinHash stages, and count what each caught (needs datatrove)")
    args = parser.parse_args()

    from xiaolm.data.dedup import MinHasher
    from xiaolm.data.prepare import prepare

    docs, kinds, source = build_corpus(args.docs, args.exact_share, args.near_share)
    chars = sum(len(d) for d in docs)
    print(f"corpus: {len(docs):,} documents, {chars / len(docs):.0f} characters each on average, from {source}")
    print(f"planted: {kinds.count('exact'):,} exact and {kinds.count('near'):,} near duplicates "
          f"(3 characters changed)\n")

    rows = []
    base = baseline_docs_per_second(docs[: args.baseline_docs], args.num_perm, 5)
    rows.append(("datasketch MinHash.update_batch per document (baseline)", base, 1.0))

    hasher = MinHasher(args.num_perm, 1, 5)
    start = time.perf_counter()
    for i in range(0, len(docs), 1024):
        hasher.signatures(docs[i:i + 1024])
    sig_rate = len(docs) / (time.perf_counter() - start)
    rows.append(("xiaolm batched signatures (numpy)", sig_rate, sig_rate / base))

    memory = {}
    for index in ("datasketch", "numpy"):
        dedup_rate, verdicts, memory[index] = _run_dedup_in_child(docs, args.num_perm, index)
        label = ("xiaolm Deduplicator (datasketch MinHashLSH index, before)" if index == "datasketch"
                 else "xiaolm Deduplicator (numpy band-key index)")
        rows.append((label, dedup_rate, dedup_rate / base))
        if index == "datasketch":
            reference = [(v.kind, v.match) for v in verdicts]
    same = reference == [(v.kind, v.match) for v in verdicts]

    if not args.skip_prepare:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "corpus.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                for d in docs:
                    fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            for workers in (0, -1):
                start = time.perf_counter()
                report = prepare([str(path)], Path(tmp) / "out", quiet=True, workers=workers)
                prep_rate = len(docs) / (time.perf_counter() - start)
                label = "main process only" if workers == 0 else f"{report['workers']} worker process(es)"
                rows.append((f"xiaolm prepare end to end, {label}", prep_rate, prep_rate / base))

    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  {'documents/s':>12}  {'vs baseline':>11}")
    print(f"{'-' * width}  {'-' * 12}  {'-' * 11}")
    for name, rate, ratio in rows:
        print(f"{name:<{width}}  {rate:>12,.0f}  {ratio:>10.1f}x")

    kept = sum(v.kind is None for v in verdicts)
    print()
    for index, grown in memory.items():
        print(f"resident growth while deduplicating, {index} index: {grown / 2**20:,.0f} MB "
              f"({grown / kept:,.0f} bytes per kept document)")
    print(f"verdicts identical between the two indexes: {same}")
    caught = {"exact": 0, "near": 0}
    false_removed = 0
    for kind, v in zip(kinds, verdicts):
        if kind == "orig" and v.kind is not None:
            false_removed += 1
        elif kind != "orig" and v.kind is not None:
            caught[kind] += 1
    print()
    print(f"exact duplicates caught: {caught['exact']:,} / {kinds.count('exact'):,}")
    print(f"near duplicates caught:  {caught['near']:,} / {kinds.count('near'):,} "
          f"(threshold 0.8; 3 changes in ~{chars / len(docs):.0f} characters)")
    print(f"original documents removed: {false_removed:,} / {kinds.count('orig'):,}")
    if not args.skip_prepare:
        print(f"prepare report: kept {report['documents_kept']:,}, exact {report['duplicates_exact']:,}, "
              f"near {report['duplicates_near']:,}, dropped {report['dropped']}")
    if args.datatrove_tasks:
        engines_table(docs, kinds, args.datatrove_tasks)


def engines_table(docs: list[str], kinds: list[str], tasks: int) -> None:
    """What each engine caught, from the sources of the documents it kept (the corpus in 4 files, in order)."""
    from xiaolm.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        files, offsets = [], {}
        per = -(-len(docs) // 4)
        for k in range(4):
            path = Path(tmp) / f"part{k}.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                for d in docs[k * per:(k + 1) * per]:
                    fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            files.append(str(path))
            offsets[str(path)] = k * per
        runs = [("xiaolm engine", {}),
                (f"datatrove engine, {tasks} tasks, our near-dedup", dict(engine="datatrove", tasks=tasks)),
                (f"datatrove engine, {tasks} tasks, datatrove MinHash stages",
                 dict(engine="datatrove", tasks=tasks, near_dedup="datatrove"))]
        print()
        print(f"{'engine':<52}  {'documents/s':>11}  {'exact caught':>12}  {'near caught':>11}  {'originals removed':>17}")
        for label, options in runs:
            out = Path(tmp) / "out"
            start = time.perf_counter()
            prepare(files, out, quiet=True, **options)
            rate = len(docs) / (time.perf_counter() - start)
            kept = set()
            for split in ("train", "val"):
                for line in (out / f"{split}.jsonl").open(encoding="utf-8"):
                    file, _, lineno = json.loads(line)["source"].rpartition(":")
                    kept.add(offsets[file] + int(lineno) - 1)
            caught = {k: sum(1 for i, kind in enumerate(kinds) if kind == k and i not in kept)
                      for k in ("exact", "near", "orig")}
            print(f"{label:<52}  {rate:>11,.0f}  {caught['exact']:>5,} / {kinds.count('exact'):<5,}  "
                  f"{caught['near']:>5,} / {kinds.count('near'):<5,}  {caught['orig']:>8,} / {kinds.count('orig'):<7,}")


if __name__ == "__main__":
    main()
