"""The content-addressed vector cache on disk: ``.npy`` files and ``processed_images.jsonl``.

Layout under ``settings.cache_dir`` (the playbook's ``data/ai_data/cache/``)::

    processed_images.jsonl                      one JSON object per embedded file, append-only
    vectors/<embedder slug>/embedder.json       {"embedder_id": ...}
    vectors/<embedder slug>/<sha[:2]>/<sha>.npy one L2-normalized float32 vector, shape (dim,)

The key is the SHA-256 of the image file's bytes plus the embedder_id, so a moved or renamed
file, or the same bytes in two projects, map to one vector.  A ``.npy`` appears only whole
(temp file, fsync, ``os.replace``); the index is appended only after its vectors exist, so an
index line never names a missing file.  This room must not decide *what* to embed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daemon.fsutil import atomic_write_text, atomic_writer, fsync_dir

INDEX_NAME = "processed_images.jsonl"
VECTORS_DIR = "vectors"
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")
STALE_TEMP_SECONDS = 3600.0


def embedder_slug(embedder_id: str) -> str:
    """A folder name for an embedder_id: readable prefix, exact digest suffix."""
    readable = _SLUG_RE.sub("_", embedder_id.split(":")[0])[:40]
    return f"{readable}-{hashlib.sha256(embedder_id.encode()).hexdigest()[:12]}"


def vector_bytes(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class VectorCache:
    """Vectors of one embedder plus the shared index file."""

    def __init__(self, cache_dir: Path, embedder_id: str) -> None:
        self.root = cache_dir
        self.embedder_id = embedder_id
        self.folder = cache_dir / VECTORS_DIR / embedder_slug(embedder_id)
        self.index_path = cache_dir / INDEX_NAME

    def vector_path(self, sha: str) -> Path:
        return self.folder / sha[:2] / f"{sha}.npy"

    def has(self, sha: str) -> bool:
        return self.vector_path(sha).is_file()

    def load(self, sha: str) -> np.ndarray:
        vec: np.ndarray = np.load(self.vector_path(sha), allow_pickle=False)
        return vec

    def prepare(self) -> None:
        """Create the folders, record the embedder, repair a torn index tail, drop stale temps."""
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "embedder.json"
        if not marker.is_file():
            atomic_write_text(marker, json.dumps({"embedder_id": self.embedder_id}) + "\n")
        repair_index_tail(self.index_path)
        remove_stale_temps(self.folder, STALE_TEMP_SECONDS)

    def write_vectors(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Write each vector whole (temp, fsync, replace), then fsync each folder once."""
        folders: set[Path] = set()
        for sha, vector in items:
            path = self.vector_path(sha)
            with atomic_writer(path, "wb", sync_dir=False) as fh:
                fh.write(vector_bytes(vector))
            folders.add(path.parent)
        for folder in folders:
            fsync_dir(folder)

    def append_index(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append whole lines and fsync: called after the vectors they name exist."""
        if not entries:
            return
        text = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in entries)
        self.root.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        # one O_APPEND write per batch: a second writer (`trainingd embed` beside the daemon)
        # never interleaves inside a line
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def iter_vector_files(self) -> Iterator[Path]:
        if self.folder.is_dir():
            yield from sorted(self.folder.glob("??/*.npy"))


def repair_index_tail(path: Path) -> int:
    """Cut a torn last line (a crash mid-append); return the bytes removed.  Its batch was not
    committed, so the files are examined again and their lines written anew."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # scan back in blocks for the last complete line
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def read_index(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(line number, entry)``; ``None`` for a line that is not a JSON object."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):
                # a damaged or hostile line (too deep, a 4,301-digit number) is one bad line
                yield number, None
                continue
            yield number, entry if isinstance(entry, dict) else None


def remove_stale_temps(folder: Path, older_than_s: float) -> int:
    """Temp files of writes killed mid-way (another live writer's are younger)."""
    removed = 0
    limit = time.time() - older_than_s
    for tmp in folder.glob("??/.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < limit:
                tmp.unlink()
                removed += 1
    return removed


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("??/.*.tmp")) if folder.is_dir() else []
