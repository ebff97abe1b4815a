"""The guard under every read-only open of a SQLite file we do not write (:mod:`daemon.sqlite_ro`).

An open-file-description read lock (``F_OFD_SETLK``) on the byte range SQLite's unix VFS uses
for SHARED locks, on one descriptor per (dev, inode) kept for the life of the process: while it
is held no WAL writer can delete its ``-wal``/``-shm`` or switch journal mode, and closing our
own descriptors never drops another connection's POSIX locks.  Why each choice was made, and
what it was measured against, is in :mod:`daemon.sqlite_ro`'s docstring.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("sqlite_ro")

SQLITE_BUSY = 5
SQLITE_CANTOPEN = 14
SQLITE_READONLY_ROLLBACK = 8 | (3 << 8)

#: SQLite's unix VFS: PENDING_BYTE is 0x40000000, then RESERVED, then the SHARED range
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)


class ReadBusyError(sqlite3.OperationalError):
    """The file cannot be read consistently right now; carries SQLITE_BUSY so that every busy
    check (``sqlite_errorcode & 0xFF == 5``) retries it like a lock held by the writer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.sqlite_errorcode = SQLITE_BUSY
        self.sqlite_errorname = "SQLITE_BUSY"


def _cantopen(message: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = SQLITE_CANTOPEN
    exc.sqlite_errorname = "SQLITE_CANTOPEN"
    return exc


@dataclass(frozen=True, slots=True)
class _Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class _Inode:
    """Our descriptor(s) on one database file, shared by every reader of it in this process."""

    fd: int
    users: int = 0
    lockers: int = 0
    spare: list[int] = field(default_factory=list)


#: Closing *any* descriptor of a file drops every classic POSIX lock this process holds on it,
#: including the SHARED lock of another SQLite connection here (a writer in a test, the daemon's
#: own state DB connection while a read-only store comes and goes).  SQLite defers its own closes
#: for this reason; we keep one descriptor per file for the life of the process instead, and
#: close it only once the file is unlinked and none of our readers uses it.
_INODES: dict[tuple[int, int], _Inode] = {}
_INODES_LOCK = threading.Lock()
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _not_regular() -> sqlite3.OperationalError:
    return _cantopen("unable to open database file: not a regular file")


class _Guard:
    """A reader's hold on the process's descriptor of the database, and through it an OFD read
    lock on SQLite's SHARED range while :attr:`held`.  The file is checked to be regular before
    it is opened (non-blocking), so a FIFO named like a database never hangs the caller."""

    unsupported_logged = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self.supported = _OFD_SETLK is not None
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _cantopen(f"unable to open database file: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular()
        key = (st.st_dev, st.st_ino)
        with _INODES_LOCK:
            inode = _INODES.get(key)
            if inode is None:
                try:
                    fd = os.open(path, _OPEN_FLAGS)
                except OSError as exc:
                    raise _cantopen(f"unable to open database file: {exc.strerror}") from exc
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    os.close(fd)  # replaced by a non-file since the stat: no SQLite lock on it
                    raise _not_regular()
                key = (fst.st_dev, fst.st_ino)  # the file we really opened
                inode = _INODES.get(key)
                if inode is None:
                    inode = _INODES[key] = _Inode(fd)
                else:
                    inode.spare.append(fd)  # closing it would drop locks: park it
            inode.users += 1
        self.key, self.inode = key, inode

    def _fcntl(self, kind: int) -> None:
        assert _OFD_SETLK is not None
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
        fcntl.fcntl(self.inode.fd, _OFD_SETLK,
                    struct.pack("hhqqi4x", kind, os.SEEK_SET, _SHARED_FIRST, _SHARED_SIZE, 0))

    def try_lock(self) -> bool:
        """True when held (or when locks are unavailable); False while a writer holds
        EXCLUSIVE."""
        if self.held or not self.supported:
            return True
        with _INODES_LOCK:
            if self.inode.lockers == 0:
                try:
                    self._fcntl(fcntl.F_RDLCK)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        return False
                    self.supported = False
                    if not _Guard.unsupported_logged:
                        _Guard.unsupported_logged = True
                        log.warning("sqlite_ro.guard_unavailable", db=str(self.path),
                                    error=str(exc),
                                    consequence="a writer closing during our open may leave "
                                                "a -wal")
                    return True
            self.inode.lockers += 1
            self.held = True
        return True

    def unlock(self) -> None:
        with _INODES_LOCK:
            if self.held:
                self.held = False
                self.inode.lockers -= 1
                if self.inode.lockers == 0:
                    self._fcntl(fcntl.F_UNLCK)

    def header(self) -> bytes:
        return os.pread(self.inode.fd, 100, 0)

    def copy_to(self, target: Path) -> None:
        """The database's bytes into ``target``, read through our descriptor (opening and
        closing another one would drop locks)."""
        with open(target, "wb") as out:
            offset = 0
            while block := os.pread(self.inode.fd, 1 << 20, offset):
                out.write(block)
                offset += len(block)

    def close(self) -> None:
        self.unlock()
        with _INODES_LOCK:
            self.inode.users -= 1
            if self.inode.users or os.fstat(self.inode.fd).st_nlink:
                return
            del _INODES[self.key]  # unlinked and unused by us: give its space back
            for fd in (self.inode.fd, *self.inode.spare):
                os.close(fd)
