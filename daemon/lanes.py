"""Lanes: one coalescing queue, one worker thread and one progress stamp per kind of work.

Why: with one worker, a commit waited behind every embedding batch and a whole training run
(p95 28 s with 300 images waiting).  The fast lane (validation, sidecars, the image index,
triggers, inspect, pause/resume) and the heavy lane (embedding, training, backfill, summary)
each take the next ready task of their own queue, so a row is validated while the heavy lane
embeds.  What a task means, and which lane it belongs to, is decided in :mod:`daemon.tasks`;
what a lane does with a task is the service's ``run_task`` callable; this room only routes,
holds and measures.

Both lanes write the state DB through the one :class:`~daemon.store.db.StateStore`: its lock,
held by every ``transaction()`` (and by a heal), makes them take turns, and every transaction
is short (one chunk of rows, one embedding batch), so the fast lane waits at most for one
batch's write, never for a batch's inference.

Nothing here may raise into a producer (``put`` is called from the watchdog thread, the
scheduler and both lanes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from daemon.health import Progress
from daemon.tasks import Lane, lane_for
from daemon.workqueue import Task, WorkQueue

TaskKey = tuple[str, str | None, str | None]


class LaneWorker:
    """One lane's queue, the task it runs now, the tasks it holds while paused, its stamp."""

    def __init__(self, lane: Lane, settle_seconds: float, max_wait_seconds: float) -> None:
        self.lane = lane
        self.queue = WorkQueue(settle_seconds, max_wait_seconds)
        self.progress = Progress()
        self.current: Task | None = None
        self.current_since: float | None = None
        self.thread: threading.Thread | None = None
        self._held: dict[TaskKey, Task] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.lane)

    def start(self, target: Callable[[LaneWorker], None]) -> None:
        self.thread = threading.Thread(target=target, args=(self,), name=f"lane-{self.lane}",
                                       daemon=True)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @contextmanager
    def running(self, task: Task) -> Iterator[None]:
        """``task`` is this lane's current task for the duration (the health tick reads it)."""
        self.progress.beat(f"started {task.kind}")
        self.current, self.current_since = task, time.monotonic()
        try:
            yield
        finally:
            self.current, self.current_since = None, None

    def elapsed(self) -> float:
        since = self.current_since
        return time.monotonic() - since if since is not None else 0.0

    # -- pause ----------------------------------------------------------------------------------

    def hold(self, task: Task) -> None:
        """Keep ``task`` until :meth:`release` (merged with a held task of its key)."""
        with self._lock:
            old = self._held.get(task.key)
            self._held[task.key] = old.merged(task) if old else task

    def release(self) -> int:
        """Put every held task back into the queue; return how many."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for task in held:
            self.queue.put(task)
        return len(held)

    def held(self) -> int:
        with self._lock:
            return len(self._held)


class Lanes:
    """The lanes, and ``put``: the one entry point every producer hands tasks to."""

    def __init__(self, settle_seconds: float, max_wait_seconds: float) -> None:
        self.by_lane = {lane: LaneWorker(lane, settle_seconds, max_wait_seconds)
                        for lane in Lane}
        self.last_event: str | None = None
        self.last_event_at: float | None = None

    def __iter__(self) -> Iterator[LaneWorker]:
        return iter(self.by_lane.values())

    def __getitem__(self, lane: Lane) -> LaneWorker:
        return self.by_lane[lane]

    def put(self, task: Task, *, delay: float = 0.0) -> None:
        worker = self.by_lane[lane_for(task.kind)]
        worker.queue.put(task, delay=delay)
        self.last_event, self.last_event_at = worker.queue.last_event, worker.queue.last_event_at

    # -- what the heartbeat, status and metrics show --------------------------------------------

    def depth(self) -> int:
        return sum(w.queue.depth() for w in self)

    def pending_kinds(self) -> list[str]:
        return sorted({k for w in self for k in w.queue.pending_kinds()})

    def depth_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self:
            for kind, n in w.queue.depth_by_kind().items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def held(self) -> int:
        return sum(w.held() for w in self)

    def busiest(self) -> LaneWorker | None:
        """The lane whose task has run longest (the one ``current_task`` names), if any."""
        busy = [w for w in self if w.current is not None]
        return max(busy, key=lambda w: w.elapsed()) if busy else None

    def all_alive(self) -> bool:
        return all(w.is_alive() for w in self)


class ThreadProgress:
    """The pipeline's progress stamp, routed to the stamp of the lane whose thread beats.

    The pipeline's stages run on either lane and beat ``self.progress``; each lane's health is
    judged on its own stamp, so a beat from the fast lane must never hide a stalled heavy
    lane.  A thread that is not a lane (a test calling the pipeline directly) beats
    ``fallback``."""

    def __init__(self, fallback: Progress | None = None) -> None:
        self.fallback = fallback if fallback is not None else Progress()
        self._local = threading.local()
        #: the latest note from any lane ("loading the embedding model"), for the demo's tour
        self.note: str | None = None

    def bind(self, progress: Progress) -> None:
        """From now on, beats from this thread go to ``progress``."""
        self._local.progress = progress

    def _target(self) -> Progress:
        target: Progress = getattr(self._local, "progress", self.fallback)
        return target

    def beat(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self._target().beat(note)

    def allow(self, seconds: float, note: str, *, abandonable: bool = False) -> None:
        self.note = note
        self._target().allow(seconds, note, abandonable=abandonable)

    def should_stop(self, stopping: Callable[[], bool]) -> Callable[[], bool]:
        return self._target().should_stop(stopping)
