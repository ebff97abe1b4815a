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
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from daemon import __version__
from daemon.errors import ConfigError, StoreError
from daemon.fsutil import atomic_write_text, remove_abandoned_temps
from daemon.health import Progress, describe_stall
from daemon.jobs import Jobs
from daemon.lanes import Lanes, LaneWorker, ThreadProgress
from daemon.logs import PrerenderedLine
from daemon.pipeline import Pipeline, image_roots_of
from daemon.sdnotify import Notifier
from daemon.settings import Settings, changed_sections, check_input_folders, load_settings
from daemon.store.db import StateStore
from daemon.tasks import CONTROL_KINDS, Failed, Lane, TaskKind, TaskResult, TriggersClaimed
from daemon.timeparse import iso_utc
from daemon.triggers import TriggerBox
from daemon.watcher import Watcher, WatchPlan
from daemon.workqueue import Backoff, Task

if TYPE_CHECKING:
    from daemon.metrics import LiveFacts

log = structlog.get_logger("service")
#: written from the SIGINT handler, where logging could deadlock (see daemon.logs)
_SECOND_SIGINT = PrerenderedLine("service.second_sigint", "warning", "service", exit_code=130,
                                 action="exiting now, without waiting for the current task")

EXIT_HEALTH = 70  # EX_SOFTWARE: a thread died or work stalled; systemd restarts us
#: failures of the environment, not of the input: worth a retry once space or access returns
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.OperationalError)


