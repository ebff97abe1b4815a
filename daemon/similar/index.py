"""The approximate nearest-neighbour structure: an HNSW graph from usearch over unit vectors.

Why usearch (measured on this 2-core machine, 512-d unit vectors, M=16, ef_add=64; see
``bench/similar_bench.py --compare`` and Documents/SIMILARITY.md for the figures): it built the
graph fastest of the three installed libraries (10k vectors under heavy load: usearch f16 9.3 s,
faiss-cpu HNSWFlat 10.6 s, hnswlib 13.1 s; same recall at the same M/ef), it stores vectors as
float16 (1M x 512 = 1 GiB instead of 2 GiB as float32 in faiss' HNSWFlat and hnswlib), it adds
vectors one batch at a time without a declared capacity (hnswlib needs ``resize_index``), it
serialises to and from one in-memory buffer (so the file is written through
:mod:`daemon.fsutil`, atomically), and it is one small wheel with no BLAS or OpenMP runtime.

Keys are row numbers of the caller's key list; this module knows nothing of content hashes,
files or the cache.  Similarities are cosines (the inner product of unit vectors); callers
normalise.  No I/O here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

CONNECTIVITY = 16  # HNSW "M": 16 keeps recall@10 >= 0.95 at 1M random vectors with ef 64+
EXPANSION_ADD = 128  # efConstruction: a better graph for dense clusters of near duplicates
EXPANSION_SEARCH = 96  # ef at query time (raised per query to at least k)
STORAGE = "f16"  # halves memory; the exact cosine checks use the caller's float32 vectors
LIBRARY = "usearch"


def threads() -> int:
    """Worker threads for batch adds and searches: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True)
class Neighbours:
    """``keys`` and cosine ``sims`` of shape ``(queries, k)``; ``-1`` / ``-inf`` pad rows
    that found fewer than k neighbours (an index smaller than k)."""

    keys: np.ndarray
    sims: np.ndarray


class AnnIndex:
    """An HNSW index of ``dim``-dimensional unit vectors under integer keys."""

    def __init__(self, dim: int, *, expansion_search: int = EXPANSION_SEARCH) -> None:
        from usearch.index import Index

        self.dim = dim
        # Any: usearch's stubs mark the settable ef property read-only and type results loosely
        self._index: Any = Index(ndim=dim, metric="ip", dtype=STORAGE, connectivity=CONNECTIVITY,
                            expansion_add=EXPANSION_ADD, expansion_search=expansion_search)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def memory_bytes(self) -> int:
        return int(self._index.memory_usage)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows under ``keys`` (unique, not yet present)."""
        if len(keys):
            self._index.add(np.asarray(keys, dtype=np.uint64),
                            np.ascontiguousarray(vectors, dtype=np.float32), threads=threads())

    def search(self, vectors: np.ndarray, k: int) -> Neighbours:
        """The ``k`` nearest keys of each row of ``vectors`` (a 2-D array)."""
        q = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, len(self)))
        if len(q) == 0 or len(self) == 0:
            return Neighbours(np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf))
        # ef below k returns fewer than k good neighbours: widen it for wide queries
        if self._index.expansion_search < k:
            self._index.expansion_search = k
        m = self._index.search(q, k, threads=threads())
        keys = np.full((len(q), k), -1, dtype=np.int64)
        sims = np.full((len(q), k), -np.inf)
        got_keys = np.asarray(m.keys, dtype=np.int64).reshape(len(q), -1)
        got_dist = np.asarray(m.distances, dtype=np.float64).reshape(len(q), -1)
        keys[:, :got_keys.shape[1]] = got_keys
        sims[:, :got_dist.shape[1]] = 1.0 - got_dist
        # one query answers a Matches (no counts): its arrays hold only what it found
        counts = np.asarray(getattr(m, "counts", [got_keys.shape[1]])).reshape(len(q))
        pad = np.arange(keys.shape[1])[None, :] >= counts[:, None]
        keys[pad] = -1
        sims[pad | ~np.isfinite(sims)] = -np.inf
        return Neighbours(keys, sims)

    def to_bytes(self) -> bytes:
        return bytes(self._index.save())

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> AnnIndex:
        from usearch.index import Index

        out = cls.__new__(cls)
        out.dim = dim
        restored: Any = Index.restore(bytearray(data))
        out._index = restored
        if out._index is None or out._index.ndim != dim:
            raise ValueError(f"index buffer is not a {dim}-dimensional usearch index")
        out._index.expansion_search = EXPANSION_SEARCH
        return out
