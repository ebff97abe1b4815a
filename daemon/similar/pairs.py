"""Near-duplicate pairs (cosine >= a threshold) among many vectors: a range search over
k-means cells.

:func:`range_pairs`, what the leak-proof split uses above its exact limit: every vector
compared exactly with the vectors of its nearest cells, one matrix product per cell, all at or
above the threshold kept, so a dense cluster is listed whole (no k to widen).  The
nearest-neighbour index of :mod:`.index` answers a different question (the k most similar
vectors to one query, over the whole cache); a self-join of every vector against every other
is a range search, and cells trained in seconds answer it with matrix products.

No pair is returned that the exact float32 cosine does not confirm.  The measured recall
against exact search (random and clustered vectors) is printed by ``bench/similar_bench.py``
and stated in Documents/SIMILARITY.md.  Pure numpy plus faiss' k-means; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PairSearch:
    """What one search did, for logs, reports and the bench."""

    vectors: int = 0
    method: str = "ann"  # "exact" (every pair) or "ann" (the range search over cells)
    pairs: int = 0
    structure: str = "cells"
    cells: int = 0  # k-means cells of the range search
    probes: int = 0  # cells searched per vector


# -- the range search over k-means cells ----------------------------------------------------------

PROBES = 12  # cells searched per vector: margin over 8 (SIMILARITY.md, Figures)
BLOCK_FLOATS = 1 << 24  # similarities computed at once (64 MiB): bounds a dense cell's memory


def range_pairs(x: np.ndarray, threshold: float, *, probes: int = PROBES,
                cells: np.ndarray | None = None, stats: PairSearch | None = None
                ) -> np.ndarray:
    """``(p, 2)`` sorted unique pairs ``i < j`` of rows of the unit-vector matrix ``x`` whose
    cosine is >= ``threshold``, by a range search over k-means cells.

    The vectors are put in ~2 sqrt(n) k-means cells (faiss' k-means on a sample); each vector
    is compared exactly (float32 inner products, one matrix product per cell) with every
    vector whose own cell is among its ``probes`` nearest cells, and every one at or above the
    threshold is kept: no k, so a dense cluster of near duplicates is listed whole without
    widening.  A pair is found when either vector's probed cells hold the other's cell; two
    vectors at cosine >= 0.97 usually share their nearest cells (measured: every planted pair
    of 200k clustered vectors, 999 of 1000 among 200k random ones; Documents/SIMILARITY.md).
    Pairs are confirmed by the same float32 product the exact search uses.

    ``cells``: the similarity index's own cells (:attr:`daemon.similar.index.AnnIndex.cells`,
    trained on the cache the rows come from), so the split searches the index's structure and
    its pairs do not change from run to run unless the index was retrained; without them
    (another width, no index yet) cells are trained here the same way.
    """
    import faiss

    from daemon.similar.index import threads, train_cells

    st = stats if stats is not None else PairSearch()
    n, dim = x.shape
    st.vectors, st.method, st.structure = n, "ann", "cells"
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    faiss.omp_set_num_threads(threads())
    x = np.ascontiguousarray(x, dtype=np.float32)
    given = cells is not None and cells.ndim == 2 and cells.shape[1] == dim and len(cells) > 0
    centroids = np.ascontiguousarray(cells if given else train_cells(x), dtype=np.float32)
    st.structure = "index cells" if given else "cells"
    nlist = len(centroids)
    centres = faiss.IndexFlatIP(dim)
    centres.add(centroids)
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
