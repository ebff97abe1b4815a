"""Near-duplicate pairs (cosine >= a threshold) among many vectors, two ways.

:func:`range_pairs`, what the leak-proof split uses above the exact limit: a range search over
k-means cells (faiss IndexIVFFlat): every vector compared exactly with the vectors of its
nearest cells, all at or above the threshold kept, so a dense cluster is listed whole.  It
needs no graph: building the HNSW graph costs minutes at 200k vectors on this box, training
the cells seconds.

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
    structure: str = "hnsw"  # "hnsw" (k-NN over the graph) or "ivf" (range search over cells)
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

PROBES = 8  # cells searched around each vector's own
QUERY_CHUNK = 16384  # vectors per range search: bounds the memory of one result buffer


TRAIN_PER_CELL = 40  # k-means sample per cell (faiss asks for at least 39)
TRAIN_ITERATIONS = 10


def cells_for(n: int) -> int:
    """k-means cells for ``n`` vectors: ~2 sqrt(n) (at 200k: 890 cells of ~220 vectors, so a
    vector is compared with ~1,800 others), each cell trained on ``TRAIN_PER_CELL`` vectors."""
    return max(1, min(int(2 * np.sqrt(n)), n // TRAIN_PER_CELL))


def range_pairs(x: np.ndarray, threshold: float, *, probes: int = PROBES,
                stats: PairSearch | None = None) -> np.ndarray:
    """``(p, 2)`` sorted unique pairs ``i < j`` of rows of the unit-vector matrix ``x`` whose
    cosine is >= ``threshold``, by a range search over an inverted file (faiss IndexIVFFlat).

    The vectors are put in ~2 sqrt(n) k-means cells; every vector is compared exactly (float32
    inner products) with every vector of its ``probes`` nearest cells, and every one at or above
    the threshold is kept: no k, so a dense cluster of near duplicates is listed whole without
    widening.  A pair is found when either vector's probed cells hold the other; two vectors at
    cosine >= 0.97 share their nearest cells, so a miss needs both to sit on a boundary between
    far more than ``probes`` cells (the measured recall is in Documents/SIMILARITY.md).  Why not
    the HNSW graph: building it costs ~2.6 ms CPU per vector here (over 8 minutes for 200k),
    while the cells are trained on a sample in seconds; the search itself is a few thousand
    inner products per vector.  No pair the exact float32 cosine does not confirm is returned.
    """
    import faiss

    from daemon.similar.index import threads

    st = stats if stats is not None else PairSearch()
    n, dim = x.shape
    st.vectors, st.method, st.structure = n, "ann", "ivf"
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    faiss.omp_set_num_threads(threads())
    x = np.ascontiguousarray(x, dtype=np.float32)
    nlist = cells_for(n)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed, ivf.cp.niter = 1234, TRAIN_ITERATIONS
    sample = np.random.default_rng(0).choice(n, min(n, nlist * TRAIN_PER_CELL), replace=False)
    ivf.train(x[np.sort(sample)])
    ivf.add(x)
    ivf.nprobe = min(nlist, probes)
    st.cells, st.probes = nlist, int(ivf.nprobe)
    found: list[np.ndarray] = []
    for s in range(0, n, QUERY_CHUNK):
        lims, _, hits = ivf.range_search(x[s:s + QUERY_CHUNK], threshold - SLACK)
        a = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims).astype(np.int64))
        # both orders are kept (as (min, max)): b's own probes may have missed a
        found += _confirmed(x, a, np.asarray(hits, dtype=np.int64).reshape(-1, 1), threshold)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    st.pairs = len(pairs)
    return pairs
