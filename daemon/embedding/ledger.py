"""The embedding room's records and its repository, by their historical names.

The SQL lives in :mod:`daemon.store.embeddings` (the store owns its tables); this module keeps
the names the embedding room has always imported (``Ledger(store)``, ``FileRow``,
``VectorRow``, ``META_EMBEDDER``) so callers need not know where the repository lives.
"""

from __future__ import annotations

from daemon.store.embeddings import META_EMBEDDER, EmbeddingRepo, FileRow, VectorRow

#: ``Ledger(store)`` is the store's embedding repository (``store.embeddings``)
Ledger = EmbeddingRepo

__all__ = ["META_EMBEDDER", "FileRow", "Ledger", "VectorRow"]
