"""The service's Prometheus metrics: one dedicated registry, the task accounting, the health
verdict and the node_exporter textfile.

Why a room of its own: the service only hands over facts (a task finished; what the threads
and the queue look like now) and this room decides what they mean as metrics.  A dedicated
``CollectorRegistry`` (never the global one) keeps tests and in-process runs apart.

Three kinds of figures:

- counted in process as the worker finishes tasks: rows validated, tasks and their duration
  per lane and kind, images embedded, embed rate of the last batch run;
- read at scrape time from live facts the service lends (queue depth, current task, threads,
  health): nothing here waits on the worker;
- read at scrape time from disk through :mod:`daemon.metrics.figures` (issues, backlog,
  training runs, champions, last successes), cached for ``metrics.cache_seconds``.

Nothing here may raise into the worker or the main loop: a failure is a log line.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.fsutil import atomic_write_bytes
from daemon.metrics.figures import CachedFigures, StateFigures
from daemon.settings import Settings

log = structlog.get_logger("metrics")

#: task durations span milliseconds (one sidecar) to an hour (a training run)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: task kinds whose result lists per-project validation results, and under which key
_VALIDATION_RESULTS = {"validate": "projects", "reconcile": "validated"}
STAGES = ("validation", "embed", "summary")


def lane_of(kind: str) -> str:
    """The lane a task kind runs in (``fast`` or ``heavy``), as :mod:`daemon.tasks` decides:
    the ``lane`` label of every metric comes from here."""
    from daemon.tasks import lane_for

    return str(lane_for(kind))


@dataclass(frozen=True, slots=True)
class LiveFacts:
    """What the service looks like right now, lent by the service at scrape time."""

    queue_by_kind: Mapping[str, int]
    current_kind: str | None
    current_seconds: float | None
    quiet_seconds: float
    no_progress: bool  # the current task has been quiet longer than the health limit
    observer_alive: bool
    worker_alive: bool
    stalled: bool  # the service declared a stall (it is about to exit 70)
    state_db_problem: str | None
    paused: bool
    embedding_disabled: bool
    #: per lane: seconds since its last progress (0 while idle), and the task it runs now
    quiet_by_lane: Mapping[str, float] = field(default_factory=dict)
    running_by_lane: Mapping[str, tuple[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    checks: dict[str, str]  # check -> "ok"-ish text, or what is wrong
    failing: tuple[str, ...] = ()
    reasons: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unhealthy", "checks": self.checks,
                "reasons": self.reasons, "version": __version__}


def judge_health(facts: LiveFacts, figures: StateFigures, quiet_limit: float) -> Health:
    """Healthy = observer alive, worker alive and making progress, state DB usable."""
    checks: dict[str, str] = {}
    failing: list[str] = []

    def check(name: str, good: bool, ok_text: str, bad_text: str) -> None:
        checks[name] = ok_text if good else bad_text
        if not good:
            failing.append(name)

    check("observer", facts.observer_alive, "alive", "the file watcher thread died")
    check("worker", facts.worker_alive, "alive", "the worker thread died")
    if facts.stalled:
        check("progress", False, "", "stalled: the service is exiting 70 for a restart")
    else:
        check("progress", not facts.no_progress,
              f"moving ({facts.current_kind or 'idle'})",
              f"task {facts.current_kind} without progress for "
              f"{facts.quiet_seconds:.0f} s (limit {quiet_limit:g} s)")
    db_problem = facts.state_db_problem or (None if figures.read_ok else figures.error)
    check("state_db", db_problem is None, "ok", f"{db_problem}")
    return Health(not failing, checks, tuple(failing), [f"{n}: {checks[n]}" for n in failing])


class _LiveCollector(Collector):
    """Scrape-time figures: live facts from the service, state figures from disk."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        facts, figures, health = self.m.snapshot()
        yield from _live_families(facts, health)
        yield from _state_families(figures, self.m)
        g = GaugeMetricFamily("trainingd_metrics_generated_timestamp_seconds",
                              "When these figures were generated (unix time): a textfile whose "
                              "value stops moving belongs to a stopped daemon")
        g.add_metric([], time.time())
        yield g


