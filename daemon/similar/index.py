"""The nearest-neighbour structure: every vector kept exactly, searched exactly while the index
is small and, above ``FLAT_LIMIT`` vectors, by a 4-bit product-quantisation scan (faiss
``IndexPQFastScan``) whose best ``max(RERANK, PER_NEIGHBOUR * k)`` candidates are re-ranked
with the exact float32 cosine.

Why a compressed scan rather than a graph (measured on this 2-core AMD EPYC with
``bench/similar_bench.py`` and the throwaway comparisons in Documents/SIMILARITY.md): on
random 512-d unit vectors, the worst case for every index, faiss' HNSW graph (M=32,
efConstruction 128) needed a beam of 2048 for recall@10 0.976 at 100k (30 ms CPU per query,
more distance computations than a full scan) and minutes of CPU per 100k vectors to build; a
1M graph could not be built here at all.  The scan reads 128 bytes per vector (256
sub-quantisers of 2 dimensions, 16 centroids each: the code keeps almost all of the vector),
so at 1M it answers with recall@10 0.994 after the exact re-rank, and it is built in seconds (a
k-means per sub-space on a sample, then one encoding pass), linear in n.  On real, clustered
CLIP vectors the same scan is at least as exact.  The price is a full scan per query, bound by
memory bandwidth: ~1.4 passes over the codes (128 MB per million vectors), 7-13 ms per million
on this VM depending on its host's load; fine for ``trainingd similar`` (a person's query),
and the near-duplicate search of the split never asks k-NN questions (see :mod:`.pairs`).

Keys are the row numbers of the caller's key list, in the order added.  Similarities are
cosines (the inner product of unit vectors); callers normalise.  No I/O here: the state goes
out and comes back as arrays (:class:`IndexArrays`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

FLAT_LIMIT = 20_000  # up to this many vectors every query is an exact scan (~1 ms at 20k)
MAX_SUBSPACES = 256  # PQ sub-quantisers (4 bits each): 2 dimensions each at 512-d
RERANK = 500  # candidates re-ranked exactly per query, at least (recall@10 0.993 at 1M random)
PER_NEIGHBOUR = 50  # ... and at least this many per neighbour asked (recall at large k)
TRAIN_SAMPLE = 65_536  # vectors the codebooks are trained on
RETRAIN_GROWTH = 4  # codebooks trained on fewer than TRAIN_SAMPLE are retrained at 4x the vectors
TRAIN_PER_CELL = 40  # k-means sample per cell (faiss asks for at least 39)
CELL_ITERATIONS = 10
LIBRARY = "faiss-pq4fs-rerank"


def threads() -> int:
    """Worker threads for encoding and scans: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def subspaces(dim: int) -> int:
    """PQ sub-quantisers for ``dim``: the largest even divisor of ``dim`` up to ``dim / 2``
    and ``MAX_SUBSPACES`` (0: no compressed scan, every query stays exact)."""
    return next((m for m in range(min(MAX_SUBSPACES, dim // 2), 1, -1)
                 if dim % m == 0 and m % 2 == 0), 0)


def fixed_sample(n: int, size: int) -> np.ndarray:
    """Sorted row numbers of a seeded sample of ``min(n, size)`` of ``n`` rows: the same rows
    train the same codebooks and cells."""
    return np.sort(np.random.default_rng(0).choice(n, min(n, size), replace=False))


def cells_for(n: int) -> int:
    """k-means cells for ``n`` vectors: ~2 sqrt(n) (at 200k: 894 cells of ~220 vectors, so a
    vector of the near-duplicate search is compared with ~2,700 others), each trained on
    ``TRAIN_PER_CELL`` vectors."""
    return max(1, min(int(2 * np.sqrt(n)), n // TRAIN_PER_CELL))


def train_cells(x: np.ndarray) -> np.ndarray:
    """Unit centroids of ``cells_for(len(x))`` spherical k-means cells (faiss) trained on a
    fixed sample of ``x``: the same rows give the same cells."""
    faiss = _faiss()
    n, dim = x.shape
    nlist = cells_for(n)
    sample = fixed_sample(n, nlist * TRAIN_PER_CELL)
    km = faiss.Kmeans(dim, nlist, niter=CELL_ITERATIONS, seed=1234, spherical=True,
                      verbose=False)
    km.train(np.ascontiguousarray(x[sample], dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Neighbours:
    """``keys`` and cosine ``sims`` of shape ``(queries, k)``; ``-1`` / ``-inf`` pad rows
    that found fewer than k neighbours (an index smaller than k)."""

    keys: np.ndarray
    sims: np.ndarray


def _faiss(workers: int | None = None) -> Any:
    import faiss  # lazily: the daemon imports this room on every start

    faiss.omp_set_num_threads(workers or threads())
    return faiss


@dataclass(frozen=True, slots=True)
class IndexArrays:
    """An index's state as arrays: the vectors (row ``i`` = key ``i``), the serialised PQ codes
    (empty while the index is searched exactly), how many vectors trained the codebooks, the
    cells (``(0, dim)`` while the index is small) and how many vectors the index held when
    they were trained."""

    vectors: np.ndarray
    codes: np.ndarray
    trained_on: int
    cells: np.ndarray
    cells_from: int


class AnnIndex:
    """``dim``-dimensional unit vectors under keys 0, 1, 2, ... in add order."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._n = 0
        self._vectors = np.empty((0, dim), dtype=np.float32)  # capacity >= _n rows
        # Any: faiss' SWIG classes carry no type information
        self._codes: Any = None  # IndexPQFastScan over rows 0.._n-1 once _n > FLAT_LIMIT
        self.trained_on = 0  # vectors the codebooks were trained on (0: none yet)
        #: k-means cells of the near-duplicate range search (:func:`daemon.similar.pairs.
        #: range_pairs`), trained with the codes once the index outgrows exact search and
        #: again at every RETRAIN_GROWTH-fold growth; None while the index is small
        self.cells: np.ndarray | None = None
        self.cells_from = 0  # vectors the index held when the cells were trained

    def __len__(self) -> int:
        return self._n

    @property
    def structure(self) -> str:
        return "exact" if self._codes is None else "pq-scan+rerank"

    @property
    def vectors(self) -> np.ndarray:
        """The stored vectors, row ``i`` = key ``i`` (a read-only view)."""
        view = self._vectors[:self._n]
        view.flags.writeable = False
        return view

    @property
    def memory_bytes(self) -> int:
        codes = self._n * subspaces(self.dim) // 2 if self._codes is not None else 0
        return self._n * self.dim * 4 + codes

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows under ``keys``, which must be ``len(self), len(self) + 1, ...``."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if not len(keys):
            return
        if not np.array_equal(keys, np.arange(self._n, self._n + len(keys))):
            raise ValueError(f"keys must continue the index's numbering at {self._n}")
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(x) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(x)} vectors")
        end = self._n + len(x)
        if end > len(self._vectors):  # grow by half: one copy per growth, amortised
            grown = np.empty((max(end, len(self._vectors) * 3 // 2, 1024), self.dim),
                             dtype=np.float32)
            grown[:self._n] = self._vectors[:self._n]
            self._vectors = grown
        self._vectors[self._n:end] = x
        self._n = end
        if self._codes is not None and not self._needs_training():  # else re-encoded below
            _faiss()
            self._codes.add(x)
        self._maintain()

    def _maintain(self) -> None:
        """Train the codes and the cells the index's size calls for (see the constants)."""
        if self._needs_training():
            self._train()
        if self._n > FLAT_LIMIT and (self.cells is None
                                     or self._n >= RETRAIN_GROWTH * self.cells_from):
            self.cells, self.cells_from = train_cells(self._vectors[:self._n]), self._n

    def _needs_training(self) -> bool:
        if self._n <= FLAT_LIMIT or not subspaces(self.dim):
            return False
        return self._codes is None or (self.trained_on < TRAIN_SAMPLE
                                       and self._n >= RETRAIN_GROWTH * self.trained_on)

    def _train(self) -> None:
        """(Re)train the codebooks on a fixed sample and encode every stored vector."""
        faiss = _faiss()
        n = self._n
        rows = fixed_sample(n, TRAIN_SAMPLE)
        codes = faiss.IndexPQFastScan(self.dim, subspaces(self.dim), 4,
                                      faiss.METRIC_INNER_PRODUCT)
        codes.train(np.ascontiguousarray(self._vectors[rows]))
        for s in range(0, n, 1 << 16):
            codes.add(self._vectors[s:min(n, s + (1 << 16))])
        self._codes, self.trained_on = codes, len(rows)

    def search(self, vectors: np.ndarray, k: int) -> Neighbours:
        """The ``k`` nearest keys of each row of ``vectors`` (a 2-D array), best first."""
        q = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, self._n))
        keys = np.full((len(q), k), -1, np.int64)
        sims = np.full((len(q), k), -np.inf)
        if len(q) == 0 or self._n == 0:
            return Neighbours(keys, sims)
        stored = self._vectors[:self._n]
        if self._codes is None:
            for s in range(0, len(q), 64):
                _top(stored @ q[s:s + 64].T, None, k, keys[s:s + 64], sims[s:s + 64])
            return Neighbours(keys, sims)
        # one query scans on one thread (faiss splits a scan by query): a second OpenMP thread
        # would only spin, and measured slower at p95
        _faiss(1 if len(q) == 1 else None)
        wide = min(self._n, max(RERANK, PER_NEIGHBOUR * k))
        _, cand = self._codes.search(q, wide)
        for i, row in enumerate(cand):
            row = np.sort(row[row >= 0])  # in memory order: the gather reads ahead
            _top((stored[row] @ q[i])[:, None], row, k, keys[i:i + 1], sims[i:i + 1])
        return Neighbours(keys, sims)

    def arrays(self) -> IndexArrays:
        """The state, for :meth:`from_arrays`."""
        codes = (np.asarray(_faiss().serialize_index(self._codes), dtype=np.uint8)
                 if self._codes is not None else np.zeros(0, dtype=np.uint8))
        cells = self.cells if self.cells is not None else np.zeros((0, self.dim), np.float32)
        return IndexArrays(self._vectors[:self._n], codes, self.trained_on, cells,
                           self.cells_from)

    @classmethod
    def from_arrays(cls, state: IndexArrays) -> AnnIndex:
        """The index :meth:`arrays` described; ``ValueError`` when the parts disagree."""
        vectors, codes, cells = state.vectors, state.codes, state.cells
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"vectors must be 2-D float32, not {vectors.dtype} {vectors.shape}")
        out = cls(int(vectors.shape[1]))
        out._vectors, out._n = np.ascontiguousarray(vectors), len(vectors)
        if len(cells):
            if cells.ndim != 2 or cells.shape[1] != out.dim or cells.dtype != np.float32:
                raise ValueError(f"cells must be float32 of width {out.dim}, not {cells.shape}")
            out.cells, out.cells_from = np.ascontiguousarray(cells), int(state.cells_from)
        if len(codes):
            faiss = _faiss()
            try:
                restored: Any = faiss.deserialize_index(np.ascontiguousarray(codes, np.uint8))
            except RuntimeError as exc:  # faiss raises RuntimeError on a torn or foreign buffer
                raise ValueError(f"codes are not a faiss index: {str(exc)[:200]}") from None
            if (not isinstance(restored, faiss.IndexPQFastScan) or restored.d != out.dim
                    or restored.ntotal != out._n):
                raise ValueError(f"codes do not describe these {out._n} {out.dim}-d vectors")
            out._codes, out.trained_on = restored, int(state.trained_on)
        out._maintain()  # parts saved without codes or cells (never by this module): train now
        return out


def _top(sims: np.ndarray, rows: np.ndarray | None, k: int, keys_out: np.ndarray,
         sims_out: np.ndarray) -> None:
    """Write the ``k`` best of ``sims`` (candidates x queries) into the outputs, best first;
    ``rows`` maps candidate positions to keys (``None``: positions are keys)."""
    take = min(k, sims.shape[0])
    best = np.argpartition(-sims, take - 1, axis=0)[:take] if take < sims.shape[0] \
        else np.broadcast_to(np.arange(sims.shape[0])[:, None], sims.shape)
    vals = np.take_along_axis(sims, best, axis=0)
    order = np.argsort(-vals, axis=0, kind="stable")
    best, vals = np.take_along_axis(best, order, axis=0), np.take_along_axis(vals, order, axis=0)
    keys_out[:, :take] = (best if rows is None else rows[best]).T
    sims_out[:, :take] = vals.T
