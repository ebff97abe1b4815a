"""Vectors for training: project + file name -> content hash -> cached vector.

The :class:`daemon.records.VectorSource` the training room reads.  Read-only: it never embeds,
never decodes an image and never writes; a file without a vector is simply absent from the
answer (training reports the gap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import META_EMBEDDER, Ledger
from daemon.errors import EmbeddingError
from daemon.settings import Settings
from daemon.store import StateStore

if TYPE_CHECKING:
    import numpy as np


class CacheVectorSource:
    """Vectors of one embedder (default: the one that wrote last) from the state DB + cache."""

    def __init__(self, settings: Settings, store: StateStore, *, embedder_id: str | None = None
                 ) -> None:
        embedder_id = embedder_id or store.get_meta(META_EMBEDDER)
        if not embedder_id:
            raise EmbeddingError("no embeddings yet: run `trainingd embed` (or the daemon) first")
        self._id = embedder_id
        self._ledger = Ledger(store)
        self._cache = VectorCache(settings.cache_dir, embedder_id)

    @property
    def embedder_id(self) -> str:
        return self._id

    def vectors_for(self, project: str, file_names: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, sha in self._ledger.shas_for(project, file_names).items():
            if self._cache.has(sha):
                out[name] = self._cache.load(sha)
        return out
