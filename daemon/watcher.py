"""File-system events -> tasks.  Classifies and enqueues; never raises, never does work.

Events are wake-ups: what happened is decided later by queries against the state DB and a
look at the file.  ``X.db-wal`` and ``X.db-journal`` mean ``X.db`` changed (a WAL commit touches
only the WAL); ``-shm``, dot-files and temp files are ignored; a move is classified by its
destination (and its source, which has just lost a file).  Open/close-without-write events are
dropped, so trainingd's own read-only opens never wake it up; on inotify they are not even
subscribed to (``WATCHED_EVENTS``): the decode threads open every image they embed and the
validator opens the decision DB on every commit, and each open cost two events parsed and
dispatched in Python on the observer's threads, competing with the decode threads for the CPU
and the GIL.  A folder's "modified" event (inotify sends one for the parent of every file
created, moved, deleted or closed after a write) is not news either: the file's own event says
what changed, while classifying it as a folder change rescanned the whole project (every image
under its roots) several times a second while rows arrived.  A handler that raised would kill
the observer thread silently; the service's health tick checks the observer anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.decisions.schema import is_live_db_name, project_name_from_db
from daemon.files import IMAGE_SUFFIXES
from daemon.workqueue import Task

log = structlog.get_logger("watcher")

_TEMP_SUFFIXES = (".tmp", ".part", ".swp", "~", ".crdownload")
# opened/closed_no_write/attrib are what a reader causes (ours included: a read-only SQLite open
# touches -wal and -shm attributes); every real write also produces "modified"
_IGNORED_EVENTS = {"opened", "closed_no_write", "attrib"}


def watched_events() -> list[Any]:
    """The watchdog event classes the observer asks for (its inotify mask follows them):
    everything but opens and closes without a write."""
    from watchdog import events as ev

    return [ev.FileCreatedEvent, ev.DirCreatedEvent, ev.FileModifiedEvent, ev.DirModifiedEvent,
            ev.FileMovedEvent, ev.DirMovedEvent, ev.FileDeletedEvent, ev.DirDeletedEvent,
            ev.FileClosedEvent]


@dataclass(frozen=True, slots=True)
class WatchPlan:
    decisions_dir: Path
    triggers_dir: Path
    image_roots: dict[Path, str] = field(default_factory=dict)  # root -> project

    def folders(self) -> list[tuple[Path, bool]]:
        """``(folder, recursive)`` to schedule."""
        return [(self.decisions_dir, False), (self.triggers_dir, False),
                *((root, True) for root in self.image_roots)]


def _is_temp(name: str) -> bool:
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


def classify(path: str, plan: WatchPlan, *, is_directory: bool = False,
             event_type: str = "modified") -> Task | None:
    """The task an event on ``path`` asks for, or None.  Pure; never raises for any string."""
    try:
        if event_type in _IGNORED_EVENTS:
            return None
        p = Path(path)
        name = p.name
        if not name or _is_temp(name):
            return None
        parent = p.parent
        if parent == plan.decisions_dir:
            # our own read-only open closes a -wal it opened for writing: "closed" is not news
            if is_directory or name.endswith("-shm") or event_type == "closed":
                return None
            for side in ("-wal", "-journal"):
                if name.endswith(side):
                    name = name[: -len(side)]
            if is_live_db_name(name):
                return Task("validate", project_name_from_db(Path(name)), throttle=True)
            return None
        if parent == plan.triggers_dir:
            return None if is_directory else Task("triggers")
        for root, project in plan.image_roots.items():
            if p == root or root in p.parents:
                if is_directory:
                    # a folder created, moved or deleted: rescan; its listing changed
                    # ("modified"): the file event that changed it is classified on its own
                    if event_type == "modified":
                        return None
                    return Task("scan", project, paths=frozenset({path}))
                suffix = p.suffix.lower()
                if suffix == ".decision":
                    return Task("sidecar", project, paths=frozenset({path}))
                if suffix in IMAGE_SUFFIXES:
                    return Task("image", project, paths=frozenset({path}))
                return None
        return None
    except Exception:  # a watcher must not die on a strange path
        log.warning("watcher.path_unclassifiable", path=repr(path))
        return None


def _make_handler(plan: WatchPlan, put: Callable[[Task], None]) -> Any:
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            try:
                if event.event_type in _IGNORED_EVENTS:
                    return
                paths = [event.src_path]
                if getattr(event, "dest_path", ""):
                    paths.append(event.dest_path)
                for raw in paths:
                    text = raw.decode() if isinstance(raw, bytes) else str(raw)
                    task = classify(text, plan, is_directory=bool(event.is_directory),
                                    event_type=str(event.event_type))
                    if task is not None:
                        put(task)
            except Exception:  # see the module docstring
                log.exception("watcher.event_dropped", event=repr(event)[:200])

    return Handler()


class Watcher:
    """A watchdog observer over the plan's folders (inotify, or polling for network mounts)."""

    def __init__(self, plan: WatchPlan, put: Callable[[Task], None], *, observer: str = "auto",
                 polling_interval_seconds: float = 2.0) -> None:
        self.plan = plan
        self.put = put
        self.kind = observer
        self.polling_interval = polling_interval_seconds
        self.observer: Any = None
        self.watched: list[str] = []

    def start(self) -> None:
        if self.kind == "polling":
            from watchdog.observers.polling import PollingObserver

            self.observer = PollingObserver(timeout=self.polling_interval)
        elif self.kind == "inotify":
            from watchdog.observers.inotify import InotifyObserver

            self.observer = InotifyObserver()
        else:
            from watchdog.observers import Observer

            self.observer = Observer()
        handler = _make_handler(self.plan, self.put)
        for folder, recursive in self.plan.folders():
            if folder.is_dir():
                self.observer.schedule(handler, str(folder), recursive=recursive,
                                       event_filter=watched_events())
                self.watched.append(str(folder))
            else:
                log.warning("watcher.folder_missing", folder=str(folder),
                            hint="created later, it is picked up by the periodic reconcile")
        self.observer.daemon = True
        self.observer.start()
        log.info("watcher.started", observer=type(self.observer).__name__,
                 folders=self.watched)

    def is_alive(self) -> bool:
        return self.observer is not None and bool(self.observer.is_alive())

    def stop(self, timeout: float = 5.0) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout)
