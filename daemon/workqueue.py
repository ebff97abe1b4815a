"""The coalescing work queue between the event sources and a lane's worker (one per lane).

Events are wake-ups, not facts: a burst of writes to one DB or one folder becomes one task.
Each task has a key; putting a task whose key is pending merges it into the pending one (their
path and hint sets are united).  A file task becomes ready after ``settle_seconds`` without a new
event for its key (files are written in pieces), or ``max_wait_seconds`` after its first event,
whichever comes first, so a steady stream of writes can delay work by at most
``max_wait_seconds``, never starve it.  A DB-commit task is throttled instead: ready
``settle_seconds`` after its first event, whatever follows.
Ready tasks leave in the order their first event arrived (per-project order is preserved).

A task that failed for a reason of the environment (disk full, read-only data folder, a folder
gone) comes back through :meth:`WorkQueue.put` with a ``delay`` from :class:`Backoff`: it stays
pending (so ``trainingd status`` shows it and new events for its key merge into it, not around
it) and is not ready before its delay is over.

This room knows nothing of what tasks mean; it never raises into a producer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work for a lane.  ``kind`` names the pipeline stage: a
    :class:`daemon.tasks.TaskKind` (a ``str``; a name no handler knows fails as a task)."""

    kind: str
    project: str | None = None
    paths: frozenset[str] = frozenset()
    hints: frozenset[str] = frozenset()
    args: tuple[tuple[str, Any], ...] = ()
    trigger: str | None = None  # the claimed trigger file to finish, if any
    urgent: bool = False  # skip the settle delay (triggers, scheduled jobs)
    #: ready ``settle`` after the FIRST event (throttle) instead of after the last (debounce):
    #: for DB commits, whose work is incremental and cheap, so a steady stream of commits is
    #: validated every ``settle`` seconds rather than every ``max_wait``
    throttle: bool = False

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        # triggers are never merged: each one gets its own result file
        return (self.kind, self.project, self.trigger)

    def merged(self, other: Task) -> Task:
        return replace(self, paths=self.paths | other.paths, hints=self.hints | other.hints,
                       urgent=self.urgent or other.urgent,
                       throttle=self.throttle or other.throttle)

    def arg(self, name: str, default: Any = None) -> Any:
        return dict(self.args).get(name, default)


@dataclass(slots=True)
class _Entry:
    task: Task
    first: float
    last: float
    order: int = field(default=0)
    not_before: float = 0.0  # a retry waits out its backoff, whatever events merge into it


class Backoff:
    """Exponential, capped retry delays per task key: ``base``, ``2 base``, ``4 base`` ... up to
    ``cap`` seconds.  Success forgets the key; a key's count is how many times in a row it has
    failed."""

    def __init__(self, base_seconds: float, cap_seconds: float) -> None:
        self.base = base_seconds
        self.cap = cap_seconds
        self._failures: dict[tuple[str, str | None, str | None], int] = {}

    def failed(self, key: tuple[str, str | None, str | None]) -> tuple[int, float]:
        """Record one more failure; return (failures in a row, delay before the next try)."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        return n, min(self.cap, self.base * 2 ** min(n - 1, 32))

    def succeeded(self, key: tuple[str, str | None, str | None]) -> int:
        """Forget the key; return how many failures it had."""
        return self._failures.pop(key, 0)

    def failures(self, key: tuple[str, str | None, str | None]) -> int:
        return self._failures.get(key, 0)

    def retrying(self) -> int:
        """How many keys are failing now."""
        return len(self._failures)


class WorkQueue:
    def __init__(self, settle_seconds: float, max_wait_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settle = settle_seconds
        self.max_wait = max_wait_seconds
        self.clock = clock
        self._pending: dict[tuple[str, str | None, str | None], _Entry] = {}
        self._cond = threading.Condition()
        self._order = itertools.count()
        self.last_event: str | None = None
        self.last_event_at: float | None = None

    def put(self, task: Task, *, delay: float = 0.0) -> None:
        """Queue ``task`` (merged into a pending one of its key); with ``delay`` it is not
        ready for that many seconds (a retry)."""
        now = self.clock()
        with self._cond:
            entry = self._pending.get(task.key)
            if entry is None:
                entry = self._pending[task.key] = _Entry(task, now, now, next(self._order))
            else:
                entry.task = entry.task.merged(task)
                entry.last = now
            if delay > 0:
                entry.not_before = max(entry.not_before, now + delay)
            self.last_event = f"{task.kind}:{task.project or '-'}"
            self.last_event_at = time.time()
            self._cond.notify_all()

    def _ready_at(self, entry: _Entry) -> float:
        if entry.task.urgent:
            ready = entry.first
        elif entry.task.throttle:
            ready = entry.first + self.settle
        else:
            ready = min(entry.last + self.settle, entry.first + self.max_wait)
        return max(ready, entry.not_before)

    def get(self, timeout: float) -> Task | None:
        """The next ready task, or None after ``timeout`` seconds."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                now = self.clock()
                best: _Entry | None = None
                next_ready = deadline
                for entry in self._pending.values():
                    ready_at = self._ready_at(entry)
                    if ready_at <= now:
                        if best is None or entry.order < best.order:
                            best = entry
                    else:
                        next_ready = min(next_ready, ready_at)
                if best is not None:
                    del self._pending[best.task.key]
                    return best.task
                if now >= deadline:
                    return None
                self._cond.wait(max(0.0, min(next_ready, deadline) - now))

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def pending_kinds(self) -> list[str]:
        with self._cond:
            return sorted({k[0] for k in self._pending})

    def depth_by_kind(self) -> dict[str, int]:
        """Pending tasks per kind (the metrics room's queue-depth gauge)."""
        with self._cond:
            counts: dict[str, int] = {}
            for key in self._pending:
                counts[key[0]] = counts.get(key[0], 0) + 1
            return counts
