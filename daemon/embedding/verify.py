"""``trainingd embed --verify``: the cache, its index, the state DB and the image files agree.

Reports every mismatch (never only the first) and repairs nothing: a person decides, and the
next embedding run re-derives what is missing.  Deleted image files are counted, not reported:
rejected images vanish soon after review by design, and their vectors must stay.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.embedding.cache import VECTORS_DIR, VectorCache, read_index, temp_files
from daemon.embedding.ledger import META_EMBEDDER, Ledger
from daemon.files import sha256_file
from daemon.settings import Settings
from daemon.store import StateStore

_NORM_TOLERANCE = 1e-3
_INDEX_KEYS = ("hash", "embedder_id", "project", "file_name", "path")


@dataclass(frozen=True, slots=True)
class Mismatch:
    kind: str
    subject: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    mismatches: tuple[Mismatch, ...]
    vectors: int
    index_lines: int
    files: int
    files_gone: int

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "vectors": self.vectors, "index_lines": self.index_lines,
                "files": self.files, "files_gone": self.files_gone,
                "mismatches": [m.to_dict() for m in self.mismatches]}


def _embedder_ids(settings: Settings, ledger: Ledger) -> set[str]:
    ids = {v.embedder_id for v in ledger.vector_rows()}
    for marker in (settings.cache_dir / VECTORS_DIR).glob("*/embedder.json"):
        try:
            ids.add(str(json.loads(marker.read_text(encoding="utf-8"))["embedder_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ids


def _check_vector(path: Path, dim: int) -> str | None:
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"unreadable .npy: {exc}"
    if vec.dtype != np.float32 or vec.shape != (dim,):
        return f"dtype {vec.dtype} shape {vec.shape}, expected float32 ({dim},)"
    if not np.isfinite(vec).all():
        return "non-finite values"
    norm = float(np.linalg.norm(vec))
    if abs(norm - 1.0) > _NORM_TOLERANCE:
        return f"L2 norm {norm:.6f}, expected 1"
    return None




def verify_cache(settings: Settings, store: StateStore) -> VerifyReport:
    ledger = Ledger(store)
    found: list[Mismatch] = []
    current = store.get_meta(META_EMBEDDER)
    caches = {eid: VectorCache(settings.cache_dir, eid) for eid in _embedder_ids(settings, ledger)}

    # vectors named by the DB exist and follow the convention; vectors on disk are in the DB
    db_vectors: set[tuple[str, str]] = set()
    for row in ledger.vector_rows():
        db_vectors.add((row.sha256, row.embedder_id))
        path = caches[row.embedder_id].vector_path(row.sha256)
        if not path.is_file():
            found.append(Mismatch("vector_missing", row.sha256,
                                  f"state DB names {path}, which does not exist"))
        elif (problem := _check_vector(path, row.dim)) is not None:
            found.append(Mismatch("vector_invalid", str(path), problem))
    for eid, cache in sorted(caches.items()):
        for path in cache.iter_vector_files():
            if (path.stem, eid) not in db_vectors:
                found.append(Mismatch("vector_not_in_db", str(path),
                                      f"no state DB row for this vector of {eid}"))
        found.extend(Mismatch("temp_file_left", str(t), "a write was interrupted; safe to delete")
                     for t in temp_files(cache.folder))

    # every index line names an existing vector and a file the DB knows
    files = {(f.project, f.path): f for f in ledger.file_rows()}
    index_keys: set[tuple[str, str, str, str]] = set()
    lines = 0
    index_path = settings.cache_dir / "processed_images.jsonl"
    for number, entry in read_index(index_path):
        lines += 1
        if entry is None or any(not isinstance(entry.get(k), str) for k in _INDEX_KEYS):
            found.append(Mismatch("index_line_invalid", f"{index_path}:{number}",
                                  "not a JSON object with hash, embedder_id, project, path"))
            continue
        sha, eid, project, path_text = (entry["hash"], entry["embedder_id"], entry["project"],
                                        entry["path"])
        index_keys.add((sha, eid, project, path_text))
        cache = caches.get(eid) or VectorCache(settings.cache_dir, eid)
        if not cache.has(sha):
            found.append(Mismatch("index_line_without_vector", f"{index_path}:{number}",
                                  f"{path_text}: no vector {cache.vector_path(sha)}"))
        elif (sha, eid) not in db_vectors or (project, path_text) not in files:
            found.append(Mismatch("index_line_not_in_db", f"{index_path}:{number}",
                                  f"{path_text}: the state DB does not know this file/vector"))

    # the DB's files: indexed under the current embedder, and still holding the same bytes
    gone = 0
    for (project, path_text), f in files.items():
        if f.status != "ok" or f.sha256 is None:
            continue
        if current and (f.sha256, current) in db_vectors \
                and (f.sha256, current, project, path_text) not in index_keys:
            found.append(Mismatch("db_row_not_in_index", path_text,
                                  f"embedded ({f.sha256[:12]}) but no line in {index_path.name}"))
        try:
            st = os.stat(path_text)
        except FileNotFoundError:
            gone += 1
            continue
        except OSError as exc:
            found.append(Mismatch("file_unreadable", path_text, str(exc)))
            continue
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            try:
                sha = sha256_file(Path(path_text))  # a FIFO there must not hang
            except OSError as exc:
                found.append(Mismatch("file_unreadable", path_text, str(exc)))
                continue
            if sha != f.sha256:
                found.append(Mismatch("file_changed", path_text,
                                      f"bytes now {sha[:12]}, state DB has {f.sha256[:12]}: "
                                      "run `trainingd embed` to embed the new content"))
    return VerifyReport(tuple(found), len(db_vectors), lines, len(files), gone)
