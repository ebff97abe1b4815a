"""Read-only access to upstream decision DBs.

trainingd never writes to a source DB: connections use a ``mode=ro`` URI plus
``PRAGMA query_only``, every read is a short transaction (a long one would stop the writer's
WAL checkpoints), and a DB locked by its writer is retried with backoff, not failed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon.decisions.schema import COLUMNS, TABLE, detect_schema
from daemon.errors import SchemaError, SourceBusyError
from daemon.records import SchemaReport

log = structlog.get_logger("decisions")

T = TypeVar("T")
Row = tuple[Any, ...]
"""``(rowid, *COLUMNS)``: a source row, values exactly as SQLite returned them."""

_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_IN_CHUNK = 500  # stays far below SQLITE_MAX_VARIABLE_NUMBER on every build
_SQLITE_CANTOPEN = 14
_CANTOPEN_ATTEMPTS = 6  # about 2 s in all


def is_busy_error(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in _BUSY_CODES:
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
        self, path: Path, *, busy_timeout_ms: int = 2000, busy_budget_seconds: float = 30.0
    ) -> None:
        self.path = path
        self.busy_budget_seconds = busy_budget_seconds
        uri = path.resolve().as_uri() + "?mode=ro"
        for attempt in range(_CANTOPEN_ATTEMPTS):
            try:
                self.conn = sqlite3.connect(
                    uri, uri=True, timeout=busy_timeout_ms / 1000, isolation_level=None,
                    check_same_thread=False,
                )
                self.conn.execute("PRAGMA query_only = ON")
                self.schema: SchemaReport = self._retry(lambda: detect_schema(self.conn))
                break
            except sqlite3.DatabaseError as exc:
                if is_busy_error(exc):
                    raise SourceBusyError(str(exc), path=path) from exc
                # a DB being created right now (no -shm yet for a WAL reader) cannot be opened
                # for a moment: retry briefly before calling the file unreadable
                if (getattr(exc, "sqlite_errorcode", None) == _SQLITE_CANTOPEN
                        and attempt + 1 < _CANTOPEN_ATTEMPTS):
                    time.sleep(0.1 * (attempt + 1))
                    continue
                raise SchemaError(f"{path}: {exc}", path=path) from exc
        present = set(self.schema.columns)
        self._select = ", ".join(
            ["rowid", *(c if c in present else f"NULL AS {c}" for c in COLUMNS)]
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _retry(self, action: Callable[[], T]) -> T:
        return retry_busy(action, path=self.path, budget_seconds=self.busy_budget_seconds)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One statement in one short read transaction, retried while the writer holds a lock."""

        def run() -> list[Row]:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                if is_busy_error(exc):
                    raise
                raise SchemaError(f"{self.path}: {exc}", path=self.path) from exc

        return self._retry(run)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, int, int]:
        """``(min rowid, max rowid, row count)`` read in one transaction.

        Three statements, not one: ``min``/``max`` alone are O(log n) seeks, but combined with
        ``count(*)`` in one SELECT they force a full table scan (10x slower at 1M rows)."""

        def run() -> tuple[int, int, int]:
            self.conn.execute("BEGIN")
            try:
                lo = self.conn.execute(f"SELECT coalesce(min(rowid), 0) FROM {TABLE}").fetchone()
                hi = self.conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {TABLE}").fetchone()
                n = self.conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            except sqlite3.DatabaseError as exc:
                if is_busy_error(exc):
                    raise
                raise SchemaError(f"{self.path}: {exc}", path=self.path) from exc
            finally:
                self.conn.execute("COMMIT")
            return int(lo[0]), int(hi[0]), int(n[0])

        return self._retry(run)

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
        ids = list(group_ids)
        out: list[Row] = []
        for i in range(0, len(ids), _IN_CHUNK):
            part = ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            out.extend(
                self._read(f"SELECT {self._select} FROM {TABLE} WHERE group_id IN ({marks})", part)
            )
        return out

    def rows_by_rowid(self, rowids: Iterable[int]) -> list[Row]:
        ids = list(rowids)
        out: list[Row] = []
        for i in range(0, len(ids), _IN_CHUNK):
            part = ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            out.extend(
                self._read(f"SELECT {self._select} FROM {TABLE} WHERE rowid IN ({marks})", part)
            )
        return out

    def group_ids_at(self, rowids: Sequence[int]) -> dict[int, Any]:
        """``rowid -> group_id`` for a few probe rowids (to notice VACUUM renumbering)."""
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = self._read(
            f"SELECT rowid, group_id FROM {TABLE} WHERE rowid IN ({marks})", list(rowids)
        )
        return {int(r[0]): r[1] for r in rows}

    def counts_by(self, column: str) -> dict[str, int]:
        if column not in self.schema.columns:
            return {}
        rows = self._read(f"SELECT {column}, count(*) FROM {TABLE} GROUP BY {column}")
        return {repr(r[0]) if not isinstance(r[0], str) else r[0]: int(r[1]) for r in rows}

    def first_rows(self, limit: int) -> list[Row]:
        return self._read(f"SELECT {self._select} FROM {TABLE} ORDER BY rowid LIMIT ?", (limit,))
