"""Exact and near-duplicate removal: a content hash, then MinHash LSH over character n-gram shingles.

Exact: the key is a 128-bit BLAKE2b hash of the cleaned text with all whitespace removed, so copies that differ
only in spacing or line breaks are exact duplicates.

Near: each document (whitespace removed) becomes the set of its character ``ngram``-grams (default 5; 1 is
refused, because single characters would make most Chinese text look alike; a document shorter than ``ngram``
is one shingle). Its MinHash signature uses datasketch's ``affine32`` scheme (``datasketch.MinHash``'s own
permutations: MurmurHash3 finaliser, then ``a*h + b mod 2**32``), but is computed for a whole batch of documents
at once with numpy instead of one Python call per shingle: every shingle is hashed by a vectorised FNV-style
hash over the code points, and each permutation is applied to all shingles of the batch and reduced per document
with ``np.minimum.reduceat``. The signatures are identical to what ``MinHash.update_batch`` computes from the same
shingle hashes (a test checks this). The LSH index has datasketch's ``MinHashLSH`` bands but keeps them as
64-bit band keys in sorted numpy arrays (:class:`Deduplicator`), about 180 bytes per kept document instead of
about 6 KB of Python objects, so memory stays small for corpora of millions of documents.

A candidate from the LSH index counts as a duplicate only if its estimated Jaccard similarity (the share of equal
signature slots) reaches ``threshold``; LSH alone also returns some pairs below it. Because of that check the LSH
bands are chosen for recall (``false_negative_weight`` 0.9: 14 bands of 9 rows at 128 permutations and threshold
0.8, which makes a pair with Jaccard 0.85 a candidate 97% of the time; datasketch's balanced default, 9 bands of 13
rows, finds only 69% of them). Documents are checked in
order against the documents kept so far, so the first copy is kept and every dropped document names the kept
one it matched.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from xiaolm.config import opt

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_SCHEME = "affine32"
_CHUNK_CHARS = 150_000


@dataclass
class DedupConfig:
    exact: bool = opt(True, "drop exact duplicates (same text ignoring whitespace)")
    near: bool = opt(True, "drop near-duplicates found by MinHash LSH")
    ngram: int = opt(5, "shingle size in characters for near-duplicate detection (at least 2)")
    threshold: float = opt(0.8, "Jaccard similarity of shingle sets at or above which documents are near-duplicates")
    num_perm: int = opt(128, "MinHash permutations (more: finer similarity estimates, slower)")
    seed: int = opt(1, "seed of the MinHash permutations")
    false_negative_weight: float = opt(0.9, "how much datasketch's choice of LSH bands and rows weighs missed "
                                            "pairs against spurious candidates (0-1); candidates are verified "
                                            "against the threshold, so recall is favoured")


def validate_dedup(cfg: DedupConfig) -> None:
    if cfg.ngram < 2:
        raise ValueError(f"dedup.ngram must be at least 2 (single characters make most Chinese text look "
                         f"duplicate), got {cfg.ngram}")
    if not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"dedup.threshold must be in (0, 1], got {cfg.threshold}")
    if not 0.0 < cfg.false_negative_weight < 1.0:
        raise ValueError(f"dedup.false_negative_weight must be between 0 and 1, got {cfg.false_negative_weight}")
    if cfg.num_perm < 16:
        raise ValueError(f"dedup.num_perm must be at least 16, got {cfg.num_perm}")


def exact_key(text: str) -> bytes:
    """Hash of the text with whitespace removed."""
    return hashlib.blake2b("".join(text.split()).encode("utf-8"), digest_size=16).digest()


# ----------------------------------------------------------------------------------------------- hashing


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch's affine32 scheme applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fold32(h: np.ndarray) -> np.ndarray:
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the character ``ngram``-grams of ``text`` with whitespace removed (one per position)."""
    chars = "".join(text.split())
    if not chars:
        return np.zeros(0, dtype=np.uint32)
    cps = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(ngram, len(cps))
    m = len(cps) - n + 1
    h = np.full(m, _FNV_OFFSET, dtype=np.uint64)
    for j in range(n):
        h = (h ^ cps[j:j + m]) * _FNV_PRIME
    return _fold32(h)