def heartbeat_path(settings: Settings) -> Path:
    return settings.state_db.parent / "heartbeat.json"


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
        self.metrics = Metrics(lambda: self.settings, self._live_facts,
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
            lane.start(self._work)
        if s.metrics.listen:  # after every thread it reports on exists
            from daemon.metrics import start_listener

            self.listener = start_listener(self.metrics, s.metrics.listen)
        log.info("service.started", pid=os.getpid(), version=__version__,
                 config=str(self.config_path) if self.config_path else "embedded defaults",
                 data_root=str(s.data_root), projects=sorted(self.pipeline.projects()),
                 watchdog_seconds=self.notifier.watchdog_seconds)
        self.notifier.ready(self._status_line())
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
                self._write_heartbeat("paused" if self.pipeline.paused else "running")
                self.metrics.write_textfile()
                self.notifier.status(self._status_line())
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
        self._write_heartbeat("stalled")
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
            log.error("service.reload_failed", error=_reason(exc, 2000),
                      kind="config" if isinstance(exc, ConfigError) else "unexpected",
                      action="keeping the old config")
            self.notifier.ready(self._status_line())
            return
        jobs_changed = _schedules(new) != _schedules(self.settings)
        try:
            if jobs_changed:
                self.jobs.register(new)
        except Exception as exc:
            if watcher is not None:
                watcher.stop(timeout=2.0)
            log.error("service.reload_failed", error=_reason(exc, 2000), kind="unexpected",
                      action="keeping the old config")
            self._register_jobs_again()
            self.notifier.ready(self._status_line())
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
        self.notifier.ready(self._status_line())

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
        if left:
            code = code or 1
            # SQLite rolls back the open transaction when the process exits: nothing half-done
            if not self.stalled:
                for lane in left:
                    log.error("service.shutdown_budget_exceeded", budget_seconds=budget,
                              lane=lane.name, action="exiting without the worker",
                              **describe_stall(lane.current, lane.progress, lane.thread,
                                               lane.current_since))
            self._write_heartbeat(final)
            log.info("service.stopped", exit_code=code, tasks_done=self.tasks_done,
                     tasks_failed=self.tasks_failed, worker_abandoned=True,
                     lanes_abandoned=[lane.name for lane in left])
            self._restore_signals()
            # a normal exit would wait for the lanes and their decode threads, for ever if one
            # is blocked: flush what we said, then leave without them
            _flush_logs()
            self.hard_exit(code)
        self.store.close()
        self._write_heartbeat(final)
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

    # -- the lanes ------------------------------------------------------------------------------

    def _work(self, lane: LaneWorker) -> None:
        """One lane's loop: take its next ready task; hold it while paused (control tasks
        excepted); run it.  Runs on the lane's own thread."""
        self.progress.bind(lane.progress)
        try:
            while not self.stopping.is_set():
                lane.progress.beat("idle")  # waiting for work is not a stall
                task = lane.queue.get(timeout=0.5)
                # after the wait, before the task: a task queued by a reload (its reconcile,
                # the embed that follows) must run under the settings that queued it
                pending = self.pending_settings.pop(lane.lane, None)
                if pending is not None:
                    self.pipeline.reconfigure_lane(lane.lane, pending)
                if task is None or self.stopping.is_set():
                    continue  # a claimed trigger stays in processing/: claimed again at start
                if self.pipeline.paused and task.kind not in CONTROL_KINDS:
                    lane.hold(task)
                    continue
                self._run_task(lane, task)
                if task.kind == TaskKind.RESUME:
                    released = {other.name: other.release() for other in self.lanes}
                    log.info("service.lanes_released", held=released)
        except StoreError as exc:
            self.fatal = exc
            log.exception("worker.state_db_failed", lane=lane.name)
        except BaseException as exc:
            self.fatal = exc
            log.exception("worker.crashed", lane=lane.name)

    def _should_stop(self, lane: LaneWorker, task: Task) -> Callable[[], bool]:
        """What a task polls between chunks: shutdown; for an embed task also a pause (it is
        put back, to be held with the rest).  A training run is not cut short by a pause."""
        if task.kind != TaskKind.EMBED:
            return lane.progress.should_stop(self.stopping.is_set)
        return lane.progress.should_stop(
            lambda: self.stopping.is_set() or self.pipeline.paused)

    def _dispatch(self, lane: LaneWorker, task: Task) -> TaskResult:
        if task.kind == TaskKind.TRIGGERS:  # the service owns the trigger box
            claimed = self.box.claim()
            for each in claimed:
                self.lanes.put(each)
            return TriggersClaimed(len(claimed))
        result = self.pipeline.run(task, self._should_stop(lane, task))
        if task.kind == TaskKind.EMBED and self.pipeline.paused and not self.stopping.is_set():
            self.lanes.put(task)  # cut short by a pause: held, and resumed with the rest
        return result

    def _run_task(self, lane: LaneWorker, task: Task) -> None:
        ok, failure = True, None
        result: TaskResult
        with lane.running(task):
            try:
                result = self._dispatch(lane, task)
            except StoreError:
                raise
            except Exception as exc:
                ok, failure, result = False, exc, Failed(_reason(exc))
                log.exception("worker.task_failed", lane=lane.name, kind=task.kind,
                              project=task.project, reason=_reason(exc))
                self._end_open_transaction()
            elapsed = lane.elapsed()
        if task.kind == TaskKind.TRIGGERS:
            return  # bookkeeping, not work: not counted, not logged per poll
        out = result.to_dict()
        self.metrics.task_finished(task.kind, task.project, ok, out, elapsed)
        with self._count_lock:
            if ok:
                self.tasks_done += 1
            else:
                self.tasks_failed += 1
        if ok:
            attempts = self.backoff.succeeded(task.key)
            if attempts:
                out = {**out, "attempts": attempts + 1}
                log.info("worker.task_recovered", lane=lane.name, kind=task.kind,
                         project=task.project, failures=attempts)
        else:
            if failure is not None and self._retry_later(task, failure):
                return
            attempts = self.backoff.succeeded(task.key)  # given up: forget the key
            if attempts:
                out["attempts"] = attempts
        if task.trigger:
            self._finish_trigger(task, ok, out, elapsed)
        log.info("worker.task_done", lane=lane.name, kind=task.kind, project=task.project,
                 ok=ok, duration_ms=round(elapsed * 1000, 1), queue_depth=lane.queue.depth())

    def _retry_later(self, task: Task, exc: BaseException) -> bool:
        """A failure of the environment: back into the queue after a backoff (a trigger only
        while it has tries left).  Returns whether the task was queued again."""
        if not isinstance(exc, TRANSIENT_ERRORS) or self.stopping.is_set():
            return False
        attempts, delay = self.backoff.failed(task.key)
        if task.trigger and attempts >= self.settings.service.trigger_attempts:
            log.error("worker.task_gave_up", kind=task.kind, project=task.project,
                      trigger=task.trigger, attempts=attempts, reason=_reason(exc))
            return False
        self.lanes.put(task, delay=delay)
        log.warning("worker.task_retry_scheduled", kind=task.kind, project=task.project,
                    trigger=task.trigger, attempt=attempts, delay_seconds=round(delay, 1),
                    reason=_reason(exc))
        return True

    def _finish_trigger(self, task: Task, ok: bool, result: dict[str, Any],
                        elapsed: float) -> None:
        """Write the trigger's result; a failure to write it (disk full) is logged, never
        fatal: the trigger stays in ``processing/`` and is claimed again at the next start."""
        try:
            self.box.finish(Path(task.trigger or ""), ok=ok, result={
                "action": task.kind, "args": dict(task.args), "result": result,
                "duration_seconds": round(elapsed, 3)})
        except Exception as exc:
            log.error("worker.trigger_result_failed", trigger=task.trigger, ok=ok,
                      reason=_reason(exc), action="left in processing/; retried at next start")

    def _end_open_transaction(self) -> None:
        """A COMMIT that failed (disk full) may leave the transaction open, and every later
        ``BEGIN`` would fail with it even after space returns: roll it back now.  Under the
        store's transaction lock, so the other lane's transaction in flight is never the one
        rolled back."""
        try:
            self.store.end_open_transaction()
        except Exception as exc:
            log.warning("worker.rollback_failed", reason=_reason(exc))

    # -- observability --------------------------------------------------------------------------

    def _status_line(self) -> str:
        working = ", ".join(f"{lane.name}: {lane.current.kind if lane.current else 'idle'}"
                            for lane in self.lanes)
        return (f"{'paused' if self.pipeline.paused else 'running'}; queue {self.lanes.depth()}"
                f"; working: {working}; last event: {self.lanes.last_event or '-'}")

    def _live_facts(self, quiet_limit: float) -> LiveFacts:
        """What the threads and the queues look like now, for /metrics and /healthz (called
        from the listener's threads and the main loop: reads only, never waits on a lane)."""
        from daemon.metrics import LiveFacts

        busy = self.lanes.busiest()
        current = busy.current if busy else None
        quiet = {lane.name: lane.progress.quiet_seconds() if lane.current else 0.0
                 for lane in self.lanes}
        return LiveFacts(
            queue_by_kind=self.lanes.depth_by_kind(),
            current_kind=current.kind if current else None,
            current_seconds=busy.elapsed() if busy and current else None,
            quiet_seconds=max(quiet.values(), default=0.0),
            no_progress=any(lane.current is not None and lane.progress.stalled(quiet_limit)
                            for lane in self.lanes),
            observer_alive=self.watcher.is_alive(), worker_alive=self.lanes.all_alive(),
            stalled=self.stalled, state_db_problem=self.store.check_file(),
            paused=self.pipeline.paused,
            embedding_disabled=self.pipeline.embedding_disabled is not None,
            quiet_by_lane=quiet,
            running_by_lane={lane.name: (lane.current.kind, lane.elapsed())
                             for lane in self.lanes if lane.current is not None})

    def _lane_facts(self, lane: LaneWorker) -> dict[str, Any]:
        current = lane.current
        return {"queue_depth": lane.queue.depth(), "queued_kinds": lane.queue.pending_kinds(),
                "current_task": current.kind if current else None,
                "current_project": current.project if current else None,
                "current_seconds": round(lane.elapsed(), 1) if current else None,
                "seconds_since_progress": (round(lane.progress.quiet_seconds(), 1)
                                           if current else None),
                "held_tasks": lane.held(), "alive": lane.is_alive()}

    def _write_heartbeat(self, state: str) -> None:
        # the keys of the one-worker days stay (status --json readers): they describe the
        # lane whose task has run longest; "lanes" has each lane's own
        busy = self.lanes.busiest()
        current = busy.current if busy else None
        last_at = self.lanes.last_event_at
        doc = {
            "pid": os.getpid(), "version": __version__, "state": state,
            "started_at": iso_utc(self.started_at), "updated_at": iso_utc(datetime.now(UTC)),
            "heartbeat_seconds": self.settings.service.heartbeat_seconds,
            "queue_depth": self.lanes.depth(), "queued_kinds": self.lanes.pending_kinds(),
            "current_task": current.kind if current else None,
            "current_project": current.project if current else None,
            "last_event": self.lanes.last_event,
            "last_event_at": (datetime.fromtimestamp(last_at, UTC).isoformat()
                              if last_at else None),
            "observer_alive": self.watcher.is_alive(), "worker_alive": self.lanes.all_alive(),
            "tasks_done": self.tasks_done, "tasks_failed": self.tasks_failed,
            "deferred_tasks": self.lanes.held(), "paused": self.pipeline.paused,
            "retrying_tasks": self.backoff.retrying(),
            "seconds_since_progress": (round(busy.progress.quiet_seconds(), 1)
                                       if busy else None),
            "embedding_disabled": self.pipeline.embedding_disabled,
            "config_file": str(self.config_path) if self.config_path else None,
            # the model as the heavy lane loaded it (status must not import torch to know it)
            "model": self.pipeline.model.to_dict(),
            "embedding_rate": self.pipeline.embed_rate.to_dict(),
            "lanes": {lane.name: self._lane_facts(lane) for lane in self.lanes},
            "stalled_lane": self.stalled_lane.name if self.stalled_lane else None,
        }
        try:
            atomic_write_text(heartbeat_path(self.settings), json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            log.warning("service.heartbeat_failed", error=str(exc))


def _watch_plan(s: Settings) -> tuple[Any, ...]:
    """What the watcher depends on: a reload restarts it only when this changed."""
    return (s.decisions_dir, s.triggers_dir, sorted(image_roots_of(s).items()), s.watcher.observer,
            s.watcher.polling_interval_seconds)


def _schedules(s: Settings) -> tuple[Any, ...]:
    """What the jobs depend on: a reload registers them again only when this changed."""
    return (s.service.daily_summary_time, s.service.timezone, s.service.retrain_check_minutes,
            s.watcher.reconcile_minutes)


def _reason(exc: BaseException, limit: int = 500) -> str:
    """One line a person can act on: the exception type and message (disk full, read-only...)."""
    return f"{type(exc).__name__}: {exc}"[:limit]


def _flush_logs() -> None:
    for flushable in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            flushable.flush()


def read_heartbeat(settings: Settings) -> dict[str, Any] | None:
    """The service's last heartbeat plus a verdict on whether it is alive; ``None`` when there
    is no heartbeat file.  Read-only, for any user who can read the data folder: a file that
    cannot be read says so in the verdict instead of passing for "not running"."""
    path = heartbeat_path(settings)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a 0600 heartbeat written by an older trainingd
        return _unknown_heartbeat(f"heartbeat {path} unreadable: {exc.strerror or exc}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return _unknown_heartbeat(f"heartbeat {path} is not a JSON object")
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(doc["updated_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        age = float("inf")
    doc["age_seconds"] = round(age, 1)
    try:
        pid, every = int(doc.get("pid", 0)), float(doc.get("heartbeat_seconds", 5))
    except (TypeError, ValueError):
        pid, every = 0, 5.0
    alive = _pid_alive(pid)
    stale = age > 3 * every + 5
    # health: one word a monitor can switch on (trainingd status turns it into its exit code)
    if doc.get("state") == "stopped":
        doc["verdict"], doc["health"] = "stopped", "stopped"
    elif not alive:
        doc["verdict"], doc["health"] = "dead (process gone without a clean stop)", "dead"
    elif stale:
        doc["verdict"], doc["health"] = f"stale (no heartbeat for {age:.0f} s)", "stale"
    else:
        doc["verdict"] = doc.get("state", "running")
        doc["health"] = "stalled" if doc["verdict"] == "stalled" else "running"
    return doc


def _unknown_heartbeat(why: str) -> dict[str, Any]:
    return {"verdict": f"unknown ({why})", "health": "unknown", "pid": None, "age_seconds": None,
            "queue_depth": None, "current_task": None, "last_event": None, "tasks_done": None,
            "tasks_failed": None}


def _pid_alive(pid: int) -> bool:
    """Signal 0 probes without signalling; EPERM (the daemon runs as another user) means the
    process exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
