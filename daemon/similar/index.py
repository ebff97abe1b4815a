"""The approximate nearest-neighbour structure: an HNSW graph from faiss-cpu over unit vectors.

Why faiss ``IndexHNSWFlat`` (float32, M=32, efConstruction 128), measured on this 2-core AMD EPYC
(AVX2, no AVX-512) with ``bench/similar_bench.py`` and the comparison in Documents/SIMILARITY.md:
on 20k random 512-d unit vectors at the same M=32 / efConstruction 128, faiss built the graph in
30.9 s CPU against usearch's 41.2 s (float16) and 67.7 s (float32), and answered a query with
recall@10 0.993 in 5.3 ms CPU (p95, ef 512); usearch at M=32 and efConstruction 256 needed
7.0 ms for 0.985 (and 53.8 s CPU to build).  Random
512-d vectors are the hardest case for any graph (the 10th neighbour is barely closer than a
random vector), so recall@10 >= 0.95 needs a wide query beam: ``EF_QUERY`` for the few
single queries of ``trainingd similar``, while the near-duplicate search (cosine >= 0.97, far
above every unrelated vector) asks with a narrow one (``EF_PAIRS``).  The price is memory:
float32 vectors, 1M x 512 = 2 GiB plus ~0.3 GiB of links.

Keys are the row numbers of the caller's key list, in the order added (faiss numbers vectors
0, 1, 2, ... as they are added); this module knows nothing of content hashes, files or the
cache.  Similarities are cosines (the inner product of unit vectors); callers normalise.  The
graph serialises to one in-memory buffer, so the file is written through :mod:`daemon.fsutil`,
atomically.  No I/O here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

CONNECTIVITY = 32  # HNSW "M": 16 left recall@10 at 0.58-0.86 on random 512-d vectors (20k)
EXPANSION_ADD = 128  # efConstruction: the graph every later search walks
EF_QUERY = 2048  # beam of a trainingd-similar query: recall@10 0.976 at 100k random vectors
EF_PAIRS = 48  # beam of the near-duplicate search (raised to at least 2k per search)
LIBRARY = "faiss-hnsw-flat"


def threads() -> int:
    """Worker threads for batch adds and searches: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True)
class Neighbours:
    """``keys`` and cosine ``sims`` of shape ``(queries, k)``; ``-1`` / ``-inf`` pad rows
    that found fewer than k neighbours (an index smaller than k)."""

    keys: np.ndarray
    sims: np.ndarray


def _faiss() -> Any:
    import faiss  # lazily: the daemon imports this room on every start

    faiss.omp_set_num_threads(threads())
    return faiss


class AnnIndex:
    """An HNSW index of ``dim``-dimensional unit vectors under keys 0, 1, 2, ... in add order."""

    def __init__(self, dim: int, *, connectivity: int = CONNECTIVITY,
                 expansion_add: int = EXPANSION_ADD) -> None:
        faiss = _faiss()
        self.dim = dim
        # Any: faiss' SWIG classes carry no type information
        self._index: Any = faiss.IndexHNSWFlat(dim, connectivity, faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = expansion_add

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def memory_bytes(self) -> int:
        links = int(self._index.hnsw.neighbors.size()) * 4
        return len(self) * self.dim * 4 + links

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows under ``keys``, which must be ``len(self), len(self) + 1, ...``."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if not len(keys):
            return
        if not np.array_equal(keys, np.arange(len(self), len(self) + len(keys))):
            raise ValueError(f"keys must continue the index's numbering at {len(self)}")
        _faiss()
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim))

    def search(self, vectors: np.ndarray, k: int, *, ef: int = EF_QUERY) -> Neighbours:
        """The ``k`` nearest keys of each row of ``vectors`` (a 2-D array), searched with a
        beam of ``ef`` (at least ``k``)."""
        faiss = _faiss()
        q = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, len(self)))
        if len(q) == 0 or len(self) == 0:
            return Neighbours(np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf))
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        dist, keys = self._index.search(q, k, params=params)
        keys = np.asarray(keys, dtype=np.int64)
        sims = np.asarray(dist, dtype=np.float64)
        sims[(keys < 0) | ~np.isfinite(sims)] = -np.inf
        keys[~np.isfinite(sims)] = -1
        return Neighbours(keys, sims)

    def to_bytes(self) -> bytes:
        return bytes(_faiss().serialize_index(self._index))

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> AnnIndex:
        faiss = _faiss()
        out = cls.__new__(cls)
        out.dim = dim
        try:
            restored: Any = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        except RuntimeError as exc:  # faiss raises RuntimeError on a torn or foreign buffer
            raise ValueError(f"index buffer is not a faiss index: {str(exc)[:200]}") from None
        if not isinstance(restored, faiss.IndexHNSWFlat) or restored.d != dim:
            raise ValueError(f"index buffer is not a {dim}-dimensional faiss HNSW index")
        out._index = restored
        return out
