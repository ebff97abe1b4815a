"""Read-only access to upstream decision DBs.

trainingd never writes to a source DB, and reading one is invisible: every open goes through
:class:`daemon.sqlite_ro.ReadOnlyDB`, which creates, changes and leaves no file in the decisions
folder (no ``-wal``/``-shm`` of ours that would lock a writer running as another user out) and
works in a folder we may only read.  Connections are ``PRAGMA query_only``; every read is a
short transaction (a long one would stop the writer's WAL checkpoints) run through
:meth:`ReadOnlyDB.read`, which fences reads of an immutable snapshot and redoes them when the
file changed; a DB locked by its writer (or a hot journal we may not roll back) is retried with
backoff, not failed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon.decisions.schema import COLUMNS, TABLE, detect_schema
from daemon.errors import SchemaError, SourceBusyError
from daemon.records import SchemaReport
from daemon.sqlite_ro import ReadOnlyDB
from daemon.store.chunks import in_chunks

log = structlog.get_logger("decisions")

T = TypeVar("T")
Row = tuple[Any, ...]
"""``(rowid, *COLUMNS)``: a source row, values exactly as SQLite returned them."""

_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
#: read-only "come back later": a hot journal only its writer may roll back, a WAL index only a
#: writer may rebuild (SQLITE_READONLY_ROLLBACK, SQLITE_READONLY_RECOVERY)
_READONLY_WAIT_CODES = {8 | (3 << 8), 8 | (1 << 8)}
_SQLITE_CANTOPEN = 14
_CANTOPEN_ATTEMPTS = 6  # about 2 s in all


def is_busy_error(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and ((code & 0xFF) in _BUSY_CODES or code in _READONLY_WAIT_CODES):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def retry_busy(
    action: Callable[[], T],
    *,
    path: Path,
    budget_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``action``; while SQLite says busy/locked, back off and retry until the budget is
    spent, then raise :class:`SourceBusyError` (the caller retries on its next round)."""
    deadline = clock() + budget_seconds
    delay = 0.05
    attempts = 0
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not is_busy_error(exc):
                raise
            attempts += 1
            if clock() >= deadline:
                raise SourceBusyError(
                    f"{path} stayed locked for {budget_seconds:.0f}s ({attempts} attempts)",
                    path=path,
                ) from exc
            log.debug("decisions.busy_retried", db=str(path), attempt=attempts, error=str(exc))
            sleep(min(delay, max(0.0, deadline - clock())))
            delay = min(delay * 2, 1.0)


