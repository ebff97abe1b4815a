"""Cached vectors read in bulk, fast, and refused when damaged: the cache's batch reader, used
by the export, the prediction pass and the similarity index's catch-up.

Why not ``np.load`` per file: a million small ``.npy`` files cost ~40 s through ``np.load``
(header parsing, a file object per call).  The cache writes every vector with one fixed header
(:func:`daemon.embedding.cache.vector_bytes`), so each file is read with one ``os.read`` into
its row of the chunk and the header compared to the expected one; a few threads read at once
(``os.read`` releases the GIL, so a cold cache on a disk gets a queue of reads).  A file with
any other header goes through ``np.load`` (another numpy may pad differently), after a check
that it is a regular file (a FIFO would block it).

A vector that is missing, unreadable, of another shape or dtype, non-finite or not unit length
is left out: it becomes a problem with a code and a sentence (the export's :class:`Skipped`),
never an exception (``trainingd embed --verify`` finds and repairs such files; readers must
not).  The codes keep their ``export_`` names: the export was the first reader and operators'
filters know them.  This module never writes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.embedding.cache import VectorCache, vector_bytes

#: a cached vector's norm may differ from 1 by float32 rounding, never by more
NORM_TOLERANCE = 1e-3
READ_THREADS = 4
#: (row index in the chunk, code, repr of what was found, sentence)
Problem = tuple[int, str, str, str]


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

    def __init__(self, cache: VectorCache, dim: int, threads: int = READ_THREADS) -> None:
        self._cache = cache
        self.dim = dim
        self._folder = str(cache.folder)
        self._header = vector_bytes(np.zeros(dim, dtype=np.float32))[: -4 * dim]
        self._size = len(self._header) + 4 * dim
        self._threads = threads

    def path(self, sha: str) -> Path:
        return self._cache.vector_path(sha)

    def read_into(self, shas: Sequence[str], block: np.ndarray) -> list[Problem]:
        """Fill ``block[i]`` with the vector of ``shas[i]``; the rows that could not be read,
        with why (their rows of ``block`` are garbage).  Norms are checked by the caller in
        one pass (:func:`bad_norms`)."""
        n = len(shas)
        step = -(-n // self._threads) if n else 1
        if self._threads <= 1 or n < 256:
            return self._read_range(shas, block, 0, n)
        with ThreadPoolExecutor(self._threads, thread_name_prefix="export-read") as pool:
            parts = pool.map(lambda lo: self._read_range(shas, block, lo, min(n, lo + step)),
                             range(0, n, step))
            return [p for part in parts for p in part]

    def _read_range(self, shas: Sequence[str], block: np.ndarray, lo: int, hi: int
                    ) -> list[Problem]:
        problems: list[Problem] = []
        folder, header, size, hlen = self._folder, self._header, self._size, len(self._header)
        raw = block.view(np.uint8).reshape(len(block), -1)
        flags = os.O_RDONLY | os.O_NONBLOCK
        for i in range(lo, hi):
            sha = shas[i]
            name = f"{folder}/{sha[:2]}/{sha}.npy"
            try:
                fd = os.open(name, flags)
            except FileNotFoundError:
                problems.append((i, "export_vector_missing", repr(name),
                                 "the ledger names a vector whose cache file is gone: run "
                                 "`trainingd embed --verify`, then `trainingd embed`, and "
                                 "export again"))
                continue
            except OSError as exc:
                problems.append((i, "export_vector_unreadable", repr(str(exc)),
                                 f"cannot open the cache file {name}: check its permissions"))
                continue
            try:
                data = os.read(fd, size + 1)
                if len(data) == size and data.startswith(header):
                    raw[i] = np.frombuffer(data, dtype=np.uint8, offset=hlen)
                    continue
                found = self._read_slow(fd, name)
            except OSError as exc:
                found = ("export_vector_unreadable", repr(str(exc)),
                         f"cannot read the cache file {name} (a folder in its place?)")
            finally:
                os.close(fd)
            if isinstance(found, tuple):
                problems.append((i, *found))
            else:
                block[i] = found
        return problems

    def _read_slow(self, fd: int, name: str) -> np.ndarray | tuple[str, str, str]:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            # a FIFO or device in the cache would block np.load or never end
            return ("export_vector_unreadable", repr(name),
                    f"the cache file {name} is not a regular file: remove it and run "
                    "`trainingd embed` again")
        try:
            vec = np.load(name, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            return ("export_vector_damaged", repr(str(exc)[:200]),
                    f"the cache file {name} is not a whole .npy: run `trainingd embed "
                    "--verify` to find the damaged files")
        if vec.dtype != np.float32 or vec.shape != (self.dim,):
            return ("export_vector_shape", repr((str(vec.dtype), vec.shape)),
                    f"the cache file {name} holds {vec.dtype} {vec.shape}, the embedder's "
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


_MISSING = "export_vector_missing"


@dataclass(frozen=True)
class VectorBlock:
    """``rows[index[sha]]`` is the vector of ``sha``; shas with no usable vector are absent
    from ``index``; ``damaged`` holds a sentence for those whose file exists but is bad."""

    rows: np.ndarray
    index: dict[str, int]
    damaged: dict[str, str] = field(default_factory=dict)


def load_block(cache: VectorCache, dim: int, shas: Iterable[str]) -> VectorBlock:
    """The vectors of ``shas`` (duplicates read once) as float32 rows of ``dim``, in one
    block a caller can use whole (the prediction pass scores them in one forward pass, the
    similarity index adds them at once).  A vector that is missing, unreadable, of another
    shape or not unit length is left out of ``index``; ``damaged`` says why for all but a
    plain missing file."""
    wanted = list(dict.fromkeys(shas))
    rows = np.empty((len(wanted), dim), dtype=np.float32)
    if not wanted:
        return VectorBlock(rows, {})
    bad: dict[int, str] = {}
    for i, code, _value, sentence in VectorReader(cache, dim).read_into(wanted, rows):
        bad[i] = "" if code == _MISSING else sentence
    for i in bad_norms(rows).tolist():
        bad.setdefault(i, "the cached vector is not unit length: the file is damaged "
                          "(`trainingd embed --verify` finds and repairs it)")
    index = {sha: i for i, sha in enumerate(wanted) if i not in bad}
    return VectorBlock(rows, index, {wanted[i]: why for i, why in bad.items() if why})
