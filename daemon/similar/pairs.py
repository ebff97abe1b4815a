"""Near-duplicate pairs (cosine >= a threshold) among many vectors, two ways.

:func:`range_pairs`, what the leak-proof split uses above the exact limit: a range search over
k-means cells (faiss' k-means): every vector compared exactly with the vectors of its
nearest cells, one matrix product per cell, all at or above the threshold kept, so a dense
cluster is listed whole.  It needs no graph: building the HNSW graph costs minutes at 200k
vectors on this box, training the cells seconds.

:func:`knn_pairs`, for a caller that already holds the HNSW index ``trainingd similar`` answers
from: k nearest neighbours per vector, an exact cosine check, and k widened for every vector
whose k-th neighbour is still close to the threshold.  A vector whose neighbour list is still
full of near duplicates at ``MAX_K`` is compared with every vector exactly (blocked matrix
products), so the widening never silently stops; HNSW prunes links inside a tight cluster, so
every connected set of found pairs that holds a widened vector is completed by an exact check
within the set.

Either way no pair is returned that the exact float32 cosine does not confirm.  The measured
recall against exact search (random and clustered vectors) is printed by
``bench/similar_bench.py`` and stated in Documents/SIMILARITY.md.  Pure numpy plus faiss; no
I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.similar.index import EF_PAIRS, AnnIndex

FIRST_K = 16  # neighbours asked per vector; most vectors have no near duplicate at all
MAX_K = 256  # above this the row is checked against every vector exactly
WIDEN = 4
#: the index's float32 cosine may differ from the exact check's in the last bits (summation
#: order), so a k-th neighbour this close below the threshold still widens the search
SLACK = 0.002


@dataclass
class PairSearch:
    """What one search did, for logs, reports and the bench."""

    vectors: int = 0
    method: str = "ann"
    widened: int = 0  # rows searched again with a larger k
    exact_rows: int = 0  # rows compared with every vector (their cluster exceeded MAX_K)
    completed: int = 0  # vectors in dense connected sets completed by an exact check
    pairs: int = 0
    structure: str = "hnsw"  # "hnsw" (k-NN over the graph) or "cells" (range search over cells)
    cells: int = 0  # k-means cells of the range search
    probes: int = 0  # cells searched per vector


def _confirmed(x: np.ndarray, rows: np.ndarray, keys: np.ndarray, threshold: float,
               chunk: int = 1 << 18) -> list[np.ndarray]:
    a = np.repeat(rows, keys.shape[1])
    b = keys.reshape(-1)
    keep = (b >= 0) & (b != a)
    a, b = a[keep], b[keep]
    out: list[np.ndarray] = []
    for s in range(0, len(a), chunk):
        aa, bb = a[s:s + chunk], b[s:s + chunk]
        hit = np.einsum("ij,ij->i", x[aa], x[bb]) >= threshold
        if hit.any():
            out.append(np.stack([np.minimum(aa[hit], bb[hit]), np.maximum(aa[hit], bb[hit])],
                                axis=1))
    return out


def _exact_rows(x: np.ndarray, rows: np.ndarray, threshold: float, block: int = 256
                ) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        i, j = np.nonzero(x[r] @ x.T >= threshold)
        a, b = r[i], j
        keep = a != b
        if keep.any():
            out.append(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])],
                                axis=1))
    return out


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label (its smallest row) of every row, by min-label propagation."""
    labels = np.arange(n)
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        before = labels.copy()
        np.minimum.at(labels, a, labels[b])
        np.minimum.at(labels, b, labels[a])
        labels = labels[labels]
        if np.array_equal(labels, before):
            return labels


def _complete_dense(x: np.ndarray, pairs: np.ndarray, dense: np.ndarray, threshold: float,
                    st: PairSearch) -> list[np.ndarray]:
    """Exact pairs within every connected set of found pairs that holds a widened row."""
    labels = _components(len(x), pairs)
    out: list[np.ndarray] = []
    for root in np.unique(labels[dense]):
        members = np.flatnonzero(labels == root)
        if len(members) < 2:
            continue
        st.completed += len(members)
        for s in range(0, len(members), 1024):
            r = members[s:s + 1024]
            i, j = np.nonzero(x[r] @ x[members].T >= threshold)
            a, b = r[i], members[j]
            keep = a < b
            if keep.any():
                out.append(np.stack([a[keep], b[keep]], axis=1))
    return out


