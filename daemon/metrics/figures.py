"""What the state DB, the model registry and the summaries folder say, read at scrape time.

Why a separate read: the worker is the state DB's only writer and must never wait for a scrape,
so these figures come through a read-only connection of their own
(``StateStore(read_only=True)``: invisible, never a lock the writer waits on), opened per
refresh and closed again (a healed or replaced state DB is simply the next file opened).  A
short cache (``metrics.cache_seconds``) keeps a busy Prometheus, the textfile tick and
``/healthz`` from reading more than once per window.

This room only reads and never raises: a figure that cannot be read is left out, and the
failure is one ``trainingd_state_db_up 0`` plus one log line per change of state.
Labels stay bounded: project, issue code, severity, model kind, run status; never a path or a
group_id.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.store.embeddings import META_EMBEDDER
from daemon.timeparse import parse_timestamp

log = structlog.get_logger("metrics")

MODEL_KINDS = ("ranker", "crop")


@dataclass(frozen=True, slots=True)
class Champion:
    """The promoted model of one kind, with the figures its holdout gave."""

    version: int
    score: float | None
    baseline: float | None
    holdout_n: int | None


@dataclass(frozen=True, slots=True)
class StateFigures:
    """One consistent read of everything the collector shows from disk."""

    read_ok: bool
    error: str | None = None
    #: (project, code, severity) -> open issues
    issues: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rows_known: dict[str, int] = field(default_factory=dict)
    images_present: dict[str, int] = field(default_factory=dict)
    embed_backlog: dict[str, int] = field(default_factory=dict)
    #: (model kind, status) -> finished training runs
    training_runs: dict[tuple[str, str], int] = field(default_factory=dict)
    champions: dict[str, Champion] = field(default_factory=dict)
    #: stage -> unix time of its last success ("validation", "embed", "summary")
    last_success: dict[str, float] = field(default_factory=dict)


def read_state_figures(settings: Settings) -> StateFigures:
    """Read the state DB (read-only), the registry and the summaries folder.  Never raises."""
    last: dict[str, float] = {}
    summary = _last_summary(settings.summaries_dir)
    if summary is not None:
        last["summary"] = summary
    champions = _champions(settings.models_dir)
    if not settings.state_db.is_file():
        return StateFigures(read_ok=False, error="no state DB yet", champions=champions,
                            last_success=last)
    try:
        store = StateStore(settings.state_db, read_only=True)
    except Exception as exc:  # StoreError, busy: reported as a figure, never raised
        return StateFigures(read_ok=False, error=f"{type(exc).__name__}: {exc}",
                            champions=champions, last_success=last)
    try:
        return _read_store(store, champions, last)
    except (sqlite3.Error, ValueError) as exc:
        return StateFigures(read_ok=False, error=f"{type(exc).__name__}: {exc}",
                            champions=champions, last_success=last)
    finally:
        store.close()


def _read_store(store: StateStore, champions: dict[str, Champion],
                last: dict[str, float]) -> StateFigures:
    issues = store.figures.issue_tally()
    rows = store.figures.rows_per_project()
    _stamp(last, "validation", store.figures.last_validated())
    present = store.images.present_counts()
    backlog = store.embeddings.backlog(store.get_meta(META_EMBEDDER))
    for project in present:
        backlog.setdefault(project, 0)
    _stamp(last, "embed", store.embeddings.last_embedded_at())
    runs = store.training.run_counts()
    return StateFigures(read_ok=True, issues=issues, rows_known=rows, images_present=present,
                        embed_backlog=backlog, training_runs=runs, champions=champions,
                        last_success=last)


def _stamp(into: dict[str, float], stage: str, value: Any) -> None:
    moment = parse_timestamp(value)
    if moment is not None:
        into[stage] = moment.timestamp()


def _last_summary(folder: Path) -> float | None:
    """When the newest daily summary was written (its file's mtime)."""
    try:
        stamps = [p.stat().st_mtime for p in folder.glob("daily_summary_*.json")]
    except OSError:
        return None
    return max(stamps, default=None)


def _champions(models_dir: Path) -> dict[str, Champion]:
    from daemon.training import registry

    out: dict[str, Champion] = {}
    for kind in MODEL_KINDS:
        try:
            version = registry.champion_version(models_dir, kind)
            if version is None:
                continue
            meta = registry.read_metadata(models_dir, kind, version) or {}
            report = meta.get("metrics")
            score = baseline = None
            if isinstance(report, dict):
                try:
                    score = registry.primary_score(kind, report)
                    baseline = registry.baseline_score(kind, report)
                except (KeyError, TypeError, ValueError):
                    pass
            n = meta.get("holdout_size")
            out[kind] = Champion(version, score, baseline, n if isinstance(n, int) else None)
        except OSError:
            continue
    return out


class CachedFigures:
    """``read_state_figures`` at most once per ``cache_seconds``; thread-safe (the HTTP
    threads, the textfile tick and /healthz share it).  A read that fails is logged once per
    change, not once per scrape."""

    def __init__(self, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._figures: StateFigures | None = None
        self._at = 0.0
        self._last_error: str | None = None

    def get(self) -> StateFigures:
        with self._lock:
            now = self.clock()
            settings = self.settings()
            if self._figures is None or now - self._at >= settings.metrics.cache_seconds:
                self._figures = read_state_figures(settings)
                self._at = now
                self._note(self._figures)
            return self._figures

    def _note(self, figures: StateFigures) -> None:
        error = None if figures.read_ok else figures.error
        if error != self._last_error:
            if error is not None:
                log.warning("metrics.state_db_unreadable", error=error,
                            action="state-DB figures left out of /metrics until it reads")
            else:
                log.info("metrics.state_db_readable")
            self._last_error = error
