"""How the state DB tells damage from trouble, and how a damaged file is put aside.

Split from :mod:`daemon.store.db` (which opens, heals and runs transactions) so the rules for
"this file is damaged" live in one short room: a damaged or foreign file (SQLITE_CORRUPT,
SQLITE_NOTADB, a header that is not SQLite) is moved aside and rebuilt, while busy, locked,
read-only or missing files are never mistaken for damage.  Nothing here opens a connection.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from daemon.errors import StoreError

#: SQLite primary result codes that mean "this file is damaged", not "try again later"
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_COMPANIONS = ("-wal", "-shm", "-journal")
#: beside the state DB: a statement met corruption during work, so the next start rebuilds
MARKER_SUFFIX = ".needs-rebuild"


class StoreCorruptError(StoreError):
    """The state DB file is damaged or not SQLite at all: move it aside and rebuild it."""


def is_corruption(exc: BaseException) -> bool:
    """A damaged or foreign file, as opposed to busy, locked, read-only or missing."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc)
    return "malformed" in text or "not a database" in text


class GuardedConnection(sqlite3.Connection):
    """A connection whose statements turn corruption into :class:`StoreCorruptError` (and tell
    the store), so no caller mistakes a damaged file for a bad row or a busy source."""

    on_corrupt: Callable[[str], None] | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._raise_if_corrupt(exc)
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._raise_if_corrupt(exc)
            raise

    def _raise_if_corrupt(self, exc: sqlite3.DatabaseError) -> None:
        if is_corruption(exc):
            if self.on_corrupt is not None:
                self.on_corrupt(str(exc))
            raise StoreCorruptError(f"state DB is damaged: {exc}") from exc


def foreign_header(path: str) -> str | None:
    """Why a non-empty file is not SQLite at all, judged by its 16-byte magic, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None  # missing (a new DB) or unreadable: SQLite's open says which
    if not head or head == b"SQLite format 3\x00":
        return None
    return f"not an SQLite file (starts with {head[:16]!r})"


def file_identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at ``path``; None for an in-memory or URI DB, or a
    path that cannot be stat'ed now."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def move_aside(path: str, what: str, *, main: bool) -> list[str]:
    """Rename ``path`` (if ``main``) and its companions to ``<path>.<what>-<UTC time><suffix>``;
    never overwrites an earlier one."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tag, n = f"{what}-{stamp}", 1
    while any(os.path.lexists(f"{path}.{tag}{s}") for s in ("", *_COMPANIONS)):
        n += 1
        tag = f"{what}-{stamp}-{n}"
    moved = []
    for suffix in ("", *_COMPANIONS) if main else _COMPANIONS:
        target = f"{path}.{tag}{suffix}"
        try:
            os.replace(path + suffix, target)
        except FileNotFoundError:
            continue
        moved.append(target)
    return moved
