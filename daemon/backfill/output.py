"""The backfill's output side: one new v3 decision DB per project, built under a temp name
beside its target and linked into place only when complete.

A partial DB never sits under a target name, an existing file is never replaced (``os.link``
fails if the target appeared meanwhile), the temp file honours the umask, and a run killed with
SIGKILL leaves a temp whose ``flock`` is free, which the next run removes.  Split from
:mod:`daemon.backfill.run`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.backfill.options import TargetExistsError
from daemon.decisions.schema import INSERT_SQL, create_v3_db
from daemon.fsutil import file_mode, fsync_dir, hold, remove_unheld

#: rows per transaction of a new DB (it is fsynced once, before it is placed)
COMMIT_EVERY = 5000


class DbWriter:
    """One project's new DB, built under a temp name beside the target."""

    def __init__(self, target: Path, check: Callable[[Path], None] | None = None) -> None:
        self.check = check
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_unheld(target.parent.glob(f".{target.name}.*.tmp"), extra=("-journal",))
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self.lock_fd = hold(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the umask decides, as for open()
        self.target, self.tmp = target, Path(tmp)
        self.rows = 0
        self.conn = create_v3_db(self.tmp, wal=False)
        # the file is fsynced once before it is linked into place; a crash leaves only the temp
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("BEGIN")

    def add(self, row: tuple[Any, ...]) -> None:
        self.conn.execute(INSERT_SQL, row)
        self.rows += 1
        if self.rows % COMMIT_EVERY == 0:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN")

    def finish(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())

    def discard(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        for path in (self.tmp, Path(f"{self.tmp}-journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._release()

    def _release(self) -> None:
        if self.lock_fd >= 0:  # once: the number may belong to another file afterwards
            os.close(self.lock_fd)
            self.lock_fd = -1

    def place(self) -> None:
        """Put the finished DB under its target name without ever replacing a file there."""
        if self.check is not None:
            self.check(self.target)  # again: a folder may have been swapped for a link
        try:
            os.link(self.tmp, self.target)  # fails if the target appeared meanwhile
        except FileExistsError:
            raise TargetExistsError(self.target) from None
        except OSError:
            # no hard links on this file system: check, then rename
            if self.target.exists():
                raise TargetExistsError(self.target) from None
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink()
        self._release()
        fsync_dir(self.target.parent)