def _live_families(facts: LiveFacts, health: Health) -> Iterator[Metric]:
    queue = GaugeMetricFamily("trainingd_queue_depth", "Tasks waiting, per lane and task kind",
                              labels=["lane", "kind"])
    for kind, n in sorted(facts.queue_by_kind.items()):
        queue.add_metric([lane_of(kind), kind], n)
    yield queue
    running = GaugeMetricFamily("trainingd_task_running_seconds",
                                "How long the task running now has run, per lane and kind",
                                labels=["lane", "kind"])
    if facts.running_by_lane:
        for lane, (kind, seconds) in sorted(facts.running_by_lane.items()):
            running.add_metric([lane, kind], seconds)
    elif facts.current_kind is not None and facts.current_seconds is not None:
        running.add_metric([lane_of(facts.current_kind), facts.current_kind],
                           facts.current_seconds)
    yield running
    quiet = GaugeMetricFamily("trainingd_worker_seconds_since_progress",
                              "Seconds since the lane's worker last reported progress",
                              labels=["lane"])
    for lane, seconds in sorted((facts.quiet_by_lane or {"fast": facts.quiet_seconds}).items()):
        quiet.add_metric([lane], seconds)
    yield quiet
    healthy = GaugeMetricFamily("trainingd_healthy", "1 when /healthz would answer 200")
    healthy.add_metric([], 1.0 if health.ok else 0.0)
    yield healthy
    each = GaugeMetricFamily("trainingd_health_check_ok", "Each health check, 1 = ok",
                             labels=["check"])
    for name in health.checks:
        each.add_metric([name], 0.0 if name in health.failing else 1.0)
    yield each
    for name, value, text in (
            ("trainingd_paused", facts.paused, "1 while work is paused by a trigger"),
            ("trainingd_embedding_disabled", facts.embedding_disabled,
             "1 while the embedding stage is disabled (model missing or failed)")):
        g = GaugeMetricFamily(name, text)
        g.add_metric([], 1.0 if value else 0.0)
        yield g


def _state_families(f: StateFigures, m: Metrics) -> Iterator[Metric]:
    up = GaugeMetricFamily("trainingd_state_db_up",
                           "1 when the state DB could be read for these figures")
    up.add_metric([], 1.0 if f.read_ok else 0.0)
    yield up
    issues = GaugeMetricFamily("trainingd_issues", "Open issues, by project, code and severity",
                               labels=["project", "code", "severity"])
    for (project, code, severity), n in sorted(f.issues.items()):
        issues.add_metric([project, code, severity], n)
    yield issues
    for name, text, values in (
            ("trainingd_rows_known", "Source rows the state DB holds, per project", f.rows_known),
            ("trainingd_images_present", "Image files present in the image roots, per project",
             f.images_present),
            ("trainingd_embedding_backlog_images",
             "Present images still waiting for a vector of the current embedder, per project",
             f.embed_backlog)):
        g = GaugeMetricFamily(name, text, labels=["project"])
        for project, n in sorted(values.items()):
            g.add_metric([project], n)
        yield g
    runs = CounterMetricFamily("trainingd_training_runs", "Finished training runs, by model "
                               "and outcome (from the state DB)", labels=["model", "outcome"])
    for (model, outcome), n in sorted(f.training_runs.items()):
        runs.add_metric([model, outcome], n)
    yield runs
    champions = {
        "version": GaugeMetricFamily("trainingd_champion_version",
                                     "Version of the promoted model", labels=["model"]),
        "score": GaugeMetricFamily("trainingd_champion_score", "The champion's holdout score "
                                   "(ranker: top-1 agreement; crop: mean IoU)", labels=["model"]),
        "baseline": GaugeMetricFamily("trainingd_champion_baseline_score",
                                      "The baseline's score on the champion's holdout",
                                      labels=["model"]),
        "n": GaugeMetricFamily("trainingd_champion_holdout_size",
                               "Holdout examples behind the champion's figures", labels=["model"]),
    }
    for model, c in sorted(f.champions.items()):
        champions["version"].add_metric([model], c.version)
        for key, value in (("score", c.score), ("baseline", c.baseline), ("n", c.holdout_n)):
            if value is not None:
                champions[key].add_metric([model], value)
    yield from champions.values()
    last = dict(f.last_success)
    for stage, stamp in m.stamps.items():
        last[stage] = max(stamp, last.get(stage, 0.0))
    when = GaugeMetricFamily("trainingd_last_success_timestamp_seconds",
                             "Unix time of the last successful validation pass, embedding run "
                             "and daily summary", labels=["stage"])
    since = GaugeMetricFamily("trainingd_seconds_since_last_success",
                              "Seconds since the last successful validation pass, embedding "
                              "run and daily summary (absent until the first)", labels=["stage"])
    now = time.time()
    for stage in STAGES:
        if stage in last:
            when.add_metric([stage], last[stage])
            since.add_metric([stage], max(0.0, now - last[stage]))
    yield when
    yield since


