"""The similarity index on disk, keyed by content hash, one per embedder, next to the cache.

``<cache_dir>/similar/<embedder slug>/ann.npz`` holds the arrays of one index in one file
streamed through :mod:`daemon.fsutil` (temp, fsync, replace: a reader never sees half an
index): ``hashes`` (the content hash of key ``i``), ``vectors`` (row ``i``, float32),
``codes`` (the serialised PQ codes, empty while the index is searched exactly), ``cells``
(the near-duplicate search's k-means cells, :func:`saved_cells`), ``trained_on``,
``cells_from`` and ``meta`` (JSON: embedder id, dim, library).  The index is *derived* from
the vector cache, never the truth: on open it
adds every cached vector it lacks (a crash between an embed batch and a save loses nothing),
and a file of another embedder, another dimension, or one that cannot be read is rebuilt from
the cache rather than trusted.  A new embedder id has its own folder, so its index is built
anew.  This room never writes into the cache's own folders.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

from daemon.embedding.cache import VectorCache, embedder_slug
from daemon.embedding.vector_reader import load_block
from daemon.fsutil import atomic_writer
from daemon.similar.index import LIBRARY, AnnIndex, IndexArrays

log = structlog.get_logger("similar")
FOLDER = "similar"
FILE_NAME = "ann.npz"
SYNC_BLOCK = 65_536  # cached vectors read and added at once when catching up (256 MiB at 1024-d)


def index_path(cache_dir: Path, embedder_id: str) -> Path:
    return cache_dir / FOLDER / embedder_slug(embedder_id) / FILE_NAME


def saved_cells(cache_dir: Path, embedder_id: str) -> np.ndarray | None:
    """The cells of ``embedder_id``'s saved index (only that member is read, not the vectors),
    or None when there is no index, it is too small to have cells, or it cannot be read: the
    near-duplicate search then trains its own (same rule, same threshold)."""
    path = index_path(cache_dir, embedder_id)
    if not path.is_file():  # none yet; a FIFO or folder in its place would block or fail
        if path.exists():
            log.warning("similar.cells_unreadable", path=str(path), error="not a regular file")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("embedder_id") != embedder_id or meta.get("library") != LIBRARY:
                return None
            cells = np.asarray(z["cells"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("similar.cells_unreadable", path=str(path), error=str(exc)[:300])
        return None
    return cells if cells.ndim == 2 and len(cells) else None


class SimilarIndex:
    """The ANN index over one embedder's cached vectors, under their content hashes."""

    def __init__(self, cache: VectorCache) -> None:
        self.cache = cache
        self.path = index_path(cache.root, cache.embedder_id)
        self.hashes: list[str] = []
        self.key_of: dict[str, int] = {}
        self.ann: AnnIndex | None = None
        self.dirty = False
        self.saved_at = time.monotonic()

    @classmethod
    def open(cls, cache: VectorCache, *, sync: bool = True) -> SimilarIndex:
        """Load the saved index (or start empty) and add what the cache holds beyond it."""
        out = cls(cache)
        out._load()
        if sync:
            out.sync()
        return out

    def __len__(self) -> int:
        return len(self.hashes)

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("embedder_id") != self.cache.embedder_id:
                    raise ValueError(f"made for embedder {meta.get('embedder_id')!r}")
                if meta.get("library") != LIBRARY:  # e.g. an HNSW graph or usearch of before
                    raise ValueError(f"made by {meta.get('library')!r}, not {LIBRARY!r}")
                hashes = [h.decode() for h in z["hashes"].tolist()]
                ann = AnnIndex.from_arrays(IndexArrays(
                    z["vectors"], z["codes"], int(z["trained_on"]), z["cells"],
                    int(z["cells_from"])))
            if ann.dim != int(meta["dim"]):
                raise ValueError(f"{ann.dim}-d vectors, meta says {meta['dim']}")
            if len(ann) != len(hashes):
                raise ValueError(f"{len(ann)} vectors but {len(hashes)} hashes")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile,
                EOFError) as exc:
            log.warning("similar.index_rebuilt", path=str(self.path), reason=str(exc)[:300])
            return
        self.hashes, self.ann = hashes, ann
        self.key_of = {h: i for i, h in enumerate(hashes)}

    def sync(self) -> int:
        """Add every cached vector the index lacks; returns how many were added.  Read in
        blocks by the cache's batch reader (one ``os.read`` per file); a damaged file is logged
        (`embed --verify` repairs it) and left out."""
        missing = [p.stem for p in self.cache.iter_vector_files() if p.stem not in self.key_of]
        if not missing:
            return 0
        dim = self.ann.dim if self.ann is not None else self._dim_of(missing)
        added = 0
        for s in range(0, len(missing), SYNC_BLOCK):
            block = load_block(self.cache, dim, missing[s:s + SYNC_BLOCK])
            for sha, why in list(block.damaged.items())[:20]:
                log.warning("similar.vector_unreadable", sha256=sha, error=why[:200])
            order = sorted(block.index.items(), key=lambda kv: kv[1])
            added += self.add([(sha, block.rows[i]) for sha, i in order])
        return added

    def _dim_of(self, shas: list[str]) -> int:
        """The width of this embedder's vectors: that of the first readable cached one."""
        for sha in shas[:100]:
            try:
                return int(self.cache.load(sha).reshape(-1).shape[0])
            except (OSError, ValueError):
                continue
        raise ValueError("no readable cached vector among the first 100: run "
                         "`trainingd embed --verify`")

    def add(self, items: Sequence[tuple[str, np.ndarray]]) -> int:
        """Add vectors under their content hashes (known hashes are skipped)."""
        fresh = [(sha, v) for sha, v in dict(items).items() if sha not in self.key_of]
        if not fresh:
            return 0
        x = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for _, v in fresh])
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        if self.ann is None:
            self.ann = AnnIndex(x.shape[1])
        if x.shape[1] != self.ann.dim:
            raise ValueError(f"vector dim {x.shape[1]} != index dim {self.ann.dim}")
        start = len(self.hashes)
        before, started = (self.ann.trained_on, self.ann.cells_from), time.monotonic()
        self.ann.add(np.arange(start, start + len(fresh)), x)
        if (self.ann.trained_on, self.ann.cells_from) != before:  # codes or cells (re)trained
            log.info("similar.index_trained", vectors=start + len(fresh),
                     structure=self.ann.structure, codes_trained_on=self.ann.trained_on,
                     cells=0 if self.ann.cells is None else len(self.ann.cells),
                     seconds=round(time.monotonic() - started, 2))
        for i, (sha, _) in enumerate(fresh):
            self.hashes.append(sha)
            self.key_of[sha] = start + i
        self.dirty = True
        return len(fresh)

    def neighbours(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` most similar cached vectors: ``(content hash, cosine)``, best first."""
        if self.ann is None or not len(self):
            return []
        v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        nb = self.ann.search(v, k)
        return [(self.hashes[int(key)], round(float(sim), 6))
                for key, sim in zip(nb.keys[0], nb.sims[0], strict=True) if key >= 0]

    def save(self) -> Path:
        """Write the index whole (temp file, fsync, replace) when it changed."""
        if self.ann is not None and self.dirty:
            meta = {"embedder_id": self.cache.embedder_id, "dim": self.ann.dim,
                    "library": LIBRARY, "vectors": len(self), "structure": self.ann.structure}
            state = self.ann.arrays()
            with atomic_writer(self.path) as fh:  # streamed: no second copy in memory
                np.savez(fh, meta=np.array(json.dumps(meta)),
                         hashes=np.array([h.encode() for h in self.hashes], dtype="S64"),
                         vectors=state.vectors, codes=state.codes, cells=state.cells,
                         trained_on=np.array(state.trained_on, dtype=np.int64),
                         cells_from=np.array(state.cells_from, dtype=np.int64))
                size = fh.tell()
            self.dirty = False
            log.info("similar.index_saved", path=str(self.path), vectors=len(self),
                     bytes=size, structure=self.ann.structure)
        self.saved_at = time.monotonic()
        return self.path
