"""When to retrain: a pure rule over durable counters, and the run history it reads.

"New labels since the last training" is counted in the state DB: a label is a validated,
usable row (no errors, not waiting for its crop) that is not yet in ``training_marks`` for the
model kind; a finished training marks every label it could see.  So the count never depends on
``count % N`` and survives restarts, rule bumps and re-validation.  Rows written by
``trainingd backfill`` (a ``_legacy_`` group id) count only for projects whose
``backfill_counts_toward_retrain`` is true; they are trained on either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from daemon.settings import Settings, TrainingSettings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc, parse_timestamp

Kind = Literal["ranker", "crop"]
KINDS: tuple[Kind, ...] = ("ranker", "crop")
FINISHED = ("promoted", "not_promoted")

_ELIGIBLE = {
    "ranker": "r.errors = 0 AND r.pending_crop = 0 AND r.user_action IN ('approve', 'crop')",
    "crop": "r.errors = 0 AND r.pending_crop = 0 AND r.user_action = 'crop'",
}
_LEGACY = r"r.group_id LIKE '%\_legacy\_%' ESCAPE '\'"


@dataclass(frozen=True, slots=True)
class RetrainDecision:
    due: bool
    reason: str
    new_labels: int


def decide(new_labels: int, last_attempt_at: datetime | None, last_trained_at: datetime | None,
           now: datetime, cfg: TrainingSettings) -> RetrainDecision:
    """The rule itself: pure, so it is tested with tables and hypothesis."""
    if new_labels <= 0:
        return RetrainDecision(False, "no new labels since the last training", new_labels)
    interval = timedelta(hours=cfg.min_interval_hours)
    if last_attempt_at is not None and now - last_attempt_at < interval:
        return RetrainDecision(
            False, f"last attempt {now - last_attempt_at} ago, minimum interval {interval}",
            new_labels)
    if new_labels >= cfg.min_new_labels:
        return RetrainDecision(
            True, f"{new_labels} new labels >= min_new_labels {cfg.min_new_labels}", new_labels)
    stale = timedelta(hours=cfg.max_staleness_hours)
    if last_trained_at is not None and now - last_trained_at >= stale:
        return RetrainDecision(
            True, f"last training {now - last_trained_at} ago >= max staleness {stale}",
            new_labels)
    return RetrainDecision(
        False, f"{new_labels} new labels < min_new_labels {cfg.min_new_labels}", new_labels)


def count_new_labels(store: StateStore, settings: Settings, kind: Kind) -> int:
    """Valid labels not yet trained on, backfilled rows only where the project allows."""
    total = 0
    for project, legacy, n in store.conn.execute(
        f"SELECT r.project, {_LEGACY}, count(*) FROM row_state r WHERE {_ELIGIBLE[kind]} "
        "AND NOT EXISTS (SELECT 1 FROM training_marks m WHERE m.kind = ? "
        "AND m.project = r.project AND m.row_key = r.row_key) GROUP BY 1, 2",
        (kind,),
    ):
        cfg = settings.projects.get(project)
        if legacy and not (cfg is not None and cfg.backfill_counts_toward_retrain):
            continue
        total += int(n)
    return total


def label_keys(store: StateStore, kind: Kind) -> list[tuple[str, str]]:
    """Every label a training started now can see (marked once the training finishes)."""
    return [(r[0], r[1]) for r in store.conn.execute(
        f"SELECT r.project, r.row_key FROM row_state r WHERE {_ELIGIBLE[kind]}")]


def _last(store: StateStore, kind: Kind, column: str, finished_only: bool) -> datetime | None:
    sql = f"SELECT max({column}) FROM training_runs WHERE kind = ?"
    if finished_only:
        sql += f" AND status IN {FINISHED!r}"
    value = store.conn.execute(sql, (kind,)).fetchone()[0]
    return parse_timestamp(value) if value else None


def retrain_decision(store: StateStore, settings: Settings, kind: Kind,
                     now: datetime) -> RetrainDecision:
    """Whether ``kind`` is due for training now (the scheduler's and triggers' question)."""
    return decide(count_new_labels(store, settings, kind),
                  _last(store, kind, "started_at", finished_only=False),
                  _last(store, kind, "finished_at", finished_only=True),
                  now, settings.training)


def record_run_start(store: StateStore, kind: Kind, now: datetime, new_labels: int, *,
                     abandon_after: timedelta | None = None) -> int:
    """Record a run as ``running``.  With ``abandon_after``, earlier runs of ``kind`` still
    ``running`` that started longer ago than that (a run is killed at its timeout, so no live
    run is that old) are closed as ``abandoned``: a kill -9 or a power cut left them open."""
    with store.transaction() as conn:
        if abandon_after is not None:
            conn.execute(
                "UPDATE training_runs SET status = 'abandoned', finished_at = ?, reason = ? "
                "WHERE kind = ? AND status = 'running' AND started_at < ?",
                (iso_utc(now), "no end was recorded within training.timeout_minutes: the "
                 "process was killed (kill -9, OOM, power cut)", kind,
                 iso_utc(now - abandon_after)))
        cur = conn.execute(
            "INSERT INTO training_runs (kind, started_at, status, new_labels) "
            "VALUES (?, ?, 'running', ?)", (kind, iso_utc(now), new_labels))
    return int(cur.lastrowid or 0)


def record_run_end(store: StateStore, run_id: int, *, status: str, now: datetime,
                   version: int | None, promoted: bool, reason: str, metrics: dict[str, Any],
                   kind: Kind, marks: Iterable[tuple[str, str]] = ()) -> None:
    """Close the run; a finished run marks its labels in the same transaction."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE training_runs SET finished_at = ?, status = ?, version = ?, promoted = ?, "
            "reason = ?, metrics = ? WHERE id = ?",
            (iso_utc(now), status, version, int(promoted), reason,
             json.dumps(metrics, default=str), run_id))
        if status in FINISHED:
            conn.executemany(
                "INSERT OR IGNORE INTO training_marks (kind, project, row_key) VALUES (?, ?, ?)",
                [(kind, p, k) for p, k in marks])


def run_history(store: StateStore, since: datetime | None = None) -> list[dict[str, Any]]:
    """Training runs, oldest first (for the summary and ``status``)."""
    sql = ("SELECT id, kind, started_at, finished_at, status, version, promoted, reason, "
           "new_labels, metrics FROM training_runs")
    params: tuple[Any, ...] = ()
    if since is not None:
        sql += " WHERE started_at >= ?"
        params = (iso_utc(since),)
    out = []
    for r in store.conn.execute(sql + " ORDER BY id", params):
        out.append({"id": r[0], "kind": r[1], "started_at": r[2], "finished_at": r[3],
                    "status": r[4], "version": r[5], "promoted": bool(r[6]), "reason": r[7],
                    "new_labels": r[8], "metrics": json.loads(r[9] or "{}")})
    return out