def _batch_shingles(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of a batch, concatenated, and each document's count (same as shingle_hashes per text).

    The code points of all documents are hashed in one pass; positions whose n-gram would run into the next
    document are dropped. Documents shorter than ``ngram`` are hashed on their own (one shingle each).
    """
    stripped = ["".join(t.split()) for t in texts]
    lengths = np.fromiter((len(s) for s in stripped), dtype=np.int64, count=len(stripped))
    counts = np.maximum(lengths - ngram + 1, 0)
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    cps = np.frombuffer("".join(stripped).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    m = len(cps) - ngram + 1
    if m > 0:
        h = np.full(m, _FNV_OFFSET, dtype=np.uint64)
        for j in range(ngram):
            h = (h ^ cps[j:j + m]) * _FNV_PRIME
        ends = np.cumsum(lengths)
        doc_of = np.repeat(np.arange(len(stripped)), lengths)[:m]
        valid = np.arange(m) + ngram <= ends[doc_of]
        hashes = _fold32(h[valid])
    else:
        hashes = np.zeros(0, dtype=np.uint32)
    if len(short):
        # Splice each short document's single shingle in at its place (documents are contiguous in order).
        offsets = np.concatenate([[0], np.cumsum(counts)])
        pieces, last = [], 0
        for i in short:
            pieces.append(hashes[last:offsets[i]])
            pieces.append(shingle_hashes(stripped[i], ngram))
            last = offsets[i]
        pieces.append(hashes[last:])
        hashes = np.concatenate(pieces)
        counts = counts.copy()
        counts[short] = 1
    return hashes, counts


class MinHasher:
    """Batch MinHash signatures in datasketch's affine32 scheme."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5):
        from datasketch import MinHash

        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.empty = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)

    def signatures_from_hashes(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``[len(counts), num_perm]`` uint32 signatures; a document with no shingles gets the empty signature.

        One permutation at a time over all shingles of the batch, then a per-document ``minimum.reduceat``: this
        keeps every numpy pass contiguous (about 20x faster than a ``[shingles x num_perm]`` block).
        """
        sigs = np.tile(self.empty, (len(counts), 1))
        nonempty = np.flatnonzero(counts > 0)
        if len(nonempty) == 0:
            return sigs
        mixed = _fmix32(hashes.astype(np.uint32))
        starts = (np.cumsum(counts) - counts)[nonempty].astype(np.int64)
        permuted = np.empty_like(mixed)
        columns = np.empty((self.num_perm, len(nonempty)), dtype=np.uint32)
        for k in range(self.num_perm):
            np.multiply(mixed, self.a[k], out=permuted)
            permuted += self.b[k]
            columns[k] = np.minimum.reduceat(permuted, starts)
        sigs[nonempty] = columns.T
        return sigs

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """Signatures of ``texts``, computed in chunks of about ``_CHUNK_CHARS`` characters (cache-sized: about
        twice as fast as one big chunk)."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        start = 0
        while start < len(texts):
            end, size = start, 0
            while end < len(texts) and (end == start or size + len(texts[end]) <= _CHUNK_CHARS):
                size += len(texts[end])
                end += 1
            hashes, counts = _batch_shingles(texts[start:end], self.ngram)
            out[start:end] = self.signatures_from_hashes(hashes, counts)
            start = end
        return out


# ------------------------------------------------------------------------------------------- the index


@dataclass
class Verdict:
    """What the deduplicator decided for one document."""

    kind: str | None  # None (kept), "exact" or "near"
    match: int | None = None  # index (in order of arrival) of the kept document it duplicates
    similarity: float | None = None  # estimated Jaccard for near duplicates


class _SortedIndex:
    """A multimap uint64 key -> int32 id in a few sorted numpy arrays (12 bytes an entry, no Python objects).

    New entries arrive a batch at a time as a new sorted level; a level is merged into the one before it while
    that one is at most twice its size (a binary counter), so there are about log2(entries / batch) levels and
    each entry is merged about that many times. A merge needs only the two levels merged beside the result.
    """

    def __init__(self):
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.levels)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + i.nbytes for k, i in self.levels)

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        if len(keys) == 0:
            return
        order = np.argsort(keys, kind="stable")
        self.levels.append((keys[order].astype(np.uint64), ids[order].astype(np.int32)))
        while len(self.levels) > 1 and len(self.levels[-2][0]) <= 2 * len(self.levels[-1][0]):
            (ka, ia), (kb, ib) = self.levels[-2], self.levels[-1]
            pos = np.searchsorted(ka, kb) + np.arange(len(kb))
            keys_out = np.empty(len(ka) + len(kb), dtype=np.uint64)
            ids_out = np.empty(len(keys_out), dtype=np.int32)
            from_a = np.ones(len(keys_out), dtype=bool)
            from_a[pos] = False
            keys_out[pos], ids_out[pos] = kb, ib
            keys_out[from_a], ids_out[from_a] = ka, ia
            del from_a, pos
            self.levels[-2:] = [(keys_out, ids_out)]

    def lookup(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(position in ``keys``, ids stored under that key) for every key found, level by level."""
        found = []
        for level_keys, level_ids in self.levels:
            lo = np.searchsorted(level_keys, keys, side="left")
            hi = np.searchsorted(level_keys, keys, side="right")
            for q in np.flatnonzero(hi > lo):
                found.append((int(q), level_ids[lo[q]:hi[q]]))
        return found


class _SignatureStore:
    """Signatures of the kept documents in an unnamed temporary file, read back one row per LSH candidate.

    Only candidates (a near-duplicate or an LSH false positive) are ever read, so the signatures need not be
    resident: the operating system's page cache, not the process, holds what is hot.
    """

    def __init__(self, num_perm: int, spill_dir: str | None):
        import tempfile

        self.row = num_perm * 4
        self.num_perm = num_perm
        self.file = tempfile.TemporaryFile(dir=spill_dir, prefix="xiaolm-minhash-")
        self.rows = 0

    def append(self, sigs: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
        self.rows += len(sigs)

    def flush(self) -> None:
        self.file.flush()

    def get(self, ids: np.ndarray) -> np.ndarray:
        fd = self.file.fileno()
        data = b"".join(os.pread(fd, self.row, int(i) * self.row) for i in ids)
        return np.frombuffer(data, dtype=np.uint32).reshape(len(ids), self.num_perm)

    def close(self) -> None:
        self.file.close()


def _band_keys(sigs: np.ndarray, bands: list[tuple[int, int]]) -> np.ndarray:
    """``[len(sigs), len(bands)]`` 64-bit hashes of each band's rows (equal rows give equal keys; a collision
    only adds a candidate, which the Jaccard check then rejects)."""
    keys = np.empty((len(sigs), len(bands)), dtype=np.uint64)
    for b, (start, end) in enumerate(bands):
        h = np.full(len(sigs), _FNV_OFFSET ^ np.uint64(b), dtype=np.uint64)
        for j in range(start, end):
            h = (h ^ sigs[:, j].astype(np.uint64)) * _FNV_PRIME
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        keys[:, b] = h ^ (h >> np.uint64(29))
    return keys


def _exact_keys(texts: Sequence[str]) -> np.ndarray:
    """The first 8 bytes of each :func:`exact_key` as uint64 (a false match among 4M documents: about 1e-6)."""
    return np.frombuffer(b"".join(exact_key(t)[:8] for t in texts), dtype=np.uint64)


class Deduplicator:
    """Checks documents, in order, against those kept so far. ``check(texts)`` returns one Verdict each.

    Kept documents get consecutive ids 0, 1, 2, ... in arrival order; a Verdict's ``match`` is such an id.

    The index holds, per kept document, one 64-bit key per LSH band and one for the exact hash with its id
    (12 bytes each: 180 bytes a document at the default 14 bands), in :class:`_SortedIndex` arrays; the full
    signatures used to verify candidates live in a temporary file in ``spill_dir`` (512 bytes a document on
    disk). The LSH bands are datasketch's choice for the same threshold and weights, and a candidate is any
    kept document with a band equal to the document's, as in ``datasketch.MinHashLSH``, so the verdicts are the
    same as with that index (``index="datasketch"``, kept for comparison: about 6 KB a document in memory).
    """

    def __init__(self, cfg: DedupConfig | None = None, spill_dir: str | None = None, index: str = "numpy"):
        from datasketch.lsh import _optimal_param

        self.cfg = cfg or DedupConfig()
        validate_dedup(self.cfg)
        if index not in ("numpy", "datasketch"):
            raise ValueError(f"index must be 'numpy' or 'datasketch', got {index!r}")
        self.index = index
        self.kept = 0
        self._exact = _SortedIndex()
        if self.cfg.near:
            self.hasher = MinHasher(self.cfg.num_perm, self.cfg.seed, self.cfg.ngram)
            b, r = _optimal_param(self.cfg.threshold, self.cfg.num_perm, 1.0 - self.cfg.false_negative_weight,
                                  self.cfg.false_negative_weight)
            self.bands = [(i * r, (i + 1) * r) for i in range(b)]
            self._band_index = [_SortedIndex() for _ in self.bands]
            self._store = _SignatureStore(self.cfg.num_perm, spill_dir)
            if index == "datasketch":
                from datasketch import MinHashLSH

                weights = (1.0 - self.cfg.false_negative_weight, self.cfg.false_negative_weight)
                self.lsh = MinHashLSH(threshold=self.cfg.threshold, num_perm=self.cfg.num_perm, weights=weights)

    @property
    def index_bytes(self) -> int:
        """Resident bytes of the index arrays (not counting the signatures on disk)."""
        return self._exact.nbytes + sum(ix.nbytes for ix in getattr(self, "_band_index", []))

    def close(self) -> None:
        if self.cfg.near:
            self._store.close()

    def _candidates_datasketch(self, sig: np.ndarray) -> set[int]:
        from datasketch import LeanMinHash

        return set(self.lsh.query(LeanMinHash(seed=self.cfg.seed, hashvalues=sig, scheme=_SCHEME)))

    def check(self, texts: Sequence[str], signatures: np.ndarray | None = None) -> list[Verdict]:
        """Verdicts for ``texts`` in order; ``signatures`` may be given when computed elsewhere (a worker process
        running :class:`MinHasher` with the same settings)."""
        n = len(texts)
        if n == 0:
            return []
        near = self.cfg.near
        sigs = (signatures if signatures is not None else self.hasher.signatures(texts)) if near else None
        # Lookups against the documents kept before this batch are vectorised; documents kept earlier in the
        # batch are found through small dicts, so the batch is still handled strictly in order.
        exact_keys = _exact_keys(texts) if self.cfg.exact else None
        exact_found: dict[int, int] = {}
        if exact_keys is not None:
            for q, ids in self._exact.lookup(exact_keys):
                exact_found[q] = int(ids[0])
        if near:
            band_keys = _band_keys(sigs, self.bands)
            near_found: dict[int, set[int]] = {}
            if self.index == "numpy":
                for b, ix in enumerate(self._band_index):
                    for q, ids in ix.lookup(band_keys[:, b]):
                        near_found.setdefault(q, set()).update(ids.tolist())
            self._store.flush()
        batch_exact: dict[int, int] = {}
        batch_bands: dict[tuple[int, int], list[int]] = {}
        batch_sigs: dict[int, np.ndarray] = {}
        kept_rows: list[int] = []
        verdicts: list[Verdict] = []
        for i in range(n):
            if exact_keys is not None:
                key = int(exact_keys[i])
                match = exact_found.get(i, batch_exact.get(key))
                if match is not None:
                    verdicts.append(Verdict("exact", match, 1.0))
                    continue
            if near:
                if self.index == "datasketch":
                    candidates = self._candidates_datasketch(sigs[i])
                else:
                    candidates = set(near_found.get(i, ()))
                    for b in range(len(self.bands)):
                        candidates.update(batch_bands.get((b, int(band_keys[i, b])), ()))
                if candidates:
                    ids = np.array(sorted(candidates), dtype=np.int64)
                    old = ids[ids < self._store.rows]
                    rows = [self._store.get(old)] if len(old) else []
                    rows += [batch_sigs[int(j)][None, :] for j in ids[len(old):]]
                    sims = (np.concatenate(rows) == sigs[i][None, :]).mean(axis=1)
                    best = int(np.argmax(sims))  # first of the best: the earliest kept document
                    if sims[best] >= self.cfg.threshold:
                        verdicts.append(Verdict("near", int(ids[best]), float(sims[best])))
                        continue
            doc_id = self.kept
            if exact_keys is not None:
                batch_exact[int(exact_keys[i])] = doc_id
            if near:
                batch_sigs[doc_id] = sigs[i]
                if self.index == "datasketch":
                    from datasketch import LeanMinHash

                    lean = LeanMinHash(seed=self.cfg.seed, hashvalues=sigs[i], scheme=_SCHEME)
                    self.lsh.insert(doc_id, lean, check_duplication=False)
                else:
                    for b in range(len(self.bands)):
                        batch_bands.setdefault((b, int(band_keys[i, b])), []).append(doc_id)
            kept_rows.append(i)
            self.kept += 1
            verdicts.append(Verdict(None))
        if kept_rows:
            rows = np.array(kept_rows, dtype=np.int64)
            ids = np.arange(self.kept - len(rows), self.kept, dtype=np.int32)
            if exact_keys is not None:
                self._exact.add(exact_keys[rows], ids)
            if near:
                self._store.append(sigs[rows])
                if self.index == "numpy":
                    for b, ix in enumerate(self._band_index):
                        ix.add(band_keys[rows, b], ids)
        return verdicts


def estimated_jaccard(a: str, b: str, cfg: DedupConfig | None = None) -> float:
    """MinHash estimate of the Jaccard similarity of two texts' shingle sets (for tests and diagnostics)."""
    cfg = cfg or DedupConfig()
    sigs = MinHasher(cfg.num_perm, cfg.seed, cfg.ngram).signatures([a, b])
    return float((sigs[0] == sigs[1]).mean())


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' character n-gram sets (whitespace removed)."""
    sa, sb = set(shingle_hashes(a, ngram).tolist()), set(shingle_hashes(b, ngram).tolist())
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
