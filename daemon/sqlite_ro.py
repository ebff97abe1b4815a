"""Open any SQLite file for reading without creating, changing or leaving any file beside it.

Why: a plain ``mode=ro`` open of a WAL database whose writer has closed creates ``-wal`` and
``-shm`` beside it and leaves them there, owned by us; the upstream writer, running as another
user, then fails with "attempt to write a readonly database".  In a folder we may read but not
write, the same open fails outright (SQLITE_CANTOPEN), and ``trainingd status`` run by another
user after the daemon stopped failed the same way.  This module is the one place that opens a
SQLite file we do not write (upstream decision DBs, and the state DB for read-only commands).
It must never write, create, rename or delete a file beside the database.

How it decides (each behaviour measured on SQLite 3.40.1; ``tests/test_invisible_reads.py``
holds the proofs):

1. **Guard.**  Before looking at the folder, take an open-file-description read lock
   (``F_OFD_SETLK``) on the byte range SQLite's unix VFS uses for SHARED locks.  A WAL writer
   deletes its ``-wal``/``-shm`` on close only after it gets an EXCLUSIVE lock on that range, and
   switching journal mode needs one too, so while the guard is held the files we saw cannot
   vanish or appear by a mode switch.  An OFD lock belongs to our descriptor: SQLite closing its
   own descriptor on the same file in this process does not drop it (a classic POSIX lock would
   be).  A refused guard means a writer holds EXCLUSIVE right now (a rollback commit, a WAL
   checkpoint-on-close, exclusive locking mode): wait up to the busy timeout, then report busy.
2. **Layout**, decided under the guard:

   - ``-wal`` and ``-shm`` present (a writer is open, or left them): ``"wal"``.  ``mode=ro``
     reads through the writer's files; with ``readonly_shm=1`` when the ``-shm`` is not writable
     by us (a read-only folder, another user's file), so SQLite never tries ``O_CREAT``.  Once
     connected SQLite keeps its own SHARED lock, so the guard is released after the first read.
   - ``-wal`` without ``-shm``: a writer between creating the two (re-checked for 0.5 s), or
     the orphan of a crashed exclusive-mode writer.  ``mode=ro`` would create the ``-shm``, so
     the database and its ``-wal`` are copied (under the guard, proven unchanged by a stat
     before and after) into a private temp folder and read there: ``"copy"``, logged with why.
   - a WAL header (bytes 18/19 == 2) and no ``-wal`` (the writer closed cleanly): ``"immutable"``.
     ``immutable=1`` takes no lock and opens no ``-wal``/``-shm``.  The guard is kept for the
     connection's life, and every read is fenced: the main file's (dev, ino, size, mtime_ns,
     ctime_ns) must equal the stamp taken at open, and no ``-wal`` may exist, before and after.
     A WAL writer can only change the main file by a checkpoint out of a ``-wal`` it cannot
     delete while we hold the guard, so "no ``-wal`` after" proves no SQLite writer touched it.
     On a failed fence the connection is closed (an immutable connection caches pages: it would
     keep serving the old ones), reopened in the layout the folder now calls for, and the read
     is redone.
   - anything else (rollback journal, an empty or foreign file): ``"rollback"``, ``mode=ro``,
     which creates nothing.  A hot journal we may not roll back answers
     SQLITE_READONLY_ROLLBACK; :func:`is_busy_error` callers treat it as busy and retry.

One descriptor per file, never closed under a lock: closing any descriptor of a file drops
every classic POSIX lock this process holds on it, so an open-check-close of our own would silently
take the SHARED lock away from another SQLite connection in this process (measured: a second
process then checkpointed and deleted the ``-wal``/``-shm`` under a live writer, and a reader in
``"wal"`` layout missed committed rows).  The guard's descriptor is kept per (dev, inode) for the
life of the process and closed only once the file is unlinked and none of our readers uses it;
the private copy reads the main file through it too.

Residual races, kept as small as we could:

- Without OFD locks (not Linux, or a filesystem that refuses them; logged once as
  ``sqlite_ro.guard_unavailable``) the window between our existence check and SQLite's own open
  (microseconds) is open: a writer closing exactly then makes the ``mode=ro`` open create a
  ``-wal`` (the ``-shm`` only when it is writable).  Fences then rest on the stat alone, whose
  timestamps tick with the kernel's coarse clock (a few ms).
- A ``"rollback"`` connection is unguarded between reads: a writer converting that database to
  WAL and closing again in that gap would make our next read create a ``-wal``.  Upstream
  decision DBs are WAL from their first write, so this needs a foreign tool.
- A writer that closes while we hold the guard or a connection cannot checkpoint and delete its
  ``-wal``/``-shm``: they stay, owned by the writer with its modes, until it next opens and closes
  (exactly what any second reader does to it).  Never a file of ours.

Connections are read-only (``PRAGMA query_only``); nothing here retries SQLite's busy errors:
callers own their retry budget (:func:`daemon.decisions.reader.retry_busy`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon.sqlite_guard import (
    ReadBusyError,
    _Guard,
    _Stamp,
    _stamp,
)

log = structlog.get_logger("sqlite_ro")

T = TypeVar("T")

_WAL_WITHOUT_SHM_WAIT_SECONDS = 0.5
_COPY_ATTEMPTS = 3
_FENCE_ATTEMPTS = 5

LAYOUTS = ("wal", "immutable", "rollback", "copy")


class ReadOnlyDB:
    """One invisible read-only handle on a SQLite file (see the module docstring).

    :meth:`read` runs a function on the current connection; in the ``"immutable"`` layout it is
    fenced and redone on a fresh connection when the file changed under it.  The function must
    only read, and must be safe to run twice.
    """

    def __init__(
        self, path: Path | str, *, timeout_seconds: float = 5.0,
        scratch_dir: Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        # SQLite names the -wal/-shm after the file it finally opens, past any symlink
        self._real = Path(os.path.realpath(path))
        self._wal = Path(f"{self._real}-wal")
        self._shm = Path(f"{self._real}-shm")
        self.timeout_seconds = timeout_seconds
        self.scratch_dir = scratch_dir
        self._sleep, self._clock = sleep, clock
        self.layout = ""
        self.reopened = 0
        self._conn: sqlite3.Connection | None = None
        self._guard: _Guard | None = None
        self._stamp: _Stamp | None = None
        self._scratch: Path | None = None
        self._open()

    # -- opening --------------------------------------------------------------------------------

    def _open(self) -> None:
        deadline = self._clock() + self.timeout_seconds
        guard = _Guard(self._real)
        keep_guard = False
        try:
            delay = 0.005
            while not guard.try_lock():
                if self._clock() >= deadline:
                    raise ReadBusyError(f"{self.path}: a writer held an exclusive lock for "
                                        f"{self.timeout_seconds:g}s")
                self._sleep(min(delay, max(0.0, deadline - self._clock())))
                delay = min(delay * 2, 0.1)
            layout = self._choose_layout(guard)
            if layout == "immutable":
                self._stamp = _stamp(self._real)
                self._conn = self._connect(self._uri(self._real, "mode=ro&immutable=1"))
                self._guard, keep_guard = guard, True  # it is what makes the fence a proof
            elif layout == "wal":
                query = "mode=ro" if os.access(self._shm, os.W_OK) else "mode=ro&readonly_shm=1"
                conn = self._connect(self._uri(self._real, query))
                try:
                    # the first read takes SQLite's own SHARED lock, which it keeps while
                    # connected in WAL mode: from then on the writer cannot delete its files
                    conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            elif layout == "copy":
                self._conn = self._connect_copy(guard)
            else:
                self._conn = self._connect(self._uri(self._real, "mode=ro"))
            self.layout = layout
            log.debug("sqlite_ro.opened", db=str(self.path), layout=layout)
        finally:
            if not keep_guard:
                guard.close()

    def _choose_layout(self, guard: _Guard) -> str:
        give_up = self._clock() + _WAL_WITHOUT_SHM_WAIT_SECONDS
        while True:
            wal, shm = os.path.lexists(self._wal), os.path.lexists(self._shm)
            if wal and shm:
                return "wal"
            if wal:
                # a writer creates -wal, then -shm, during its first read: give it a moment
                if self._clock() < give_up:
                    self._sleep(0.02)
                    continue
                return "copy"
            header = guard.header()
            if len(header) >= 20 and header[18] == 2 and header[19] == 2:
                return "immutable"
            return "rollback"

    @staticmethod
    def _uri(path: Path, query: str) -> str:
        return f"{path.as_uri()}?{query}"

    def _connect(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=self.timeout_seconds,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_copy(self, guard: _Guard) -> sqlite3.Connection:
        """Copy the database and its ``-wal`` into a private folder and open the copy there."""
        scratch = Path(tempfile.mkdtemp(prefix="trainingd-ro-", dir=self.scratch_dir))
        try:
            target = scratch / self._real.name
            for _ in range(_COPY_ATTEMPTS):
                before = (_stamp(self._real), _stamp(self._wal))
                guard.copy_to(target)
                shutil.copyfile(self._wal, Path(f"{target}-wal"))  # SQLite locks no -wal
                if before[1] is not None and (_stamp(self._real), _stamp(self._wal)) == before:
                    break
            else:
                raise ReadBusyError(f"{self.path}: database or -wal kept changing while copied")
            log.warning("sqlite_ro.private_copy_read", db=str(self.path), copy=str(target),
                        reason="a -wal without its -shm (a crashed writer in exclusive locking "
                               "mode, or a removed -shm): reading in place would create a -shm")
            conn = self._connect(self._uri(target, "mode=ro"))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        self._scratch = scratch
        return conn

    # -- reading --------------------------------------------------------------------------------

    @property
    def fenced(self) -> bool:
        """True while reads go to an immutable snapshot that must be proven unchanged."""
        return self.layout == "immutable"

    def _unchanged(self) -> bool:
        return not os.path.lexists(self._wal) and _stamp(self._real) == self._stamp

    def _reopen(self, when: str) -> None:
        self.reopened += 1
        log.info("sqlite_ro.snapshot_changed", db=str(self.path), when=when,
                 wal_present=os.path.lexists(self._wal), reopened=self.reopened)
        self._close_current()
        self._open()

    def read(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """``action(connection)``: fenced, and redone on a fresh connection if the file changed
        under an immutable snapshot."""
        for _ in range(_FENCE_ATTEMPTS):
            if self._conn is None:
                self._open()
            assert self._conn is not None
            if not self.fenced:
                return action(self._conn)
            if not self._unchanged():
                self._reopen("between reads")
                continue
            try:
                result = action(self._conn)
            except sqlite3.DatabaseError:
                # a checkpoint under an immutable snapshot can make it look malformed: that is
                # the change, not the file; a real error repeats on the fresh connection
                if self._unchanged():
                    raise
                self._reopen("during a read that failed")
                continue
            if self._unchanged():
                return result
            self._reopen("during a read")
        raise ReadBusyError(f"{self.path} changed under {_FENCE_ATTEMPTS} reads in a row")

    # -- closing --------------------------------------------------------------------------------

    def _close_current(self) -> None:
        conn, guard, scratch = self._conn, self._guard, self._scratch
        self._conn = self._guard = self._scratch = None
        self._stamp = None
        try:
            if conn is not None:
                conn.close()
        finally:
            if guard is not None:
                guard.close()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ReadOnlyDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RowsCursor(sqlite3.Cursor):
    """A cursor over rows already read (and proven) by a fenced read."""

    def __init__(self, conn: sqlite3.Connection, rows: list[Any]) -> None:
        super().__init__(conn)
        self._rows = rows
        self._at = 0

    def fetchone(self) -> Any:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        n = self.arraysize if size is None else size
        out = self._rows[self._at : self._at + n]
        self._at += len(out)
        return out

    def fetchall(self) -> list[Any]:
        out = self._rows[self._at :]
        self._at = len(self._rows)
        return out

    def __iter__(self) -> _RowsCursor:
        return self

    def __next__(self) -> Any:
        if self._at >= len(self._rows):
            raise StopIteration
        return self.fetchone()


class ReadOnlyConnection(sqlite3.Connection):
    """A ``sqlite3.Connection`` face on a :class:`ReadOnlyDB`, for code written against a
    connection (the read-only :class:`daemon.store.StateStore`).

    It stands on an empty in-memory database, so only :meth:`execute` reaches the file: each
    statement is one read, fenced and fully fetched in the ``"immutable"`` layout (rows are held
    in memory), a plain lazy cursor otherwise.
    """

    db: ReadOnlyDB | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        db = self.db
        if db is None:
            return super().execute(sql, parameters)
        if db.fenced:
            rows = db.read(lambda c: c.execute(sql, parameters).fetchall())
            return _RowsCursor(self, rows)
        return db.read(lambda c: c.execute(sql, parameters))

    def close(self) -> None:
        try:
            if self.db is not None:
                self.db.close()
        finally:
            super().close()


def connect_read_only(
    path: Path | str, *, timeout_seconds: float = 5.0, scratch_dir: Path | None = None
) -> sqlite3.Connection:
    """A read-only connection to ``path`` that leaves no file beside it (module docstring)."""
    db = ReadOnlyDB(path, timeout_seconds=timeout_seconds, scratch_dir=scratch_dir)
    try:
        conn = sqlite3.connect(":memory:", factory=ReadOnlyConnection, isolation_level=None,
                               check_same_thread=False)
    except BaseException:
        db.close()
        raise
    conn.db = db
    return conn
