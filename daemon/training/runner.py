"""Training where a crash or CUDA out-of-memory cannot take the daemon down.

:func:`train_model` asks the retrain policy (unless forced), then runs the training in a child
process (``python -m daemon.training.worker``) and waits for it while polling ``should_stop``:
a stop request sends SIGTERM (the child stops within one batch), and a child still running
after half the shutdown budget, or past its timeout, is killed.  A child that dies at any point
leaves the champion as it was (the registry writes its pointer last).  Only the parent writes
the state DB: the run history and, for a finished run, the labels it trained on.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog

from daemon.errors import NotEnoughDataError, TrainingError
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.training import policy
from daemon.training.core import TrainOutcome

log = structlog.get_logger("training")
Kind = Literal["ranker", "crop"]
DEFAULT_VECTORS_FACTORY = "daemon.embedding.lookup:CacheVectorSource"
LINE_PREFIX = "@@trainingd "
_POLL_SECONDS = 0.1


def train_in_process(settings: Settings, kind: Kind, vectors: VectorSource, *,
                     store: StateStore | None = None,
                     should_stop: Callable[[], bool] = lambda: False,
                     progress: Callable[[dict[str, Any]], None] | None = None,
                     now: datetime | None = None) -> TrainOutcome:
    """One training in this process; expected endings become an outcome, not an exception."""
    from daemon.training.core import run_training
    from daemon.training.fit import TrainingStopped

    try:
        return run_training(settings, kind, vectors, store=store, should_stop=should_stop,
                            progress=progress, now=now)
    except NotEnoughDataError as exc:
        return TrainOutcome(kind=kind, status="not_enough_data", reason=str(exc))
    except TrainingStopped as exc:
        return TrainOutcome(kind=kind, status="stopped", reason=str(exc))


def settings_payload(settings: Settings) -> str:
    """Everything a child needs to rebuild the same settings, as the JSON text it reads."""
    return json.dumps({"settings": settings.model_dump(mode="json"),
                       "base_dir": str(settings.base_dir)})


def settings_from_payload(text: str) -> Settings:
    """The settings :func:`settings_payload` wrote (parsed here, at the pipe)."""
    payload = json.loads(text)
    s = Settings(**payload["settings"])
    s._base_dir = Path(payload["base_dir"])
    return s


def _reader(stream: Any, sink: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        if line.startswith(LINE_PREFIX):
            try:
                sink.put(json.loads(line[len(LINE_PREFIX):]))
            except ValueError:
                continue


def _run_child(settings: Settings, kind: Kind, *, vectors_factory: str,
               should_stop: Callable[[], bool], timeout_seconds: float,
               progress: Callable[[dict[str, Any]], None] | None) -> TrainOutcome:
    grace = max(1.0, settings.service.shutdown_budget_seconds / 2)
    # settings go in through stdin and stderr comes back through a pipe: no scratch folder,
    # so a parent killed with SIGKILL leaves nothing behind in $TMPDIR
    cmd = [sys.executable, "-m", "daemon.training.worker", "--kind", kind,
           "--settings", "-", "--vectors-factory", vectors_factory]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdin is not None
    try:
        proc.stdin.write(settings_payload(settings))
        proc.stdin.close()
    except OSError:  # the child died before reading: its exit status says why
        pass
    err_tail: collections.deque[str] = collections.deque(maxlen=40)
    err_reader = threading.Thread(target=err_tail.extend, args=(proc.stderr,), daemon=True)
    err_reader.start()
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(proc.stdout, events), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_seconds
    stop_sent: float | None = None
    ending = ""
    result: dict[str, Any] | None = None
    while True:
        try:
            event = events.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            event = None
        if event is not None:
            if event.get("event") == "result":
                result = event
            elif progress is not None:
                progress({**event, "pid": proc.pid})
        elif proc.poll() is not None:
            break
        # checked on every turn: a child that reports progress quickly must not starve
        # a stop request or the timeout
        if stop_sent is None and should_stop():
            proc.send_signal(signal.SIGTERM)
            stop_sent = time.monotonic()
            ending = "stopped"
        elif stop_sent is not None and time.monotonic() - stop_sent > grace:
            proc.kill()
            ending = "stopped"
        elif time.monotonic() > deadline:
            proc.kill()
            ending = "timeout"
    proc.wait()
    reader.join(timeout=5)
    err_reader.join(timeout=5)
    while not events.empty():
        event = events.get_nowait()
        if event.get("event") == "result":
            result = event
    if result is not None and proc.returncode == 0:
        fields = {k: v for k, v in result.items() if k != "event"}
        return TrainOutcome(**fields)
    tail = "".join(err_tail)[-2000:].strip()
    if ending == "timeout":
        return TrainOutcome(kind=kind, status="timeout",
                            reason=f"killed after {timeout_seconds:.0f} s")
    if ending == "stopped":
        return TrainOutcome(kind=kind, status="stopped", reason="stop requested")
    code = proc.returncode
    why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return TrainOutcome(kind=kind, status="crashed",
                        reason=f"training process {why}" + (f": {tail.splitlines()[-1]}"
                                                           if tail else ""))


def train_model(settings: Settings, kind: Kind, *, force: bool = False,
                vectors: VectorSource | None = None,
                should_stop: Callable[[], bool] = lambda: False,
                timeout_seconds: float | None = None,
                vectors_factory: str = DEFAULT_VECTORS_FACTORY,
                progress: Callable[[dict[str, Any]], None] | None = None,
                now: Callable[[], datetime] = lambda: datetime.now(UTC),
                store: StateStore | None = None) -> TrainOutcome:
    """Train ``kind`` if due (or ``force``); record the attempt; never raise for a bad run.

    With ``vectors`` the training runs in this process (callers that already hold a source,
    tests); without, in a child that builds its source from ``vectors_factory``
    (``module:callable(settings, store)``).  The run is recorded through ``store``, the
    caller's one writable store (the daemon passes its own, so no second writer exists in the
    process); a one-shot command (``trainingd train``) without one opens its own, which
    writes only in the two short ``BEGIN IMMEDIATE`` transactions (start, end) that the
    daemon's writer waits on like any other, and closes it at the end."""
    owned = store is None
    if store is None:
        store = StateStore(settings.state_db)
    try:
        decision = policy.retrain_decision(store, settings, kind, now())
        if not force and not decision.due:
            return TrainOutcome(kind=kind, status="not_due", reason=decision.reason)
        marks = policy.label_keys(store, kind)
        run_id = policy.record_run_start(
            store, kind, now(), decision.new_labels,
            abandon_after=timedelta(minutes=settings.training.timeout_minutes))
        log.info("training.started", kind=kind, forced=force, reason=decision.reason,
                 new_labels=decision.new_labels, isolated=vectors is None)
        try:
            if vectors is not None:
                outcome = train_in_process(settings, kind, vectors, should_stop=should_stop,
                                           progress=progress, now=now())
            else:
                limit = timeout_seconds or settings.training.timeout_minutes * 60
                outcome = _run_child(settings, kind, vectors_factory=vectors_factory,
                                     should_stop=should_stop, timeout_seconds=limit,
                                     progress=progress)
        except (TrainingError, OSError, RuntimeError, ValueError) as exc:
            outcome = TrainOutcome(kind=kind, status="failed",
                                   reason=f"{type(exc).__name__}: {exc}")
        policy.record_run_end(store, run_id, status=outcome.status, now=now(),
                              version=outcome.version, promoted=outcome.promoted,
                              reason=outcome.reason, metrics=outcome.metrics, kind=kind,
                              marks=marks)
        log.info("training.finished", kind=kind, status=outcome.status, version=outcome.version,
                 promoted=outcome.promoted, reason=outcome.reason)
        return outcome
    finally:
        if owned:
            store.close()
