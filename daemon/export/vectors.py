"""Cached vectors read for an export, fast, and refused when damaged.

Why not ``np.load`` per file: a million small ``.npy`` files cost ~40 s through ``np.load``
(header parsing, a file object per call); the cache writes every vector with one fixed header
(:func:`daemon.embedding.cache.vector_bytes`), so the bytes are read with one ``os.read`` and
the header compared to the expected one.  A file with any other header goes through
``np.load`` (another numpy may pad differently) and is then checked like the rest.

A vector that is missing, unreadable, of another shape or dtype, non-finite or not unit length
is not exported: it becomes a :class:`Skipped` with a code and a sentence, never an exception
(``trainingd embed --verify`` finds and repairs such files; the export must not).  This room
never writes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.embedding.cache import VectorCache, vector_bytes

#: a cached vector's norm may differ from 1 by float32 rounding, never by more
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class Skipped:
    """A row left out of the export, and why."""

    code: str
    sha256: str
    project: str
    path: str
    value: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "sha256": self.sha256, "project": self.project,
                "path": self.path, "value": self.value, "message": self.message}


class VectorReader:
    """Vectors of one embedder from its cache folder, as float32 rows of ``dim``."""

    def __init__(self, cache: VectorCache, dim: int) -> None:
        self._cache = cache
        self.dim = dim
        self._header = vector_bytes(np.zeros(dim, dtype=np.float32))[: -4 * dim]
        self._size = len(self._header) + 4 * dim

    def path(self, sha: str) -> Path:
        return self._cache.vector_path(sha)

    def read(self, sha: str) -> np.ndarray | tuple[str, str, str]:
        """The vector (its norm is checked per chunk: :func:`bad_norms`), or ``(code, repr of
        what was found, sentence)``."""
        path = self._cache.vector_path(sha)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return ("export_vector_missing", repr(str(path)),
                    "the ledger names a vector whose cache file is gone: run "
                    "`trainingd embed --verify`, then `trainingd embed`, and export again")
        except OSError as exc:
            return ("export_vector_unreadable", repr(str(exc)),
                    f"cannot open the cache file {path}: check its permissions")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                # a FIFO or device in the cache would block or never end a read
                return ("export_vector_unreadable", repr(str(path)),
                        f"the cache file {path} is not a regular file: remove it and run "
                        "`trainingd embed` again")
            data = os.read(fd, self._size + 1)
        except OSError as exc:
            return ("export_vector_unreadable", repr(str(exc)),
                    f"cannot read the cache file {path} (a folder or device in its place?)")
        finally:
            os.close(fd)
        if len(data) == self._size and data.startswith(self._header):
            vec = np.frombuffer(data, dtype=np.float32, offset=len(self._header))
        else:
            loaded = self._load_slow(path)
            if isinstance(loaded, tuple):
                return loaded
            vec = loaded
        return vec

    def _load_slow(self, path: Path) -> np.ndarray | tuple[str, str, str]:
        try:
            vec = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            return ("export_vector_damaged", repr(str(exc)[:200]),
                    f"the cache file {path} is not a whole .npy: run `trainingd embed "
                    "--verify` to find the damaged files")
        if vec.dtype != np.float32 or vec.shape != (self.dim,):
            return ("export_vector_shape", repr((str(vec.dtype), vec.shape)),
                    f"the cache file {path} holds {vec.dtype} {vec.shape}, the embedder's "
                    f"vectors are float32 ({self.dim},): the file is not this embedder's")
        return np.asarray(vec)


def bad_norms(rows: np.ndarray) -> np.ndarray:
    """Indices of rows that are not unit length (or not finite): damaged cache files.  One
    vectorised pass per chunk, not a call per vector."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    bad: np.ndarray = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE))
    return bad


def not_unit(path: Path, rows: np.ndarray, index: int) -> tuple[str, str, str]:
    norm = float(np.linalg.norm(rows[index].astype(np.float64)))
    return ("export_vector_not_unit", repr(norm),
            f"the cache file {path} holds a vector of norm {norm!r}; every cached vector is "
            "L2-normalised: the file is damaged (`trainingd embed --verify`)")
