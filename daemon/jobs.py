"""APScheduler 3.x wiring.  Jobs only enqueue tasks; the worker does the work.

In-memory job store, jobs registered from config at start (and again on SIGHUP), each with
``coalesce=True`` and ``max_instances=1`` so a sleeping laptop or a long task never replays a
backlog of runs.  Days the daemon was down for are not a backlog to replay but data to write:
:meth:`Jobs.start` enqueues one catch-up summary task (``summary.backfill_days``).  Anything
that must survive a restart (last training, label counters, the token ledger) lives in the
state DB, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from daemon.settings import Settings
from daemon.tasks import TaskKind
from daemon.workqueue import Task

log = structlog.get_logger("jobs")


class Jobs:
    def __init__(self, put: Callable[[Task], None]) -> None:
        self.put = put
        self.scheduler: Any = None

    def start(self, settings: Settings) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(timezone="UTC", daemon=True)
        self.scheduler.start()
        self.register(settings)
        # a summary missed while the daemon was down past its hour is written now, from the
        # data (only at start: a SIGHUP re-registers the jobs but misses no day)
        if settings.summary.backfill_days > 0:
            self.put(Task(TaskKind.SUMMARY, args=(("catch_up", True),), urgent=True))

    def register(self, settings: Settings) -> None:
        """(Re)register every job from ``settings``."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        assert self.scheduler is not None
        self.scheduler.remove_all_jobs()
        svc, watch = settings.service, settings.watcher
        hour, minute = (int(x) for x in svc.daily_summary_time.split(":"))
        common = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600}
        self.scheduler.add_job(self._enqueue, CronTrigger(hour=hour, minute=minute,
                                                          timezone=svc.timezone),
                               args=[TaskKind.SUMMARY], id="daily_summary", **common)
        self.scheduler.add_job(self._enqueue, IntervalTrigger(minutes=watch.reconcile_minutes),
                               args=[TaskKind.RECONCILE], id="reconcile", **common)
        self.scheduler.add_job(self._enqueue,
                               IntervalTrigger(minutes=svc.retrain_check_minutes),
                               args=[TaskKind.RETRAIN_CHECK], id="retrain_check", **common)
        log.info("jobs.registered", jobs=[
            {"id": j.id, "next_run": str(getattr(j, "next_run_time", None))}
            for j in self.scheduler.get_jobs()])

    def _enqueue(self, kind: TaskKind) -> None:
        self.put(Task(kind, urgent=True))

    def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
