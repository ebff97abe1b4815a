"""``trainingd run``: startup -> loop -> shutdown, as a systemd ``Type=notify`` service.

Threads: the watchdog observer and APScheduler produce tasks; two lanes (:mod:`daemon.lanes`)
each run one worker thread: the fast lane validates rows, sidecars and images and runs
triggers, the heavy lane embeds (the GPU's one user), trains, backfills and writes summaries,
so a commit never waits behind an embedding batch or a training run.  Both write the state DB
through the one store, whose transaction lock makes them take turns (transactions are short).
The main thread handles signals (handlers only set flags), checks health, pings the systemd
watchdog and writes the heartbeat file that ``trainingd status`` reads.  The main thread never
waits on a lane, so it can always act.

Health means *work is moving*, not "threads are alive": each lane bumps its own progress stamp
(:mod:`daemon.health`); a task without progress for ``service.stall_seconds`` in either lane is
a stall: the pings stop, the stall is logged with the lane's name and stack, the heartbeat says
``stalled`` and the process exits 70 so systemd restarts it.  If the observer or a lane's
thread dies, the same.  A pause (trigger) holds both lanes' tasks, except control tasks.

SIGTERM/SIGINT: the current unit of work in each lane may finish within
``service.shutdown_budget_seconds`` (heavy tasks poll ``should_stop`` between chunks); after
that the process ends with ``os._exit`` whatever a lane is doing (blocked in a system call,
waiting on a decode thread): every write is transactional, so SQLite rolls back anything
unfinished, never half-written.  A second SIGINT exits at once.  SIGHUP reloads the
configuration; a reload that fails in any way is logged and the old configuration kept.

A task that fails because of its environment (disk full, read-only data folder, a folder that
vanished) is retried with a capped exponential backoff per task key, kept in the queue; a
trigger is finished as failed after ``service.trigger_attempts`` such tries, or at once when it
fails for any other reason.  Validation of other keys goes on meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import structlog

from daemon import __version__
from daemon.errors import ConfigError, StoreError
from daemon.fsutil import remove_abandoned_temps
from daemon.health import Progress, describe_stall
from daemon.heartbeat import heartbeat_path as heartbeat_path  # re-exported (tests, status)
from daemon.heartbeat import live_facts, status_line, write_heartbeat
from daemon.heartbeat import read_heartbeat as read_heartbeat
from daemon.jobs import Jobs
from daemon.lane_loop import reason_of, work
from daemon.lanes import Lanes, LaneWorker, ThreadProgress
from daemon.logs import PrerenderedLine
from daemon.pipeline import Pipeline, image_roots_of
from daemon.sdnotify import Notifier
from daemon.settings import Settings, changed_sections, check_input_folders, load_settings
from daemon.store.db import StateStore
from daemon.tasks import Lane, TaskKind
from daemon.triggers import TriggerBox
from daemon.watcher import Watcher, WatchPlan
from daemon.workqueue import Backoff, Task

log = structlog.get_logger("service")
#: written from the SIGINT handler, where logging could deadlock (see daemon.logs)
_SECOND_SIGINT = PrerenderedLine("service.second_sigint", "warning", "service", exit_code=130,
                                 action="exiting now, without waiting for the current task")

EXIT_HEALTH = 70  # EX_SOFTWARE: a thread died or work stalled; systemd restarts us


class Service:
    def __init__(self, settings: Settings, *, config_path: Path | None = None,
                 run_seconds: float | None = None, embedder: Any = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.config_path = config_path
        self.run_seconds = run_seconds
        self.embedder = embedder
        self.clock = clock
        self.notifier = Notifier()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.stop_requested = False
        self.reload_requested = False
        self.sigints = 0
        #: reloaded settings each lane applies between its tasks (lane -> settings)
        self.pending_settings: dict[Lane, Settings] = {}
        self.tasks_done = 0
        self.tasks_failed = 0
        self._count_lock = threading.Lock()
        self.fatal: BaseException | None = None
        self.started_at = datetime.now(UTC)
        self.lanes = Lanes(settings.watcher.settle_seconds, settings.watcher.max_wait_seconds)
        #: what the pipeline beats: routed to the stamp of the lane whose thread beats
        self.progress = ThreadProgress(Progress())
        self.stalled_lane: LaneWorker | None = None
        svc = settings.service
        self.backoff = Backoff(svc.retry_base_seconds, svc.retry_max_seconds)
        self.stalled = False
        #: how the process ends when the worker cannot be joined (a seam for in-process tests)
        self.hard_exit: Callable[[int], NoReturn] = os._exit
        self._old_handlers: dict[int, Any] = {}
        from daemon.metrics import Listener, Metrics

        # before the worker starts: it reports every finished task here (Documents/METRICS.md)
        self.metrics = Metrics(lambda: self.settings, partial(live_facts, self),
                               started_at=self.started_at)
        self.listener: Listener | None = None

    # -- what the demo and tests read of a running service ---------------------------------------

    @property
    def queue(self) -> Lanes:
        """Every lane's queue as one (depth, pending kinds, last event)."""
        return self.lanes

    @property
    def current(self) -> Task | None:
        """The task that has run longest of those running now, in any lane."""
        busy = self.lanes.busiest()
        return busy.current if busy else None

    @property
    def deferred(self) -> int:
        """Tasks held by a pause, in all lanes."""
        return self.lanes.held()

    # -- signals (handlers only set flags) ------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints >= 2:
                _SECOND_SIGINT.write()  # pre-rendered JSON, one os.write: no lock taken here
                os._exit(130)
        self.stop_requested = True
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        # a typo'd decisions folder or image root: exit 78 (unless paths.create_missing)
        for created in check_input_folders(s):
            log.info("service.folder_created", folder=str(created), key="paths.create_missing")
        for folder in (s.triggers_dir, s.summaries_dir):  # our own outputs
            folder.mkdir(parents=True, exist_ok=True)
        # what a run killed mid-write left (a half plot, a half heartbeat): never read, so drop
        swept = sum(remove_abandoned_temps(f) for f in (
            s.summaries_dir, s.state_db.parent, s.triggers_dir / "done", s.triggers_dir / "failed"))
        if swept:
            log.info("service.abandoned_temps_removed", count=swept)
        # quick_check; a damaged state DB is moved aside and rebuilt; applies migrations
        self.store = StateStore.open_checked(s.state_db, rebuild=self._rebuild_state)
        self.pipeline = Pipeline(s, self.store, self.lanes.put, clock=self.clock,
                                 embedder=self.embedder, progress=self.progress)
        self.box = TriggerBox(s.triggers_dir, roots=self._allowed_roots,
                              projects=self.pipeline.projects)
        for signum, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                                (signal.SIGHUP, self._on_hup)):
            self._old_handlers[signum] = signal.signal(signum, handler)
        # the initial reconcile is the fast lane's first task: the main thread stays responsive
        self.lanes.put(Task(TaskKind.RECONCILE, urgent=True))
        self.watcher = self._start_watcher(s)
        self.jobs = Jobs(self.lanes.put)
        self.jobs.start(s)
        for lane in self.lanes:
            lane.start(partial(work, self))
        if s.metrics.listen:  # after every thread it reports on exists
            from daemon.metrics import start_listener

            self.listener = start_listener(self.metrics, s.metrics.listen)
        log.info("service.started", pid=os.getpid(), version=__version__,
                 config=str(self.config_path) if self.config_path else "embedded defaults",
                 data_root=str(s.data_root), projects=sorted(self.pipeline.projects()),
                 watchdog_seconds=self.notifier.watchdog_seconds)
        self.notifier.ready(status_line(self))
        code = self._loop()
        return self._shutdown(code)

    def _rebuild_state(self, store: StateStore) -> dict[str, int]:
        from daemon.store.rebuild import rebuild_derived

        return rebuild_derived(store, self.settings)

    def _heal_state_db(self) -> bool:
        """The state DB was deleted, replaced or found damaged: heal it, then validate all.
        False when it cannot be reopened (disk, permissions): systemd restarts us."""
        problem = self.store.check_file()
        if problem is None:
            return True
        try:
            self.store.heal(problem, rebuild=self._rebuild_state)
        except StoreError as exc:
            log.error("service.state_db_unusable", problem=problem, error=str(exc),
                      action="exiting so systemd restarts us")
            return False
        self.lanes.put(Task(TaskKind.RECONCILE, urgent=True))
        return True

    def _allowed_roots(self) -> list[Path]:
        return [self.settings.data_root, *image_roots_of(self.settings)]

    def _start_watcher(self, s: Settings) -> Watcher:
        plan = WatchPlan(s.decisions_dir, s.triggers_dir, image_roots_of(s))
        watcher = Watcher(plan, self.lanes.put, observer=s.watcher.observer,
                          polling_interval_seconds=s.watcher.polling_interval_seconds)
        watcher.start()
        return watcher

    def _loop(self) -> int:
        tick = 0.5
        if self.notifier.watchdog_seconds:
            tick = min(tick, self.notifier.watchdog_seconds)
        next_beat = 0.0
        deadline = time.monotonic() + self.run_seconds if self.run_seconds else None
        while not self.stop_requested:
            self.wake.wait(tick)
            self.wake.clear()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            if not self.watcher.is_alive():
                log.error("service.observer_died", action="exiting so systemd restarts us")
                return EXIT_HEALTH
            dead = next((lane for lane in self.lanes if not lane.is_alive()), None)
            if dead is not None:
                log.error("service.worker_died", lane=dead.name, error=repr(self.fatal),
                          action="exiting so systemd restarts us")
                return EXIT_HEALTH
            if not self._heal_state_db():
                return EXIT_HEALTH
            stalled = next((lane for lane in self.lanes if lane.current is not None
                            and lane.progress.stalled(self.settings.service.stall_seconds)),
                           None)
            if stalled is not None:
                self._on_stall(stalled)
                return EXIT_HEALTH
            self.notifier.watchdog()  # only while work moves
            now = time.monotonic()
            if now >= next_beat:
                if self.box.results_due():
                    # a trigger result that failed to write (disk full) is retried when due,
                    # not only when the next trigger file happens to arrive
                    self.lanes.put(Task(TaskKind.TRIGGERS, urgent=True))
                write_heartbeat(self, "paused" if self.pipeline.paused else "running")
                self.metrics.write_textfile()
                self.notifier.status(status_line(self))
                next_beat = now + self.settings.service.heartbeat_seconds
            if deadline is not None and now >= deadline:
                log.info("service.run_time_elapsed", seconds=self.run_seconds)
                break
        return 0

    def _on_stall(self, lane: LaneWorker) -> None:
        """No progress in ``lane`` for ``stall_seconds``: say which lane, what it was doing,
        where it is stuck, and let systemd restart us (the pings have already stopped)."""
        self.stalled, self.stalled_lane = True, lane
        facts = describe_stall(lane.current, lane.progress, lane.thread, lane.current_since)
        log.error("service.worker_stalled", lane=lane.name,
                  stall_seconds=self.settings.service.stall_seconds,
                  action="no more watchdog pings; exiting 70 so systemd restarts us", **facts)
        write_heartbeat(self, "stalled")
        self.notifier.status(f"stalled: {lane.name} lane: {facts['task']} without progress "
                             f"for {facts['seconds_since_progress']} s")

    def _reload(self) -> None:
        """Load, start the new watcher, register the jobs, and only then let go of the old
        ones: any failure on the way (not only a ConfigError) keeps the old configuration.
        Only what changed is redone: the watcher when watched folders changed, the jobs when
        schedules changed, the model only when its own settings changed (the pipeline)."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
            changed = changed_sections(self.settings, new)
            check_input_folders(new)
            watcher = (self._start_watcher(new) if _watch_plan(new) != _watch_plan(self.settings)
                       else None)
        except Exception as exc:  # RecursionError from a deep TOML, OSError, ... never fatal
            log.error("service.reload_failed", error=reason_of(exc, 2000),
                      kind="config" if isinstance(exc, ConfigError) else "unexpected",
                      action="keeping the old config")
            self.notifier.ready(status_line(self))
            return
        jobs_changed = _schedules(new) != _schedules(self.settings)
        try:
            if jobs_changed:
                self.jobs.register(new)
        except Exception as exc:
            if watcher is not None:
                watcher.stop(timeout=2.0)
            log.error("service.reload_failed", error=reason_of(exc, 2000), kind="unexpected",
                      action="keeping the old config")
            self._register_jobs_again()
            self.notifier.ready(status_line(self))
            return
        if watcher is not None:
            self.watcher.stop()
            self.watcher = watcher
        self.settings = new
        if changed:
            # each lane applies it between its tasks; the pipeline's own part once, on the
            # fast lane (the heavy lane only picks up the model settings it owns)
            self.pending_settings = {lane: new for lane in Lane}
            self.lanes.put(Task(TaskKind.RECONCILE, urgent=True))
        log.info("service.reloaded", config=str(self.config_path), changed=changed,
                 watcher_restarted=watcher is not None, jobs_registered=jobs_changed)
        self.notifier.ready(status_line(self))

    def _register_jobs_again(self) -> None:
        try:
            self.jobs.register(self.settings)
        except Exception:  # the old settings registered once; log, and let the tick go on
            log.exception("service.jobs_restore_failed")

    def _shutdown(self, code: int) -> int:
        """Stop within the budget whatever the lanes do: join them for at most the budget
        (not at all after a stall), then end the process hard if one is still inside a task."""
        started = time.monotonic()
        budget = self.settings.service.shutdown_budget_seconds
        busy = self.lanes.busiest()
        log.info("service.stopping", budget_seconds=budget, queue_depth=self.lanes.depth(),
                 current_task=busy.current.kind if busy and busy.current else None,
                 lanes={lane.name: lane.current.kind if lane.current else None
                        for lane in self.lanes}, stalled=self.stalled)
        self.notifier.stopping()
        self.stopping.set()
        for stop in (self.jobs.stop, lambda: self.watcher.stop(timeout=2.0)):
            try:
                stop()
            except Exception:  # a producer that fails to stop must not keep us running
                log.exception("service.stop_step_failed")
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.join(0.0 if self.stalled else
                                 max(0.0, budget - (time.monotonic() - started)))
        if self.listener is not None:
            self.listener.stop()
        final = "stalled" if self.stalled else "stopped"
        left = [lane for lane in self.lanes if lane.is_alive()]
        # a lane still loading the model writes nothing: leaving it behind is a clean stop
        clean = {lane.name: note for lane in left
                 if (note := lane.progress.abandonable()) is not None}
        if left:
            if len(clean) < len(left):
                code = code or 1
            for name, note in clean.items():
                log.info("service.step_left_behind", lane=name, step=note,
                         action="nothing was being written; it runs again at the next start")
            # SQLite rolls back the open transaction when the process exits: nothing half-done
            if not self.stalled:
                for lane in (lane for lane in left if lane.name not in clean):
                    log.error("service.shutdown_budget_exceeded", budget_seconds=budget,
                              lane=lane.name, action="exiting without the worker",
                              **describe_stall(lane.current, lane.progress, lane.thread,
                                               lane.current_since))
            write_heartbeat(self, final)
            log.info("service.stopped", exit_code=code, tasks_done=self.tasks_done,
                     tasks_failed=self.tasks_failed, worker_abandoned=True,
                     lanes_abandoned=[lane.name for lane in left])
            self._restore_signals()
            # a normal exit would wait for the lanes and their decode threads, for ever if one
            # is blocked: flush what we said, then leave without them
            _flush_logs()
            self.hard_exit(code)
        self.store.close()
        write_heartbeat(self, final)
        log.info("service.stopped", exit_code=code, tasks_done=self.tasks_done,
                 tasks_failed=self.tasks_failed)
        self._restore_signals()
        return code

    def _restore_signals(self) -> None:
        """Leave the process as we found it (an in-process run in a test or a demo)."""
        for signum, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

def _watch_plan(s: Settings) -> tuple[Any, ...]:
    """What the watcher depends on: a reload restarts it only when this changed."""
    return (s.decisions_dir, s.triggers_dir, sorted(image_roots_of(s).items()), s.watcher.observer,
            s.watcher.polling_interval_seconds)


def _schedules(s: Settings) -> tuple[Any, ...]:
    """What the jobs depend on: a reload registers them again only when this changed."""
    return (s.service.daily_summary_time, s.service.timezone, s.service.retrain_check_minutes,
            s.watcher.reconcile_minutes)


def _flush_logs() -> None:
    for flushable in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            flushable.flush()
