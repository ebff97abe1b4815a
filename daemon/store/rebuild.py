"""What a new state DB can re-derive from files at once, after the old one was lost.

Validation state needs nothing here: an empty DB makes the first reconcile validate every row in
full.  Two things cannot be re-derived from the sources and would cost dearly if forgotten:

* the embedding ledger: the content-addressed cache's index (``processed_images.jsonl``) names
  every embedded file and its content hash, and the ``.npy`` it points to is the vector.  Lines
  whose vector exists are restored, so no vector is computed again, and images deleted since
  they were embedded (rejected ones vanish soon after review) stay known by project and file
  name.  Size and mtime are left unknown, so each file still present is hashed once more before
  its row is trusted (a read, never a model call).
* the training history: every model in the registry carries its metadata; each becomes a
  finished ``training_runs`` row, so the retrain policy sees when it last trained instead of
  "never".  The exact labels each run saw (``training_marks``) are not in the files: after a
  rebuild every label counts as new once, so the next retrain comes when ``min_interval_hours``
  has passed since the last model.  The audit token ledger of the day starts again from zero.

Each part fills only an empty table, so running it on a populated DB changes nothing, and a bad
line or file is skipped and counted, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from daemon.settings import Settings
from daemon.store.db import StateStore

log = structlog.get_logger("store")

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def rebuild_derived(store: StateStore, settings: Settings) -> dict[str, int]:
    """Refill ``store`` from the vector cache's index and the model registry."""
    counts = rebuild_embeddings(store, settings.cache_dir)
    counts.update(rebuild_training_runs(store, settings.models_dir))
    return counts


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _index_rows(cache_dir: Path, counts: dict[str, int]
                ) -> Iterator[tuple[dict[str, Any], Path]]:
    from daemon.embedding.cache import INDEX_NAME, VectorCache

    caches: dict[str, VectorCache] = {}
    for fields in _index_lines(cache_dir / INDEX_NAME):
        sha, eid = fields.get("hash"), fields.get("embedder_id")
        project, path, name = fields.get("project"), fields.get("path"), fields.get("file_name")
        if not (isinstance(sha, str) and _SHA_RE.match(sha) and isinstance(eid, str) and eid
                and isinstance(project, str) and isinstance(path, str)
                and isinstance(name, str)):
            counts["index_lines_skipped"] += 1
            continue
        cache = caches.setdefault(eid, VectorCache(cache_dir, eid))
        vector = cache.vector_path(sha)
        if not vector.is_file():
            counts["index_lines_without_vector"] += 1
            continue
        yield fields, vector


def _index_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Each line as a dict, ``{}`` for one that is not a JSON object (deep nesting included)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):
                entry = None
            yield entry if isinstance(entry, dict) else {}


def rebuild_embeddings(store: StateStore, cache_dir: Path) -> dict[str, int]:
    """``embeddings`` and the stage's columns of ``images`` from the index lines whose vector
    exists."""
    import numpy as np

    from daemon.store.embeddings import FileRow, VectorRow

    counts = {"index_lines_skipped": 0, "index_lines_without_vector": 0, "vectors": 0,
              "embedded_files": 0}
    if not store.embeddings.is_empty():
        return counts
    dims: dict[str, int] = {}
    vectors: dict[tuple[str, str], tuple[VectorRow, str]] = {}
    files: dict[tuple[str, str], tuple[FileRow, str]] = {}
    last_embedder: str | None = None
    for entry, vector in _index_rows(cache_dir, counts):
        sha, eid = entry["hash"], entry["embedder_id"]
        if eid not in dims:
            try:  # one header per embedder: every vector of one embedder has its dim
                dims[eid] = int(np.load(vector, mmap_mode="r", allow_pickle=False).shape[0])
            except (OSError, ValueError, IndexError):
                counts["index_lines_without_vector"] += 1
                continue
        width, height = _int_or_none(entry.get("width")), _int_or_none(entry.get("height"))
        stamp = entry["time"] if isinstance(entry.get("time"), str) else "1970-01-01T00:00:00Z"
        vectors.setdefault((sha, eid), (VectorRow(sha, eid, dims[eid], width, height), stamp))
        # later lines win: the index is append-only, so the last line is the latest observation
        files[(entry["project"], entry["path"])] = (
            FileRow(entry["project"], entry["path"], entry["file_name"], None, None, sha, "ok",
                    None, None, width, height), stamp)
        last_embedder = eid
    store.embeddings.restore(list(files.values()), list(vectors.values()), last_embedder)
    counts["vectors"], counts["embedded_files"] = len(vectors), len(files)
    return counts


def rebuild_training_runs(store: StateStore, models_dir: Path) -> dict[str, int]:
    """One finished ``training_runs`` row per model in the registry, oldest first."""
    from daemon.store.training import TrainingRun
    from daemon.training import registry

    runs: list[TrainingRun] = []
    for kind in registry.PREFIX:
        for meta in registry.all_metadata(models_dir, kind):
            created, version = meta.get("created_at"), meta.get("version")
            if not isinstance(created, str) or not isinstance(version, int):
                continue
            promoted = meta.get("promoted") is True
            why = meta.get("promotion_reason")
            reason = f"rebuilt from {meta.get('file')}" + (f": {why}" if why else "")
            metrics = meta.get("metrics")
            runs.append(TrainingRun(0, kind, created, created,
                                    "promoted" if promoted else "not_promoted", version,
                                    promoted, reason, 0,
                                    metrics if isinstance(metrics, dict) else {}))
    runs.sort(key=lambda r: (r.started_at, r.kind, r.version or 0))
    return {"training_runs": store.training.restore_runs(runs)}
