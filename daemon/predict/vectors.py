"""Reading many cached vectors fast: the prediction pass loads every image of every group.

``np.load`` parses the ``.npy`` header with ``ast.literal_eval`` on every call (~100 us); the
cache writes one header shape only (float32, C order, 1-D, format 1.0), so this reads the file's
bytes and takes the vector straight from the buffer when the header is exactly that, and falls
back to ``np.load`` otherwise.  A few threads read at once (file reads release the GIL, and a
cold cache waits on the disk).  A missing file is simply absent from the answer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER = re.compile(rb"\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+),\), \}\s*\n")
READ_THREADS = 4
CHUNK = 256  # paths per thread task: one future per file costs more than the read


def read_vector(path: Path) -> np.ndarray | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if data[:8] == _MAGIC:
        hlen = int.from_bytes(data[8:10], "little")
        m = _HEADER.fullmatch(data[10:10 + hlen])
        if m is not None and len(data) == 10 + hlen + 4 * int(m.group(1)):
            return np.frombuffer(data, dtype="<f4", offset=10 + hlen)
    try:
        vec: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return vec


def _read_many(paths: list[Path]) -> list[np.ndarray | None]:
    return [read_vector(p) for p in paths]


def load_vectors(folder: Path, shas: Iterable[str]) -> dict[str, np.ndarray]:
    """``sha -> vector`` for every sha with a file under ``folder`` (the cache's layout)."""
    wanted = list(dict.fromkeys(shas))
    if not wanted:
        return {}
    base = str(folder)
    paths = [Path(f"{base}/{sha[:2]}/{sha}.npy") for sha in wanted]
    workers = min(READ_THREADS, max(1, len(os.sched_getaffinity(0))))
    if len(wanted) < 2 * CHUNK or workers == 1:
        found = _read_many(paths)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="predict-read") as pool:
            parts = pool.map(_read_many, [paths[i:i + CHUNK]
                                          for i in range(0, len(paths), CHUNK)])
            found = [v for part in parts for v in part]
    return {s: v for s, v in zip(wanted, found, strict=True) if v is not None}