class SourceReader:
    """A read-only view of one decision DB, selecting the canonical columns by name.

    Columns missing from a drifted DB read as NULL; the schema report says which ones, so the
    checks can tell "missing column" from "NULL value".
    """

    def __init__(
        self, path: Path, *, busy_timeout_ms: int = 2000, busy_budget_seconds: float = 30.0,
        scratch_dir: Path | None = None,
    ) -> None:
        """``scratch_dir``: where a private copy goes when the DB can only be read that way
        (a ``-wal`` without its ``-shm``); the system temp folder by default."""
        self.path = path
        self.busy_budget_seconds = busy_budget_seconds
        for attempt in range(_CANTOPEN_ATTEMPTS):
            db: ReadOnlyDB | None = None
            try:
                db = self._retry(lambda: ReadOnlyDB(
                    path, timeout_seconds=busy_timeout_ms / 1000, scratch_dir=scratch_dir))
                self.schema: SchemaReport = self._retry(partial(db.read, detect_schema))
                self._db = db
                break
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                if is_busy_error(exc):
                    raise SourceBusyError(str(exc), path=path) from exc
                # a DB being created right now may not be there for a moment: retry briefly
                # before calling the file unreadable
                if (getattr(exc, "sqlite_errorcode", None) == _SQLITE_CANTOPEN
                        and attempt + 1 < _CANTOPEN_ATTEMPTS):
                    time.sleep(0.1 * (attempt + 1))
                    continue
                raise SchemaError(f"{path}: {exc}", path=path) from exc
            except BaseException:
                if db is not None:
                    db.close()
                raise
        present = set(self.schema.columns)
        self._select = ", ".join(
            ["rowid", *(c if c in present else f"NULL AS {c}" for c in COLUMNS)]
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _retry(self, action: Callable[[], T]) -> T:
        return retry_busy(action, path=self.path, budget_seconds=self.busy_budget_seconds)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One statement in one short read transaction, retried while the writer holds a lock."""

        def run(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        return self._retry(lambda: self._guarded(run))

    def _guarded(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """``action`` through the invisible reader: busy errors go up to :meth:`_retry`, any
        other SQLite error means the file cannot be read as a decision DB."""
        try:
            return self._db.read(action)
        except sqlite3.DatabaseError as exc:
            if is_busy_error(exc):
                raise
            raise SchemaError(f"{self.path}: {exc}", path=self.path) from exc

    @property
    def layout(self) -> str:
        """How the DB is read now (:data:`daemon.sqlite_ro.LAYOUTS`)."""
        return self._db.layout

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, int, int]:
        """``(min rowid, max rowid, row count)`` read in one transaction.

        Three statements, not one: ``min``/``max`` alone are O(log n) seeks, but combined with
        ``count(*)`` in one SELECT they force a full table scan (10x slower at 1M rows)."""

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            conn.execute("BEGIN")
            try:
                lo = conn.execute(f"SELECT coalesce(min(rowid), 0) FROM {TABLE}").fetchone()
                hi = conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {TABLE}").fetchone()
                n = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            finally:
                conn.execute("COMMIT")
            return int(lo[0]), int(hi[0]), int(n[0])

        return self._retry(lambda: self._guarded(run))

    def iter_rows(self, after: int, upto: int, chunk: int) -> Iterator[list[Row]]:
        """Rows with ``after < rowid <= upto`` in rowid order, one short transaction per chunk."""
        cursor = after
        while cursor < upto:
            rows = self._read(
                f"SELECT {self._select} FROM {TABLE} WHERE rowid > ? AND rowid <= ? "
                "ORDER BY rowid LIMIT ?",
                (cursor, upto, chunk),
            )
            if not rows:
                return
            yield rows
            cursor = int(rows[-1][0])

    def rows_by_group_id(self, group_ids: Iterable[str]) -> list[Row]:
        return self._rows_where_in(self._select, "group_id", group_ids)

    def rows_by_rowid(self, rowids: Iterable[int]) -> list[Row]:
        return self._rows_where_in(self._select, "rowid", rowids)

    def group_ids_at(self, rowids: Sequence[int]) -> dict[int, Any]:
        """``rowid -> group_id`` for a few probe rowids (to notice VACUUM renumbering)."""
        return {int(r[0]): r[1] for r in self._rows_where_in("rowid, group_id", "rowid", rowids)}

    def _rows_where_in(self, select: str, column: str, ids: Iterable[Any]) -> list[Row]:
        """``SELECT select ... WHERE column IN (ids)``, in chunks (no ids, no query)."""
        out: list[Row] = []
        for part, marks in in_chunks(ids):
            out.extend(self._read(f"SELECT {select} FROM {TABLE} WHERE {column} IN ({marks})",
                                  part))
        return out

    def counts_by(self, column: str) -> dict[str, int]:
        if column not in self.schema.columns:
            return {}
        rows = self._read(f"SELECT {column}, count(*) FROM {TABLE} GROUP BY {column}")
        return {repr(r[0]) if not isinstance(r[0], str) else r[0]: int(r[1]) for r in rows}

    def first_rows(self, limit: int) -> list[Row]:
        return self._read(f"SELECT {self._select} FROM {TABLE} ORDER BY rowid LIMIT ?", (limit,))