class Metrics:
    """The registry and what feeds it.  ``live(quiet_limit)`` is the service's seam."""

    def __init__(self, settings: Callable[[], Settings], live: Callable[[float], LiveFacts],
                 *, started_at: datetime) -> None:
        self.settings = settings
        self.live = live
        self.figures = CachedFigures(settings)
        self.registry = CollectorRegistry()
        #: stage -> unix time, for successes the state DB does not record (an embed run
        #: with nothing left to embed)
        self.stamps: dict[str, float] = {}
        self._textfile_error: str | None = None
        r = self.registry
        self.rows_validated = Counter(
            "trainingd_rows_validated", "Source rows checked by validation passes of the "
            "service, per project", ["project"], registry=r)
        self.tasks = Counter("trainingd_tasks", "Tasks finished, per lane, kind and outcome",
                             ["lane", "kind", "outcome"], registry=r)
        self.duration = Histogram("trainingd_task_duration_seconds",
                                  "Time a task took, per lane and kind", ["lane", "kind"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.embedded = Counter("trainingd_images_embedded",
                                "Images run through the embedding model", registry=r)
        self.embed_failed = Counter("trainingd_images_embed_failed",
                                    "Images the embedding stage could not use (issue records)",
                                    registry=r)
        self.embed_rate = Gauge("trainingd_embed_images_per_second",
                                "Images per second of the last embedding run that embedded any "
                                "(rate(trainingd_images_embedded_total[5m]) for the mean)",
                                registry=r)
        Gauge("trainingd_process_start_time_seconds", "When the service started (unix time)",
              registry=r).set(started_at.timestamp())
        Gauge("trainingd_build_info", "Version of trainingd and Python (always 1)",
              ["version", "python"], registry=r).labels(
                  __version__, platform.python_version()).set(1)
        r.register(_LiveCollector(self))

    # -- feeding --------------------------------------------------------------------------------

    def task_finished(self, kind: str, project: str | None, ok: bool,
                      result: Mapping[str, Any], seconds: float) -> None:
        """Account one finished task.  Never raises (it runs on the worker)."""
        try:
            self._account(kind, ok, result, seconds)
        except Exception as exc:  # a strange result shape is not worth a worker
            log.warning("metrics.task_not_counted", kind=kind, project=project,
                        error=f"{type(exc).__name__}: {exc}")

    def _account(self, kind: str, ok: bool, result: Mapping[str, Any], seconds: float) -> None:
        lane = lane_of(kind)
        self.tasks.labels(lane, kind, "ok" if ok else "failed").inc()
        self.duration.labels(lane, kind).observe(max(0.0, seconds))
        if not ok:
            return
        key = _VALIDATION_RESULTS.get(kind)
        for item in result.get(key, ()) if key else ():
            if isinstance(item, Mapping) and item.get("mode") != "skipped":
                checked = int(item.get("rows_checked") or 0)
                self.rows_validated.labels(str(item.get("project"))).inc(max(0, checked))
        if kind == "embed" and "error" not in result and not result.get("disabled"):
            embedded = int(result.get("embedded") or 0)
            self.embedded.inc(max(0, embedded))
            self.embed_failed.inc(max(0, int(result.get("failed") or 0)))
            took = float(result.get("duration_s") or 0.0)
            if embedded > 0 and took > 0:
                self.embed_rate.set(embedded / took)
            if not result.get("stopped"):
                self.stamps["embed"] = time.time()

    # -- reading --------------------------------------------------------------------------------

    def quiet_limit(self) -> float:
        s = self.settings()
        limit = s.metrics.healthz_quiet_seconds
        return float(limit) if limit is not None else s.service.stall_seconds / 2

    def snapshot(self) -> tuple[LiveFacts, StateFigures, Health]:
        limit = self.quiet_limit()
        facts = self.live(limit)
        figures = self.figures.get()
        return facts, figures, judge_health(facts, figures, limit)

    def health(self) -> Health:
        return self.snapshot()[2]

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))

    # -- the textfile ---------------------------------------------------------------------------

    def write_textfile(self) -> None:
        """Rewrite ``metrics.textfile`` atomically (umask mode); a failure is logged once per
        change of reason, never raised.  The folder is node_exporter's: never created."""
        target = self.settings().metrics.textfile
        if target is None:
            return
        path = self.settings().resolve(target)
        error: str | None = None
        try:
            if not path.parent.is_dir():
                error = f"folder {path.parent} does not exist (node_exporter's textfile folder)"
            else:
                atomic_write_bytes(path, self.exposition())
        except Exception as exc:  # disk full, read-only, permissions: next tick tries again
            error = f"{type(exc).__name__}: {exc}"
        if error != self._textfile_error:
            if error is not None:
                log.error("metrics.textfile_failed", path=str(path), error=error,
                          action="retried every heartbeat")
            elif self._textfile_error is not None:
                log.info("metrics.textfile_recovered", path=str(path))
            self._textfile_error = error
