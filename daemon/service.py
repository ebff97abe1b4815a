"""``trainingd run``: startup -> loop -> shutdown, as a systemd ``Type=notify`` service.

Threads: the watchdog observer and APScheduler produce tasks; ONE worker thread does all work
(one writer to the state DB, one user of the GPU); the main thread handles signals (handlers
only set flags), checks health, pings the systemd watchdog and writes the heartbeat file that
``trainingd status`` reads.  If the observer or the worker dies, the process exits 70 so
systemd restarts it instead of leaving a zombie.  SIGTERM/SIGINT: the current unit of work may
finish within ``service.shutdown_budget_seconds`` (every write is transactional, so anything
unfinished is rolled back, never half-written); a second SIGINT exits at once.  SIGHUP reloads
the configuration (a bad one is logged and the old one kept).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from daemon import __version__
from daemon.errors import ConfigError, StoreError
from daemon.fsutil import atomic_write_text
from daemon.jobs import Jobs
from daemon.pipeline import Pipeline, image_roots_of
from daemon.sdnotify import Notifier
from daemon.settings import Settings, load_settings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc
from daemon.triggers import TriggerBox
from daemon.watcher import Watcher, WatchPlan
from daemon.workqueue import Task, WorkQueue

log = structlog.get_logger("service")

EXIT_HEALTH = 70  # EX_SOFTWARE: a thread died; systemd restarts us
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

    # -- signals (handlers only set flags) ------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints >= 2:
                os.write(2, b"trainingd: second SIGINT, exiting now\n")
                os._exit(130)
        self.stop_requested = True
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        for folder in (s.decisions_dir, s.triggers_dir, s.summaries_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # quick_check; a damaged state DB is moved aside and rebuilt; applies migrations
        self.store = StateStore.open_checked(s.state_db, rebuild=self._rebuild_state)
        self.queue = WorkQueue(s.watcher.settle_seconds, s.watcher.max_wait_seconds)
        self.pipeline = Pipeline(s, self.store, self.queue.put, clock=self.clock,
                                 embedder=self.embedder)
        self.box = TriggerBox(s.triggers_dir, roots=self._allowed_roots,
                              projects=self.pipeline.projects)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        # the initial reconcile is the worker's first task: the main thread stays responsive
        self.queue.put(Task("reconcile", urgent=True))
        self.watcher = self._start_watcher(s)
        self.jobs = Jobs(self.queue.put)
        self.jobs.start(s)
        self.worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self.worker.start()
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
            self.notifier.watchdog()
            now = time.monotonic()
            if now >= next_beat:
                self._write_heartbeat("paused" if self.pipeline.paused else "running")
                self.notifier.status(self._status_line())
                next_beat = now + self.settings.service.heartbeat_seconds
            if deadline is not None and now >= deadline:
                log.info("service.run_time_elapsed", seconds=self.run_seconds)
                break
        return 0

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("service.reload_failed", error=str(exc), action="keeping the old config")
            self.notifier.ready(self._status_line())
            return
        self.watcher.stop()
        self.settings = new
        self.pending_settings = new  # the worker applies it between tasks
        self.watcher = self._start_watcher(new)
        self.jobs.register(new)
        self.queue.put(Task("reconcile", urgent=True))
        log.info("service.reloaded", config=str(self.config_path))
        self.notifier.ready(self._status_line())

    def _shutdown(self, code: int) -> int:
        budget = self.settings.service.shutdown_budget_seconds
        log.info("service.stopping", budget_seconds=budget, queue_depth=self.queue.depth(),
                 current_task=self.current.kind if self.current else None)
        self.notifier.stopping()
        self.stopping.set()
        self.jobs.stop()
        self.watcher.stop(timeout=2.0)
        self.worker.join(budget)
        if self.worker.is_alive():
            # SQLite rolls back the open transaction when the process exits: nothing half-done
            log.error("service.shutdown_budget_exceeded", task=self.current.kind
                      if self.current else None, budget_seconds=budget)
            code = code or 1
        else:
            self.store.close()
        self._write_heartbeat("stopped")
        log.info("service.stopped", exit_code=code, tasks_done=self.tasks_done,
                 tasks_failed=self.tasks_failed)
        return code

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.pending_settings is not None:
                    self.pipeline.reconfigure(self.pending_settings)
                    self.pending_settings = None
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
        self.current, self.current_since = task, time.monotonic()
        ok, result = True, {}
        try:
            result = self.pipeline.handle(task, self.stopping.is_set)
        except StoreError:
            raise
        except Exception as exc:
            ok = False
            result = {"error": f"{type(exc).__name__}: {exc}"}
            log.exception("worker.task_failed", kind=task.kind, project=task.project)
        finally:
            elapsed = time.monotonic() - (self.current_since or time.monotonic())
            self.current, self.current_since = None, None
        if ok:
            self.tasks_done += 1
        else:
            self.tasks_failed += 1
        if task.trigger:
            self.box.finish(Path(task.trigger), ok=ok, result={
                "action": task.kind, "args": dict(task.args), "result": result,
                "duration_seconds": round(elapsed, 3)})
        log.info("worker.task_done", kind=task.kind, project=task.project, ok=ok,
                 duration_ms=round(elapsed * 1000, 1), queue_depth=self.queue.depth())

    # -- observability --------------------------------------------------------------------------

    def _status_line(self) -> str:
        current = self.current.kind if self.current else "idle"
        return (f"{'paused' if self.pipeline.paused else 'running'}; queue {self.queue.depth()}; "
                f"working: {current}; last event: {self.queue.last_event or '-'}")

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
            "embedding_disabled": self.pipeline.embedding_disabled,
            "config_file": str(self.config_path) if self.config_path else None,
        }
        try:
            atomic_write_text(heartbeat_path(self.settings), json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            log.warning("service.heartbeat_failed", error=str(exc))


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
    if doc.get("state") == "stopped":
        doc["verdict"] = "stopped"
    elif not alive:
        doc["verdict"] = "dead (process gone without a clean stop)"
    elif stale:
        doc["verdict"] = f"stale (no heartbeat for {age:.0f} s)"
    else:
        doc["verdict"] = doc.get("state", "running")
    return doc


def _unknown_heartbeat(why: str) -> dict[str, Any]:
    return {"verdict": f"unknown ({why})", "pid": None, "age_seconds": None,
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