def knn_pairs(x: np.ndarray, threshold: float, *, index: AnnIndex | None = None,
              first_k: int = FIRST_K, max_k: int = MAX_K,
              stats: PairSearch | None = None) -> np.ndarray:
    """``(p, 2)`` sorted unique pairs ``i < j`` of rows of the unit-vector matrix ``x`` whose
    cosine is >= ``threshold``.  ``index`` holds row ``i`` of ``x`` under key ``i`` (built here
    when not given)."""
    st = stats if stats is not None else PairSearch()
    n = len(x)
    st.vectors = n
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if index is None:
        index = AnnIndex(x.shape[1])
        index.add(np.arange(n), x)
    found: list[np.ndarray] = []
    dense: list[np.ndarray] = []
    rows = np.arange(n)
    k = min(first_k, n)
    while len(rows):
        nb = index.search(x[rows], k, ef=max(EF_PAIRS, 2 * k))
        found += _confirmed(x, rows, nb.keys, threshold)
        if k >= n:
            break
        # the k-th neighbour is still a (possible) near duplicate: there may be more
        full = nb.sims[:, -1] >= threshold - SLACK
        rows = rows[full]
        if len(rows) and k * WIDEN > max_k:
            st.exact_rows += len(rows)
            found += _exact_rows(x, rows, threshold)
            break
        st.widened += len(rows)
        dense.append(rows)
        k = min(n, k * WIDEN)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    if dense:
        extra = _complete_dense(x, pairs, np.unique(np.concatenate(dense)), threshold, st)
        if extra:
            pairs = np.unique(np.concatenate([pairs, *extra]).astype(np.int64), axis=0)
    st.pairs = len(pairs)
    return pairs


# -- the range search over k-means cells ----------------------------------------------------------

PROBES = 12  # cells searched per vector: margin over 8 (SIMILARITY.md, Figures)
BLOCK_FLOATS = 1 << 24  # similarities computed at once (64 MiB): bounds a dense cell's memory


TRAIN_PER_CELL = 40  # k-means sample per cell (faiss asks for at least 39)
TRAIN_ITERATIONS = 10


def cells_for(n: int) -> int:
    """k-means cells for ``n`` vectors: ~2 sqrt(n) (at 200k: 890 cells of ~220 vectors, so a
    vector is compared with ~1,800 others), each cell trained on ``TRAIN_PER_CELL`` vectors."""
    return max(1, min(int(2 * np.sqrt(n)), n // TRAIN_PER_CELL))


def range_pairs(x: np.ndarray, threshold: float, *, probes: int = PROBES,
                stats: PairSearch | None = None) -> np.ndarray:
    """``(p, 2)`` sorted unique pairs ``i < j`` of rows of the unit-vector matrix ``x`` whose
    cosine is >= ``threshold``, by a range search over k-means cells.

    The vectors are put in ~2 sqrt(n) k-means cells (faiss' k-means on a sample); each vector
    is compared exactly (float32 inner products, one matrix product per cell) with every
    vector whose own cell is among its ``probes`` nearest cells, and every one at or above the
    threshold is kept: no k, so a dense cluster of near duplicates is listed whole without
    widening.  A pair is found when either vector's probed cells hold the other's cell; two
    vectors at cosine >= 0.97 usually share their nearest cells (measured: every planted pair
    of 200k clustered vectors, 999 of 1000 among 200k random ones; Documents/SIMILARITY.md).  Why
    not the HNSW graph: building it costs ~2.8 ms CPU per vector here (minutes for 200k), the
    cells are trained in seconds, and the comparisons run as matrix products.  Pairs are
    confirmed by the same float32 product the exact search uses.
    """
    import faiss

    from daemon.similar.index import threads

    st = stats if stats is not None else PairSearch()
    n, dim = x.shape
    st.vectors, st.method, st.structure = n, "ann", "cells"
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    faiss.omp_set_num_threads(threads())
    x = np.ascontiguousarray(x, dtype=np.float32)
    nlist = cells_for(n)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, nlist * TRAIN_PER_CELL),
                                                     replace=False))
    km = faiss.Kmeans(dim, nlist, niter=TRAIN_ITERATIONS, seed=1234, spherical=True,
                      verbose=False)
    km.train(x[sample])
    centres = faiss.IndexFlatIP(dim)
    centres.add(np.ascontiguousarray(km.centroids, dtype=np.float32))
    nprobe = min(nlist, probes)
    _, probe = centres.search(x, nprobe)  # (n, nprobe) cells, nearest first
    st.cells, st.probes = nlist, nprobe
    own = probe[:, 0]
    members_of = np.argsort(own, kind="stable")
    mb = np.searchsorted(own[members_of], np.arange(nlist + 1))
    cell = probe.reshape(-1)
    asked = np.argsort(cell, kind="stable")
    qb = np.searchsorted(cell[asked], np.arange(nlist + 1))
    asker = asked // nprobe  # the row that probes the cell
    found: list[np.ndarray] = []
    for c in range(nlist):
        members = members_of[mb[c]:mb[c + 1]]
        if not len(members):
            continue
        queries = asker[qb[c]:qb[c + 1]]
        xm = x[members]
        step = max(1, BLOCK_FLOATS // len(members))
        for s in range(0, len(queries), step):
            q = queries[s:s + step]
            i, j = np.nonzero(x[q] @ xm.T >= threshold)
            a, b = q[i], members[j]
            keep = a != b
            if keep.any():
                found.append(np.stack([np.minimum(a[keep], b[keep]),
                                       np.maximum(a[keep], b[keep])], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    st.pairs = len(pairs)
    return pairs
