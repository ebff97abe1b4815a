"""Issue 11 (throughput with rows arriving): what the watcher costs the embedding while the
reviewer works.  Rows arriving used to cut the backlog's embedding rate: every file the
reviewer created, moved or deleted also sent a "folder modified" event that rescanned the
whole project (every image under its roots, on the fast lane, several times a second), and
every open of a file (the decode threads read each image they embed, the validator opens
the decision DB on each commit) came back as two events parsed in Python on the observer's
threads.  These tests drive a real watchdog observer on real folders."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.watcher import Watcher, WatchPlan, classify
from daemon.workqueue import Task


class _Sink:
    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.lock = threading.Lock()

    def put(self, task: Task) -> None:
        with self.lock:
            self.tasks.append(task)

    def wait_for(self, pred: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if any(pred(t) for t in self.tasks):
                    return
            time.sleep(0.02)
        raise AssertionError(f"no matching task within {timeout}s; got {self.tasks}")

    def barrier(self, plan: WatchPlan, name: str) -> list[Task]:
        """Every event of the triggers folder before the marker has been delivered (its
        watch's queue is in order; another watch's events may come later: wait for those by
        name); returns the tasks seen so far and starts afresh."""
        (plan.triggers_dir / name).write_text("")
        self.wait_for(lambda t: t.kind == "triggers")
        with self.lock:
            seen, self.tasks = self.tasks, []
        return [t for t in seen if t.kind != "triggers"]


@pytest.fixture
def plan(tmp_path: Path) -> WatchPlan:
    decisions, triggers, root = tmp_path / "decisions", tmp_path / "triggers", tmp_path / "img"
    for d in (decisions, triggers, root / "__selected", root / "__delete_staging"):
        d.mkdir(parents=True)
    return WatchPlan(decisions, triggers, {root: "mojo3"})


@pytest.fixture
def inotify(plan: WatchPlan) -> Iterator[tuple[Watcher, _Sink]]:
    sink = _Sink()
    watcher = Watcher(plan, sink.put, observer="inotify")
    watcher.start()
    yield watcher, sink
    watcher.stop()


class TestFolderListingChanges:
    """A file's own event says what changed; its folder's "modified" event rescans nothing."""

    def test_reviewer_file_moves_queue_no_project_rescan(
            self, plan: WatchPlan, inotify: tuple[Watcher, _Sink]) -> None:
        """Images written, moved to __selected/ and __delete_staging/ and deleted (what the
        reviewer does per row) queue image tasks, and no scan of the whole project."""
        _, sink = inotify
        root = next(iter(plan.image_roots))
        sink.barrier(plan, "start")
        for n in range(3):
            names = [f"20250709_10150{n}_stage{s}.png" for s in (1, 2)]
            for name in names:
                (root / f".{name}.tmp").write_bytes(b"png")
                (root / f".{name}.tmp").rename(root / name)
            (root / names[0]).rename(root / "__selected" / names[0])
            (root / names[1]).rename(root / "__delete_staging" / names[1])
            (root / "__delete_staging" / names[1]).unlink()
        last = str(root / "__selected" / "20250709_101502_stage1.png")
        # the trigger barrier alone is not enough here: the image root and the triggers folder
        # are separate watches, and watchdog holds a rename back to pair its two halves, so the
        # marker can overtake the last move; wait for that move, then collect everything
        sink.wait_for(lambda t: last in t.paths)
        seen = sink.barrier(plan, "end")
        assert {t.kind for t in seen} == {"image"}
        assert last in set().union(*(t.paths for t in seen))

    def test_a_new_folder_still_rescans(self, plan: WatchPlan,
                                        inotify: tuple[Watcher, _Sink]) -> None:
        """A folder created, moved in or deleted under a root is still a scan of its project."""
        _, sink = inotify
        root = next(iter(plan.image_roots))
        (root / "__crop").mkdir()
        sink.wait_for(lambda t: t.kind == "scan" and str(root / "__crop") in t.paths)

    def test_classify_drops_a_folders_modified_event(self, plan: WatchPlan) -> None:
        """Pure: a folder's "modified" is None; "created", "moved", "deleted" are scans."""
        folder = str(next(iter(plan.image_roots)) / "__selected")
        assert classify(folder, plan, is_directory=True, event_type="modified") is None
        for event in ("created", "moved", "deleted"):
            task = classify(folder, plan, is_directory=True, event_type=event)
            assert task is not None and task.kind == "scan"


class TestReadsAreNotEvents:
    """Reading a file under a watched folder (what the decode threads do to every image they
    embed) reaches no Python code on the observer's threads."""

    def test_reading_images_delivers_no_events(self, plan: WatchPlan,
                                               inotify: tuple[Watcher, _Sink]) -> None:
        """Open and close-without-write are not subscribed to: a raw handler on the same watch
        sees none of them while an image is read many times."""
        from watchdog.events import FileSystemEventHandler

        watcher, sink = inotify
        root = next(iter(plan.image_roots))
        image = root / "__selected" / "20250709_101500_stage2_upscaled.jpg"
        image.write_bytes(b"jpeg" * 100)
        seen: list[str] = []

        class Raw(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                seen.append(str(event.event_type))

        for emitter in list(watcher.observer.emitters):
            watcher.observer.add_handler_for_watch(Raw(), emitter.watch)
        sink.barrier(plan, "written")
        seen.clear()
        for _ in range(5):
            image.read_bytes()
        sink.barrier(plan, "read")
        assert "opened" not in seen and "closed_no_write" not in seen, seen
