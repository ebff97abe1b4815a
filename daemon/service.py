"""``trainingd run``: startup -> loop -> shutdown, as a systemd ``Type=notify`` service.

Threads: the watchdog observer and APScheduler produce tasks; ONE worker thread does all work
(one writer to the state DB, one user of the GPU); the main thread handles signals (handlers
only set flags), checks health, pings the systemd watchdog and writes the heartbeat file that
``trainingd status`` reads.  The main thread never waits on the worker, so it can always act.

Health means *work is moving*, not "threads are alive": the worker bumps a progress stamp
(:mod:`daemon.health`); a task without progress for ``service.stall_seconds`` is a stall: the
pings stop, the stall is logged with the worker's stack, the heartbeat says ``stalled`` and the
process exits 70 so systemd restarts it.  If the observer or the worker dies, the same.

SIGTERM/SIGINT: the current unit of work may finish within ``service.shutdown_budget_seconds``;
after that the process ends with ``os._exit`` whatever the worker is doing (blocked in a system
call, waiting on a decode thread): every write is transactional, so SQLite rolls back anything
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
from daemon.logs import PrerenderedLine
from daemon.pipeline import Pipeline, image_roots_of
from daemon.sdnotify import Notifier
from daemon.settings import Settings, changed_sections, check_input_folders, load_settings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc
from daemon.triggers import TriggerBox
from daemon.watcher import Watcher, WatchPlan
from daemon.workqueue import Backoff, Task, WorkQueue

if TYPE_CHECKING:
    from daemon.metrics import LiveFacts

log = structlog.get_logger("service")
#: written from the SIGINT handler, where logging could deadlock (see daemon.logs)
_SECOND_SIGINT = PrerenderedLine("service.second_sigint", "warning", "service", exit_code=130,
                                 action="exiting now, without waiting for the current task")

EXIT_HEALTH = 70  # EX_SOFTWARE: a thread died or work stalled; systemd restarts us
#: failures of the environment, not of the input: worth a retry once space or access returns
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.OperationalError)
ALWAYS_RUN = {"pause", "resume", "triggers"}


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
        self.pending_settings: Settings | None = None
        self.current: Task | None = None
        self.current_since: float | None = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self.fatal: BaseException | None = None
        self.deferred: dict[Any, Task] = {}
        self.started_at = datetime.now(UTC)
        self.progress = Progress()
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
        self.queue = WorkQueue(s.watcher.settle_seconds, s.watcher.max_wait_seconds)
        self.pipeline = Pipeline(s, self.store, self.queue.put, clock=self.clock,
                                 embedder=self.embedder, progress=self.progress)
        self.box = TriggerBox(s.triggers_dir, roots=self._allowed_roots,
                              projects=self.pipeline.projects)
        for signum, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                                (signal.SIGHUP, self._on_hup)):
            self._old_handlers[signum] = signal.signal(signum, handler)
        # the initial reconcile is the worker's first task: the main thread stays responsive
        self.queue.put(Task("reconcile", urgent=True))
        self.watcher = self._start_watcher(s)
        self.jobs = Jobs(self.queue.put)
        self.jobs.start(s)
        self.worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self.worker.start()
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
        self.queue.put(Task("reconcile", urgent=True))
        return True

    def _allowed_roots(self) -> list[Path]:
        return [self.settings.data_root, *image_roots_of(self.settings)]

    def _start_watcher(self, s: Settings) -> Watcher:
        plan = WatchPlan(s.decisions_dir, s.triggers_dir, image_roots_of(s))
        watcher = Watcher(plan, self.queue.put, observer=s.watcher.observer,
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
            if not self.worker.is_alive():
                log.error("service.worker_died", error=repr(self.fatal),
                          action="exiting so systemd restarts us")
                return EXIT_HEALTH
            if not self._heal_state_db():
                return EXIT_HEALTH
            if self.current is not None and self.progress.stalled(
                    self.settings.service.stall_seconds):
                self._on_stall()
                return EXIT_HEALTH
            self.notifier.watchdog()  # only while work moves
            now = time.monotonic()
            if now >= next_beat:
                self._write_heartbeat("paused" if self.pipeline.paused else "running")
                self.metrics.write_textfile()
                self.notifier.status(self._status_line())
                next_beat = now + self.settings.service.heartbeat_seconds
            if deadline is not None and now >= deadline:
                log.info("service.run_time_elapsed", seconds=self.run_seconds)
                break
        return 0

    def _on_stall(self) -> None:
        """No progress for ``stall_seconds``: say what the worker was doing, where it is stuck,
        and let systemd restart us (the pings have already stopped)."""
        self.stalled = True
        facts = describe_stall(self.current, self.progress, self.worker, self.current_since)
        log.error("service.worker_stalled", stall_seconds=self.settings.service.stall_seconds,
                  action="no more watchdog pings; exiting 70 so systemd restarts us", **facts)
        self._write_heartbeat("stalled")
        self.notifier.status(f"stalled: {facts['task']} without progress for "
                             f"{facts['seconds_since_progress']} s")

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
            self.pending_settings = new  # the worker applies it between tasks
            self.queue.put(Task("reconcile", urgent=True))
        log.info("service.reloaded", config=str(self.config_path), changed=changed,
                 watcher_restarted=watcher is not None, jobs_registered=jobs_changed)
        self.notifier.ready(self._status_line())

    def _register_jobs_again(self) -> None:
        try:
            self.jobs.register(self.settings)
        except Exception:  # the old settings registered once; log, and let the tick go on
            log.exception("service.jobs_restore_failed")

    def _shutdown(self, code: int) -> int:
        """Stop within the budget whatever the worker does: join it for at most the budget
        (not at all after a stall), then end the process hard if it is still inside a task."""
        started = time.monotonic()
        budget = self.settings.service.shutdown_budget_seconds
        log.info("service.stopping", budget_seconds=budget, queue_depth=self.queue.depth(),
                 current_task=self.current.kind if self.current else None, stalled=self.stalled)
        self.notifier.stopping()
        self.stopping.set()
        for stop in (self.jobs.stop, lambda: self.watcher.stop(timeout=2.0)):
            try:
                stop()
            except Exception:  # a producer that fails to stop must not keep us running
                log.exception("service.stop_step_failed")
        self.worker.join(0.0 if self.stalled else
                         max(0.0, budget - (time.monotonic() - started)))
        if self.listener is not None:
            self.listener.stop()
        final = "stalled" if self.stalled else "stopped"
        if self.worker.is_alive():
            code = code or 1
            # SQLite rolls back the open transaction when the process exits: nothing half-done
            if not self.stalled:
                log.error("service.shutdown_budget_exceeded", budget_seconds=budget,
                          action="exiting without the worker", **describe_stall(
                              self.current, self.progress, self.worker, self.current_since))
            self._write_heartbeat(final)
            log.info("service.stopped", exit_code=code, tasks_done=self.tasks_done,
                     tasks_failed=self.tasks_failed, worker_abandoned=True)
            self._restore_signals()
            # a normal exit would wait for the worker and its decode threads, for ever if one is
            # blocked: flush what we said, then leave without them
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

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.pending_settings is not None:
                    self.pipeline.reconfigure(self.pending_settings)
                    self.pending_settings = None
                self.progress.beat("idle")  # waiting for work is not a stall
                task = self.queue.get(timeout=0.5)
                if task is None or self.stopping.is_set():
                    if task is not None and task.trigger:
                        pass  # stays in processing/: claimed again at the next start
                    continue
                if task.kind == "triggers":
                    for claimed in self.box.claim():
                        self.queue.put(claimed)
                    continue
                if self.pipeline.paused and task.kind not in ALWAYS_RUN:
                    old = self.deferred.get(task.key)
                    self.deferred[task.key] = old.merged(task) if old else task
                    continue
                self._run_task(task)
                if task.kind == "resume":
                    for held in self.deferred.values():
                        self.queue.put(held)
                    self.deferred.clear()
        except StoreError as exc:
            self.fatal = exc
            log.exception("worker.state_db_failed")
        except BaseException as exc:
            self.fatal = exc
            log.exception("worker.crashed")

    def _run_task(self, task: Task) -> None:
        self.progress.beat(f"started {task.kind}")
        self.current, self.current_since = task, time.monotonic()
        ok, result = True, {}
        failure: BaseException | None = None
        try:
            result = self.pipeline.handle(task, self.progress.should_stop(self.stopping.is_set))
        except StoreError:
            raise
        except Exception as exc:
            ok, failure = False, exc
            result = {"error": _reason(exc)}
            log.exception("worker.task_failed", kind=task.kind, project=task.project,
                          reason=_reason(exc))
            self._end_open_transaction()
        finally:
            elapsed = time.monotonic() - (self.current_since or time.monotonic())
            self.current, self.current_since = None, None
        self.metrics.task_finished(task.kind, task.project, ok, result, elapsed)
        if ok:
            self.tasks_done += 1
            attempts = self.backoff.succeeded(task.key)
            if attempts:
                result = {**result, "attempts": attempts + 1}
                log.info("worker.task_recovered", kind=task.kind, project=task.project,
                         failures=attempts)
        else:
            self.tasks_failed += 1
            if failure is not None and self._retry_later(task, failure):
                return
            attempts = self.backoff.succeeded(task.key)  # given up: forget the key
            if attempts:
                result["attempts"] = attempts
        if task.trigger:
            self._finish_trigger(task, ok, result, elapsed)
        log.info("worker.task_done", kind=task.kind, project=task.project, ok=ok,
                 duration_ms=round(elapsed * 1000, 1), queue_depth=self.queue.depth())

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
        self.queue.put(task, delay=delay)
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
        ``BEGIN`` would fail with it even after space returns: roll it back now."""
        try:
            conn = self.store.conn
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except Exception as exc:
            log.warning("worker.rollback_failed", reason=_reason(exc))

    # -- observability --------------------------------------------------------------------------

    def _status_line(self) -> str:
        current = self.current.kind if self.current else "idle"
        return (f"{'paused' if self.pipeline.paused else 'running'}; queue {self.queue.depth()}; "
                f"working: {current}; last event: {self.queue.last_event or '-'}")

    def _live_facts(self, quiet_limit: float) -> LiveFacts:
        """What the threads and the queue look like now, for /metrics and /healthz (called
        from the listener's threads and the main loop: reads only, never waits on the worker)."""
        from daemon.metrics import LiveFacts

        current, since = self.current, self.current_since
        return LiveFacts(
            queue_by_kind=self.queue.depth_by_kind(),
            current_kind=current.kind if current else None,
            current_seconds=time.monotonic() - since if current and since else None,
            quiet_seconds=self.progress.quiet_seconds() if current else 0.0,
            no_progress=current is not None and self.progress.stalled(quiet_limit),
            observer_alive=self.watcher.is_alive(), worker_alive=self.worker.is_alive(),
            stalled=self.stalled, state_db_problem=self.store.check_file(),
            paused=self.pipeline.paused,
            embedding_disabled=self.pipeline.embedding_disabled is not None)

    def _write_heartbeat(self, state: str) -> None:
        doc = {
            "pid": os.getpid(), "version": __version__, "state": state,
            "started_at": iso_utc(self.started_at), "updated_at": iso_utc(datetime.now(UTC)),
            "heartbeat_seconds": self.settings.service.heartbeat_seconds,
            "queue_depth": self.queue.depth(), "queued_kinds": self.queue.pending_kinds(),
            "current_task": self.current.kind if self.current else None,
            "current_project": self.current.project if self.current else None,
            "last_event": self.queue.last_event,
            "last_event_at": (datetime.fromtimestamp(self.queue.last_event_at, UTC).isoformat()
                              if self.queue.last_event_at else None),
            "observer_alive": self.watcher.is_alive(), "worker_alive": self.worker.is_alive(),
            "tasks_done": self.tasks_done, "tasks_failed": self.tasks_failed,
            "deferred_tasks": len(self.deferred), "paused": self.pipeline.paused,
            "retrying_tasks": self.backoff.retrying(),
            "seconds_since_progress": (round(self.progress.quiet_seconds(), 1)
                                       if self.current else None),
            "embedding_disabled": self.pipeline.embedding_disabled,
            "config_file": str(self.config_path) if self.config_path else None,
            # the model as the worker loaded it (status must not import torch to know it)
            "model": self.pipeline.model.to_dict(),
            "embedding_rate": self.pipeline.embed_rate.to_dict(),
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
