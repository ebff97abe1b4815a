"""Is work *moving*?  The worker's progress stamp, and what to log when it stops moving.

A thread that is alive is not a thread that works: a worker blocked for ever in ``open()`` on a
FIFO is alive.  So the worker bumps a monotonic "last progress" stamp whenever work moves
(between tasks, at every ``should_stop`` poll, between rows, files and batches, through the
``progress`` callable the pipeline is handed), and the main thread's health tick compares its
age with ``service.stall_seconds``.  A step that is legitimately long and bounded by its own
timeout (loading the model, the audit hook) says so with :meth:`Progress.allow`.

This room only measures and describes; the service decides what a stall means (stop the
watchdog pings, log, exit 70).  Nothing here may block or raise: it runs on the main thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from daemon.workqueue import Task

#: how many paths of a task a stall report names
_SHOWN_PATHS = 5


class Progress:
    """The worker's last-progress stamp.  Written by the worker, read by the health tick."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.last = clock()
        self.note: str | None = None
        self._allowed_until = 0.0  # a declared long step: no stall before this moment
        self._abandonable = False  # ... that writes nothing: a shutdown may leave it behind

    def beat(self, note: str | None = None) -> None:
        """Work moved.  ``note`` (optional) says where, for the stall report."""
        now = self.clock()
        with self._lock:
            self.last = now
            self._allowed_until = 0.0
            self._abandonable = False
            if note is not None:
                self.note = note

    def allow(self, seconds: float, note: str, *, abandonable: bool = False) -> None:
        """The next step may take up to ``seconds`` without a beat (it has its own bound).
        ``abandonable``: the step writes nothing (loading a model), so a shutdown that finds
        the lane still inside it when its budget is spent leaves it behind as a clean stop
        (exit 0), not as work abandoned (exit 1)."""
        now = self.clock()
        with self._lock:
            self.last = now
            self._allowed_until = now + seconds
            self._abandonable = abandonable
            self.note = note

    def abandonable(self) -> str | None:
        """The note of the abandonable step running now, else ``None``."""
        with self._lock:
            return self.note if self._abandonable else None

    def quiet_seconds(self) -> float:
        """Seconds since the last beat."""
        with self._lock:
            return max(0.0, self.clock() - self.last)

    def stalled(self, stall_seconds: float) -> bool:
        """No beat for ``stall_seconds`` and no declared long step still running."""
        now = self.clock()
        with self._lock:
            return now - self.last > stall_seconds and now > self._allowed_until

    def should_stop(self, stopping: Callable[[], bool]) -> Callable[[], bool]:
        """``stopping`` that also counts each poll as progress: a task polls between units of
        work, and a training child is watched through the same poll (it has its own timeout)."""

        def poll() -> bool:
            self.beat()
            return stopping()

        return poll


def thread_stack(thread: threading.Thread | None) -> list[str]:
    """The current Python stack of ``thread``, innermost last (empty if it is gone)."""
    if thread is None or thread.ident is None:
        return []
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return []
    return [line.rstrip("\n") for line in traceback.format_stack(frame)]


def describe_stall(task: Task | None, progress: Progress, thread: threading.Thread | None,
                   started: float | None) -> dict[str, Any]:
    """The facts of a stall for one log record: what the worker was doing, since when, where."""
    now = progress.clock()
    paths = sorted(task.paths) if task else []
    return {
        "task": task.kind if task else None,
        "project": task.project if task else None,
        "paths": paths[:_SHOWN_PATHS],
        "paths_total": len(paths),
        "trigger": task.trigger if task else None,
        "seconds_since_progress": round(progress.quiet_seconds(), 1),
        "task_seconds": round(now - started, 1) if started is not None else None,
        "last_progress": progress.note,
        "worker_stack": thread_stack(thread),
    }
