"""What a running service says about itself: the heartbeat file, the systemd status line and the
live facts behind /metrics and /healthz; and the read side that ``trainingd status`` uses.

Split from :mod:`daemon.service`, which runs the threads; everything here only reads them (the
listener's threads call :func:`live_facts` too, so nothing here waits on a lane).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__
from daemon.fsutil import atomic_write_text
from daemon.settings import Settings
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.lanes import LaneWorker
    from daemon.metrics import LiveFacts
    from daemon.service import Service

log = structlog.get_logger("service")


def heartbeat_path(settings: Settings) -> Path:
    return settings.state_db.parent / "heartbeat.json"



def status_line(svc: Service) -> str:
    working = ", ".join(f"{lane.name}: {lane.current.kind if lane.current else 'idle'}"
                        for lane in svc.lanes)
    return (f"{'paused' if svc.pipeline.paused else 'running'}; queue {svc.lanes.depth()}"
            f"; working: {working}; last event: {svc.lanes.last_event or '-'}")


def live_facts(svc: Service, quiet_limit: float) -> LiveFacts:
    """What the threads and the queues look like now, for /metrics and /healthz (called
    from the listener's threads and the main loop: reads only, never waits on a lane)."""
    from daemon.metrics import LiveFacts

    busy = svc.lanes.busiest()
    current = busy.current if busy else None
    quiet = {lane.name: lane.progress.quiet_seconds() if lane.current else 0.0
             for lane in svc.lanes}
    return LiveFacts(
        queue_by_kind=svc.lanes.depth_by_kind(),
        current_kind=current.kind if current else None,
        current_seconds=busy.elapsed() if busy and current else None,
        quiet_seconds=max(quiet.values(), default=0.0),
        no_progress=any(lane.current is not None and lane.progress.stalled(quiet_limit)
                        for lane in svc.lanes),
        observer_alive=svc.watcher.is_alive(), worker_alive=svc.lanes.all_alive(),
        stalled=svc.stalled, state_db_problem=svc.store.check_file(),
        paused=svc.pipeline.paused,
        embedding_disabled=svc.pipeline.embedding_disabled is not None,
        quiet_by_lane=quiet,
        running_by_lane={lane.name: (lane.current.kind, lane.elapsed())
                         for lane in svc.lanes if lane.current is not None})


def lane_facts(lane: LaneWorker) -> dict[str, Any]:
    current = lane.current
    return {"queue_depth": lane.queue.depth(), "queued_kinds": lane.queue.pending_kinds(),
            "current_task": current.kind if current else None,
            "current_project": current.project if current else None,
            "current_seconds": round(lane.elapsed(), 1) if current else None,
            "seconds_since_progress": (round(lane.progress.quiet_seconds(), 1)
                                       if current else None),
            "held_tasks": lane.held(), "alive": lane.is_alive()}


def write_heartbeat(svc: Service, state: str) -> None:
    # the keys of the one-worker days stay (status --json readers): they describe the
    # lane whose task has run longest; "lanes" has each lane's own
    busy = svc.lanes.busiest()
    current = busy.current if busy else None
    last_at = svc.lanes.last_event_at
    doc = {
        "pid": os.getpid(), "version": __version__, "state": state,
        "started_at": iso_utc(svc.started_at), "updated_at": iso_utc(datetime.now(UTC)),
        "heartbeat_seconds": svc.settings.service.heartbeat_seconds,
        "queue_depth": svc.lanes.depth(), "queued_kinds": svc.lanes.pending_kinds(),
        "current_task": current.kind if current else None,
        "current_project": current.project if current else None,
        "last_event": svc.lanes.last_event,
        "last_event_at": (datetime.fromtimestamp(last_at, UTC).isoformat()
                          if last_at else None),
        "observer_alive": svc.watcher.is_alive(), "worker_alive": svc.lanes.all_alive(),
        "tasks_done": svc.tasks_done, "tasks_failed": svc.tasks_failed,
        "deferred_tasks": svc.lanes.held(), "paused": svc.pipeline.paused,
        "retrying_tasks": svc.backoff.retrying(),
        "seconds_since_progress": (round(busy.progress.quiet_seconds(), 1)
                                   if busy else None),
        "embedding_disabled": svc.pipeline.embedding_disabled,
        "config_file": str(svc.config_path) if svc.config_path else None,
        # the model as the heavy lane loaded it (status must not import torch to know it)
        "model": svc.pipeline.model.to_dict(),
        "embedding_rate": svc.pipeline.embed_rate.to_dict(),
        "lanes": {lane.name: lane_facts(lane) for lane in svc.lanes},
        "stalled_lane": svc.stalled_lane.name if svc.stalled_lane else None,
    }
    try:
        atomic_write_text(heartbeat_path(svc.settings), json.dumps(doc, indent=2) + "\n")
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
