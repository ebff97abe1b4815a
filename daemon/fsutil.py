"""Atomic file output that honours the umask: a reader never sees half a report, model or
vector file, and every file we write is as readable as the operator's umask says.

Write to a temp file in the same folder, fsync it, give it the mode a plain ``open()`` would
have given it (``mkstemp`` makes 0600 whatever the umask, and the reviewer, running as another
user, could not load the models we make for it), ``os.replace`` it over the target, fsync the
folder (so the rename itself survives a power cut).

The umask is read from ``/proc/self/status`` (Linux 4.7+): ``os.umask`` can only be read by
setting it, which races with every other thread creating a file at that moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

_UMASK_RE = re.compile(rb"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), else by a locked set-and-restore."""
    try:
        with open("/proc/self/status", "rb") as fh:
            found = _UMASK_RE.search(fh.read())
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # fallback: a short window in which a file made elsewhere gets mode 0777
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file now: 0644 under umask 022, 0640 under 027."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", *, sync_dir: bool = True) -> Iterator[IO[Any]]:
    """Stream into a temp file beside ``path``; on success fsync and ``os.replace`` it over
    ``path``; on any exception remove the temp file and leave ``path`` as it was.  Callers that
    write many files into one folder pass ``sync_dir=False`` and call :func:`fsync_dir` once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # held until the rename: a temp file whose lock is free belongs to a killed writer
        # (the kernel drops the lock however the process ends); see remove_abandoned_temps
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            # the mode a plain open() would give, set before the name exists: never a 0600 output
            os.fchmod(fh.fileno(), file_mode())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def remove_abandoned_temps(folder: Path) -> int:
    """Delete the temp files of :func:`atomic_writer` in ``folder`` that no live writer holds
    (left by a process killed mid-write); returns how many.  A live writer's are kept."""
    return remove_unheld(folder.glob(".*.tmp") if folder.is_dir() else ())


def hold(path: Path) -> int:
    """An fd holding an exclusive ``flock`` on ``path`` for as long as it stays open.  The
    kernel drops the lock when the process ends, however it ends: an unheld temp file or
    scratch folder was abandoned (see :func:`remove_unheld`)."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_unheld(paths: Iterable[Path], *, extra: tuple[str, ...] = ()) -> int:
    """Delete each path (a folder with what it holds; a file with ``path + suffix`` for each of
    ``extra``) whose ``flock`` no live process holds: what a process killed mid-write left.
    Returns how many were removed; a held one (a live writer's) is kept."""
    removed = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # deleted while we hold the lock: no live writer can have taken it meanwhile
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                for p in (path, *(Path(f"{path}{suffix}") for suffix in extra)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            removed += 1
        except OSError:  # held by a live writer, or gone already
            pass
        finally:
            os.close(fd)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
