"""Corpus measures: exact n-gram overlap over all pairs of stories."""
from __future__ import annotations


def max_ngram_overlap(texts: list[str], n: int = 5, block: int = 500) -> dict:
    """Exact maximum overlap of character n-gram sets over all pairs of texts (whitespace removed).

    Two measures: containment |A & B| / min(|A|, |B|) (strict: a short story inside a long one counts) and
    Jaccard |A & B| / |A | B|. A texts x n-grams 0/1 sparse matrix is multiplied by its transpose in row
    blocks, so every pair is counted exactly, with no sampling or hashing. Returns the maxima, the pairs that
    reach them, and how many pairs have containment above 0.5 / 0.6 / 0.7 / 0.8.
    """
    import numpy as np
    import scipy.sparse as sp

    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for text in texts:
        t = "".join(text.split())
        grams = {t[j:j + n] for j in range(len(t) - n + 1)} or {t}
        indices.extend(vocab.setdefault(g, len(vocab)) for g in grams)
        indptr.append(len(indices))
    m = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), np.asarray(indices, dtype=np.int64),
                       np.asarray(indptr, dtype=np.int64)), shape=(len(texts), max(len(vocab), 1)))
    sizes = np.diff(m.indptr).astype(np.float64)
    mt = m.T.tocsr()
    best = {"containment": 0.0, "containment_pair": None, "jaccard": 0.0, "jaccard_pair": None}
    above = {0.5: 0, 0.6: 0, 0.7: 0, 0.8: 0}
    for start in range(0, len(texts), block):
        inter = (m[start:start + block] @ mt).tocoo()
        rows = inter.row.astype(np.int64) + start
        keep = rows < inter.col
        rows, cols, shared = rows[keep], inter.col[keep].astype(np.int64), inter.data[keep].astype(np.float64)
        if not len(shared):
            continue
        containment = shared / np.minimum(sizes[rows], sizes[cols])
        jaccard = shared / (sizes[rows] + sizes[cols] - shared)
        for threshold in above:
            above[threshold] += int((containment > threshold).sum())
        k = int(containment.argmax())
        if containment[k] > best["containment"]:
            best["containment"], best["containment_pair"] = float(containment[k]), (int(rows[k]), int(cols[k]))
        k = int(jaccard.argmax())
        if jaccard[k] > best["jaccard"]:
            best["jaccard"], best["jaccard_pair"] = float(jaccard[k]), (int(rows[k]), int(cols[k]))
    best["pairs_above"] = {str(k): v for k, v in above.items()}
    best["pairs"] = len(texts) * (len(texts) - 1) // 2
    return best
