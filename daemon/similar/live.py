"""The heavy lane's hook: vectors just written by an embedding batch join the similarity index.

Called by the embedding stage after each batch's vectors exist in the cache (same thread, the
heavy lane).  The index is derived data: any failure here is logged and never fails the batch,
since the next open rebuilds what is missing from the cache.  The index is saved at most every
``SAVE_EVERY_SECONDS`` (a 1M-vector index is ~2.2 GiB), so a short run may end unsaved; the next
open catches up from the cache.  The first batch after start only loads the saved index (a
catch-up over a large, never-indexed cache would hold the heavy lane for minutes); the cached
vectors it lacks are added by the next full open (``trainingd similar``, training).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import structlog

from daemon.embedding.cache import VectorCache
from daemon.similar.persist import SimilarIndex

log = structlog.get_logger("similar")
SAVE_EVERY_SECONDS = 300.0
_held: dict[str, SimilarIndex] = {}
_lock = threading.Lock()


def vectors_written(cache: VectorCache, items: Sequence[tuple[str, np.ndarray]]) -> None:
    """Add a batch's fresh vectors to the index of their embedder; never raises."""
    if not items:
        return
    try:
        with _lock:
            key = str(cache.root)
            held = _held.get(key)
            if held is None or held.cache.embedder_id != cache.embedder_id:
                # a new embedder id: its own index, built from its own cached vectors
                held = _held[key] = SimilarIndex.open(cache, sync=False)
            added = held.add(items)
            if held.dirty and time.monotonic() - held.saved_at >= SAVE_EVERY_SECONDS:
                held.save()
        log.debug("similar.vectors_added", added=added, vectors=len(held))
    except Exception as exc:  # derived data: the next open rebuilds it from the cache
        log.warning("similar.index_update_failed", error_type=type(exc).__name__,
                    error=str(exc)[:300])


def held_index(cache: VectorCache) -> SimilarIndex | None:
    """The in-process index of ``cache``'s embedder, if this process keeps one."""
    with _lock:
        held = _held.get(str(cache.root))
        return held if held is not None and held.cache.embedder_id == cache.embedder_id \
            else None


def flush() -> None:
    """Save every held index that changed (shutdown, tests)."""
    with _lock:
        for held in _held.values():
            held.save()
