"""When to retrain: a pure rule over durable counters, and the run history it reads.

"New labels since the last training" is counted in the state DB: a label is a validated,
usable row (no errors, not waiting for its crop) that is not yet in ``training_marks`` for the
model kind; a finished training marks every label it could see.  So the count never depends on
``count % N`` and survives restarts, rule bumps and re-validation.  Rows written by
``trainingd backfill`` (a ``_legacy_`` group id) count only for projects whose
``backfill_counts_toward_retrain`` is true; they are trained on either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from daemon.settings import Settings, TrainingSettings
from daemon.store.db import StateStore
from daemon.store.training import TrainingRun
from daemon.timeparse import parse_timestamp

Kind = Literal["ranker", "crop"]
KINDS: tuple[Kind, ...] = ("ranker", "crop")



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
    for part in store.training.new_labels(kind):
        cfg = settings.projects.get(part.project)
        if part.backfilled and not (cfg is not None and cfg.backfill_counts_toward_retrain):
            continue
        total += part.count
    return total


def label_keys(store: StateStore, kind: Kind) -> list[tuple[str, str]]:
    """Every label a training started now can see (marked once the training finishes)."""
    return store.training.label_keys(kind)


def _parsed(value: str | None) -> datetime | None:
    return parse_timestamp(value) if value else None


def retrain_decision(store: StateStore, settings: Settings, kind: Kind,
                     now: datetime) -> RetrainDecision:
    """Whether ``kind`` is due for training now (the scheduler's and triggers' question)."""
    return decide(count_new_labels(store, settings, kind),
                  _parsed(store.training.last_started(kind)),
                  _parsed(store.training.last_finished(kind)),
                  now, settings.training)


def record_run_start(store: StateStore, kind: Kind, now: datetime, new_labels: int, *,
                     abandon_after: timedelta | None = None) -> int:
    """Record a run as ``running``.  With ``abandon_after``, earlier runs of ``kind`` still
    ``running`` that started longer ago than that (a run is killed at its timeout, so no live
    run is that old) are closed as ``abandoned``: a kill -9 or a power cut left them open."""
    return store.training.start_run(
        kind, now, new_labels,
        abandoned_before=None if abandon_after is None else now - abandon_after,
        abandon_reason="no end was recorded within training.timeout_minutes: the process was "
                       "killed (kill -9, OOM, power cut)")


def record_run_end(store: StateStore, run_id: int, *, status: str, now: datetime,
                   version: int | None, promoted: bool, reason: str, metrics: dict[str, Any],
                   kind: Kind, marks: Iterable[tuple[str, str]] = ()) -> None:
    """Close the run; a finished run marks its labels in the same transaction."""
    store.training.end_run(run_id, kind=kind, status=status, now=now, version=version,
                           promoted=promoted, reason=reason, metrics=metrics, marks=marks)


def run_history(store: StateStore, since: datetime | None = None) -> list[TrainingRun]:
    """Training runs, oldest first (for the summary and ``status``)."""
    return store.training.runs(since)
