"""The training room's tables: ``training_runs``, ``training_marks`` and the audit's
``token_ledger`` (migration ``0004_training``).

Which rows are labels is the retrain policy's rule (:mod:`daemon.training.policy`); it is
written here as SQL because the count runs over every validated row and must not cross into
Python.  Only the process that owns the state DB's writer writes here: the training child
reports its outcome on a pipe and the parent records it (see ``TECHNICAL_KNOWLEDGE_BASE.md``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.store.db import StateStore

Kind = Literal["ranker", "crop"]
FINISHED = ("promoted", "not_promoted")

_ELIGIBLE = {
    "ranker": "r.errors = 0 AND r.pending_crop = 0 AND r.user_action IN ('approve', 'crop')",
    "crop": "r.errors = 0 AND r.pending_crop = 0 AND r.user_action = 'crop'",
}
_LEGACY = r"r.group_id LIKE '%\_legacy\_%' ESCAPE '\'"


@dataclass(frozen=True, slots=True)
class NewLabels:
    """Labels of one project not yet trained on, split by origin."""

    project: str
    backfilled: bool
    count: int


@dataclass(frozen=True, slots=True)
class TrainingRun:
    id: int
    kind: str
    started_at: str
    finished_at: str | None
    status: str
    version: int | None
    promoted: bool
    reason: str
    new_labels: int
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "started_at": self.started_at,
                "finished_at": self.finished_at, "status": self.status,
                "version": self.version, "promoted": self.promoted, "reason": self.reason,
                "new_labels": self.new_labels, "metrics": self.metrics}


@dataclass(frozen=True, slots=True)
class TokenDay:
    day: str
    tokens: int
    calls: int
    warned: bool


class TrainingRepo:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    # -- labels -----------------------------------------------------------------------------

    def new_labels(self, kind: Kind) -> list[NewLabels]:
        """Per project and origin: valid labels not in ``training_marks`` for ``kind``."""
        return [NewLabels(str(p), bool(legacy), int(n)) for p, legacy, n in
                self._store.conn.execute(
                    f"SELECT r.project, {_LEGACY}, count(*) FROM row_state r "
                    f"WHERE {_ELIGIBLE[kind]} AND NOT EXISTS (SELECT 1 FROM training_marks m "
                    "WHERE m.kind = ? AND m.project = r.project AND m.row_key = r.row_key) "
                    "GROUP BY 1, 2", (kind,))]

    def label_keys(self, kind: Kind) -> list[tuple[str, str]]:
        """``(project, row_key)`` of every label a training started now can see."""
        return [(r[0], r[1]) for r in self._store.conn.execute(
            f"SELECT r.project, r.row_key FROM row_state r WHERE {_ELIGIBLE[kind]}")]

    # -- runs -------------------------------------------------------------------------------

    def last_started(self, kind: Kind) -> str | None:
        value = self._store.conn.execute(
            "SELECT max(started_at) FROM training_runs WHERE kind = ?", (kind,)).fetchone()[0]
        return None if value is None else str(value)

    def last_finished(self, kind: Kind) -> str | None:
        """When the last run of ``kind`` that produced a model ended."""
        value = self._store.conn.execute(
            "SELECT max(finished_at) FROM training_runs WHERE kind = ? "
            f"AND status IN {FINISHED!r}", (kind,)).fetchone()[0]
        return None if value is None else str(value)

    def start_run(self, kind: Kind, now: datetime, new_labels: int, *,
                  abandoned_before: datetime | None = None, abandon_reason: str = "") -> int:
        """Record a run as ``running``; runs of ``kind`` still ``running`` that started before
        ``abandoned_before`` are closed as ``abandoned`` in the same transaction."""
        with self._store.transaction() as conn:
            if abandoned_before is not None:
                conn.execute(
                    "UPDATE training_runs SET status = 'abandoned', finished_at = ?, "
                    "reason = ? WHERE kind = ? AND status = 'running' AND started_at < ?",
                    (iso_utc(now), abandon_reason, kind, iso_utc(abandoned_before)))
            cur = conn.execute(
                "INSERT INTO training_runs (kind, started_at, status, new_labels) "
                "VALUES (?, ?, 'running', ?)", (kind, iso_utc(now), new_labels))
        return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, *, kind: Kind, status: str, now: datetime,
                version: int | None, promoted: bool, reason: str, metrics: dict[str, Any],
                marks: Iterable[tuple[str, str]] = ()) -> None:
        """Close the run; a finished run marks its labels in the same transaction."""
        with self._store.transaction() as conn:
            conn.execute(
                "UPDATE training_runs SET finished_at = ?, status = ?, version = ?, "
                "promoted = ?, reason = ?, metrics = ? WHERE id = ?",
                (iso_utc(now), status, version, int(promoted), reason,
                 json.dumps(metrics, default=str), run_id))
            if status in FINISHED:
                conn.executemany(
                    "INSERT OR IGNORE INTO training_marks (kind, project, row_key) "
                    "VALUES (?, ?, ?)", [(kind, p, k) for p, k in marks])

    def restore_runs(self, runs: Iterable[TrainingRun]) -> int:
        """Refill an empty history after a rebuild; returns how many rows were written."""
        if self._store.conn.execute("SELECT 1 FROM training_runs LIMIT 1").fetchone():
            return 0
        rows = [(r.kind, r.started_at, r.finished_at, r.status, r.version, int(r.promoted),
                 r.reason, json.dumps(r.metrics, default=str)) for r in runs]
        with self._store.transaction() as conn:
            conn.executemany(
                "INSERT INTO training_runs (kind, started_at, finished_at, status, version, "
                "promoted, reason, metrics) VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def runs(self, since: datetime | None = None) -> list[TrainingRun]:
        """Training runs, oldest first."""
        sql = ("SELECT id, kind, started_at, finished_at, status, version, promoted, reason, "
               "new_labels, metrics FROM training_runs")
        params: tuple[Any, ...] = ()
        if since is not None:
            sql += " WHERE started_at >= ?"
            params = (iso_utc(since),)
        return [TrainingRun(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8],
                            json.loads(r[9] or "{}"))
                for r in self._store.conn.execute(sql + " ORDER BY id", params)]

    def run_counts(self) -> dict[tuple[str, str], int]:
        """``(kind, status) -> runs`` of every run that ended."""
        return {(str(k), str(s)): int(n) for k, s, n in self._store.conn.execute(
            "SELECT kind, status, count(*) FROM training_runs WHERE status != 'running' "
            "GROUP BY 1, 2")}

    # -- the audit's token ledger -----------------------------------------------------------

    def token_day(self, day: str) -> TokenDay:
        """Tokens spent on ``day``; a state DB older than ``0004_training`` spent nothing."""
        try:
            row = self._store.conn.execute(
                "SELECT tokens, calls, warned FROM token_ledger WHERE day = ?",
                (day,)).fetchone()
        except sqlite3.OperationalError:
            row = None
        return TokenDay(day, int(row[0]), int(row[1]), bool(row[2])) if row else \
            TokenDay(day, 0, 0, False)

    def add_tokens(self, day: str, tokens: int, *, warn_at: int) -> tuple[TokenDay, bool]:
        """Add one call's tokens; the flag says whether the day reached ``warn_at`` just now
        (so the warning is logged once per day)."""
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO token_ledger (day, tokens, calls) VALUES (?, ?, 1) ON CONFLICT(day) "
                "DO UPDATE SET tokens = tokens + excluded.tokens, calls = calls + 1",
                (day, max(0, tokens)))
            spent = self.token_day(day)
            first = spent.tokens >= warn_at and not spent.warned
            if first:
                conn.execute("UPDATE token_ledger SET warned = 1 WHERE day = ?", (day,))
        return spent, first
