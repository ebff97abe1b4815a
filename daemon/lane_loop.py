"""The lanes' loop: each lane's thread takes its next ready task, runs it, and turns whatever
it raises into a logged failure, a retry with backoff (a failure of the environment: disk full,
a locked file) or, for a failure of our own state DB only, the end of the thread (the health
tick then exits 70 and systemd restarts us).  A trigger's result is written when its task ends.

Split from :mod:`daemon.service`, which owns the threads, the signals and the health tick.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.errors import StoreError
from daemon.lanes import LaneWorker
from daemon.tasks import CONTROL_KINDS, Failed, TaskKind, TaskResult, TriggersClaimed
from daemon.workqueue import Task

if TYPE_CHECKING:
    from daemon.service import Service

log = structlog.get_logger("service")

#: failures of the environment, not of the input: worth a retry once space or access returns
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.OperationalError)



def work(svc: Service, lane: LaneWorker) -> None:
    """One lane's loop: take its next ready task; hold it while paused (control tasks
    excepted); run it.  Runs on the lane's own thread."""
    svc.progress.bind(lane.progress)
    try:
        while not svc.stopping.is_set():
            lane.progress.beat("idle")  # waiting for work is not a stall
            task = lane.queue.get(timeout=0.5)
            # after the wait, before the task: a task queued by a reload (its reconcile,
            # the embed that follows) must run under the settings that queued it
            pending = svc.pending_settings.pop(lane.lane, None)
            if pending is not None:
                svc.pipeline.reconfigure_lane(lane.lane, pending)
            if task is None or svc.stopping.is_set():
                continue  # a claimed trigger stays in processing/: claimed again at start
            if svc.pipeline.paused and task.kind not in CONTROL_KINDS:
                lane.hold(task)
                continue
            run_task(svc, lane, task)
            if task.kind == TaskKind.RESUME:
                released = {other.name: other.release() for other in svc.lanes}
                log.info("service.lanes_released", held=released)
    except StoreError as exc:
        svc.fatal = exc
        log.exception("worker.state_db_failed", lane=lane.name)
    except BaseException as exc:
        svc.fatal = exc
        log.exception("worker.crashed", lane=lane.name)


def should_stop(svc: Service, lane: LaneWorker, task: Task) -> Callable[[], bool]:
    """What a task polls between chunks: shutdown; for an embed task also a pause (it is
    put back, to be held with the rest).  A training run is not cut short by a pause."""
    if task.kind != TaskKind.EMBED:
        return lane.progress.should_stop(svc.stopping.is_set)
    return lane.progress.should_stop(
        lambda: svc.stopping.is_set() or svc.pipeline.paused)


def dispatch(svc: Service, lane: LaneWorker, task: Task) -> TaskResult:
    if task.kind == TaskKind.TRIGGERS:  # the service owns the trigger box
        claimed = svc.box.claim()
        for each in claimed:
            svc.lanes.put(each)
        return TriggersClaimed(len(claimed))
    result = svc.pipeline.run(task, should_stop(svc, lane, task))
    if task.kind == TaskKind.EMBED and svc.pipeline.paused and not svc.stopping.is_set():
        svc.lanes.put(task)  # cut short by a pause: held, and resumed with the rest
    return result


def run_task(svc: Service, lane: LaneWorker, task: Task) -> None:
    ok, failure = True, None
    result: TaskResult
    with lane.running(task):
        try:
            result = dispatch(svc, lane, task)
        except StoreError:
            raise
        except Exception as exc:
            ok, failure, result = False, exc, Failed(reason_of(exc))
            log.exception("worker.task_failed", lane=lane.name, kind=task.kind,
                          project=task.project, reason=reason_of(exc))
            end_open_transaction(svc)
        elapsed = lane.elapsed()
    if task.kind == TaskKind.TRIGGERS:
        return  # bookkeeping, not work: not counted, not logged per poll
    out = result.to_dict()
    svc.metrics.task_finished(task.kind, task.project, ok, out, elapsed)
    with svc._count_lock:
        if ok:
            svc.tasks_done += 1
        else:
            svc.tasks_failed += 1
    if ok:
        attempts = svc.backoff.succeeded(task.key)
        if attempts:
            out = {**out, "attempts": attempts + 1}
            log.info("worker.task_recovered", lane=lane.name, kind=task.kind,
                     project=task.project, failures=attempts)
    else:
        if failure is not None and retry_later(svc, task, failure):
            return
        attempts = svc.backoff.succeeded(task.key)  # given up: forget the key
        if attempts:
            out["attempts"] = attempts
    if task.trigger:
        finish_trigger(svc, task, ok, out, elapsed)
    log.info("worker.task_done", lane=lane.name, kind=task.kind, project=task.project,
             ok=ok, duration_ms=round(elapsed * 1000, 1), queue_depth=lane.queue.depth())


def retry_later(svc: Service, task: Task, exc: BaseException) -> bool:
    """A failure of the environment: back into the queue after a backoff (a trigger only
    while it has tries left).  Returns whether the task was queued again."""
    if not isinstance(exc, TRANSIENT_ERRORS) or svc.stopping.is_set():
        return False
    attempts, delay = svc.backoff.failed(task.key)
    if task.trigger and attempts >= svc.settings.service.trigger_attempts:
        log.error("worker.task_gave_up", kind=task.kind, project=task.project,
                  trigger=task.trigger, attempts=attempts, reason=reason_of(exc))
        return False
    svc.lanes.put(task, delay=delay)
    log.warning("worker.task_retry_scheduled", kind=task.kind, project=task.project,
                trigger=task.trigger, attempt=attempts, delay_seconds=round(delay, 1),
                reason=reason_of(exc))
    return True


def finish_trigger(svc: Service, task: Task, ok: bool, result: dict[str, Any],
                    elapsed: float) -> None:
    """Write the trigger's result; a failure to write it (disk full) is logged, never
    fatal: the trigger stays in ``processing/`` and is claimed again at the next start."""
    try:
        svc.box.finish(Path(task.trigger or ""), ok=ok, result={
            "action": task.kind, "args": dict(task.args), "result": result,
            "duration_seconds": round(elapsed, 3)})
    except Exception as exc:
        log.error("worker.trigger_result_failed", trigger=task.trigger, ok=ok,
                  reason=reason_of(exc), action="left in processing/; retried at next start")


def end_open_transaction(svc: Service) -> None:
    """A COMMIT that failed (disk full) may leave the transaction open, and every later
    ``BEGIN`` would fail with it even after space returns: roll it back now.  Under the
    store's transaction lock, so the other lane's transaction in flight is never the one
    rolled back."""
    try:
        svc.store.end_open_transaction()
    except Exception as exc:
        log.warning("worker.rollback_failed", reason=reason_of(exc))


def reason_of(exc: BaseException, limit: int = 500) -> str:
    """One line a person can act on: the exception type and message (disk full, read-only...)."""
    return f"{type(exc).__name__}: {exc}"[:limit]
