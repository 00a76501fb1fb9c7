"""Nearest neighbours and similarity order over unit vectors, with faiss (faiss-cpu from PyPI).

:func:`knn` finds each vector's nearest vectors by cosine similarity (inner
product of unit vectors): an exact ``IndexFlatIP`` up to :data:`EXACT_UP_TO`
vectors, an HNSW graph (``IndexHNSWFlat``, 32 links, ``efSearch`` at least
128) above. :func:`similarity_order` puts similar rows next to each other
(k-means clusters, chained by their centroids' similarity), so that windows
cut from that order hold whole families. Both are deterministic for the same
input (a fixed k-means seed).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EXACT_UP_TO", "knn", "similarity_order"]

#: Up to this many vectors the search is exact (a flat index): fast enough, and the same answer every time.
EXACT_UP_TO = 200_000
_SEED = 1234


def _faiss():
    import faiss  # a heavy import: only operators that need it pay for it

    return faiss


def knn(vectors: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``vectors`` of each query, most similar first.

    Args:
        vectors: ``(n, d)`` unit float32 rows (the index).
        k: neighbours per query.
        queries: ``(m, d)`` unit rows; default ``vectors`` themselves, each without itself.

    Returns:
        ``(similarities, indices)``, each ``(m, min(k, available))``; an index of -1 means none (fewer vectors
        than asked).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    own = queries is None
    q = x if own else np.ascontiguousarray(queries, dtype=np.float32)
    want = min(k + (1 if own else 0), n)
    if n == 0 or want <= 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(128, 2 * want)
    index.add(x)
    sims, idx = index.search(q, want)
    if not own:
        return sims, idx
    out_s = np.full((len(q), want - 1), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), want - 1), -1, dtype=np.int64)
    for row in range(len(q)):
        keep = [(s, j) for s, j in zip(sims[row], idx[row], strict=True) if j != row and j >= 0][:want - 1]
        for col, (s, j) in enumerate(keep):
            out_s[row, col], out_i[row, col] = s, j
    return out_s, out_i


def similarity_order(vectors: np.ndarray, cluster_rows: int) -> list[int]:
    """Row indices in an order where similar rows sit together.

    The rows are split into about ``n / cluster_rows`` k-means clusters (faiss, fixed seed); clusters follow
    one another by a greedy chain from the first (each next one the most similar centroid left), and rows keep
    their input order inside a cluster.

    Args:
        vectors: ``(n, d)`` unit rows.
        cluster_rows: the size clusters should have about (a window holds several).
    """
    n = len(vectors)
    k = max(1, math.ceil(n / max(1, cluster_rows)))
    if n <= 2 or k <= 1:
        return list(range(n))
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=_SEED, verbose=False, spherical=True, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(assign[:, 0]):
        members.setdefault(int(c), []).append(i)
    ids = sorted(members, key=lambda c: members[c][0])  # clusters by their first row
    cents = km.centroids[ids] / np.maximum(np.linalg.norm(km.centroids[ids], axis=1, keepdims=True), 1e-12)
    left = np.ones(len(ids), dtype=bool)
    chain, at = [0], 0
    left[0] = False
    while left.any():
        sims = cents @ cents[at]
        sims[~left] = -np.inf
        at = int(np.argmax(sims))  # ties: the cluster whose first row comes first
        chain.append(at)
        left[at] = False
    return [i for c in chain for i in members[ids[c]]]
