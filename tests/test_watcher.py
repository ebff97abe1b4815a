"""The watcher classifies real file-system events into tasks and never raises; the queue
coalesces bursts without starving a steady stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.decisions.reader import SourceReader
from daemon.decisions.schema import create_v3_db
from daemon.watcher import Watcher, WatchPlan, classify
from daemon.workqueue import Task, WorkQueue


@pytest.fixture
def plan(tmp_path: Path) -> WatchPlan:
    decisions, triggers, root = tmp_path / "decisions", tmp_path / "triggers", tmp_path / "img a"
    for d in (decisions, triggers, root):
        d.mkdir()
    return WatchPlan(decisions, triggers, {root: "mojo3"})


class TestClassify:
    """Path -> task, as a pure function."""

    def test_wal_and_journal_map_to_their_db(self, plan: WatchPlan) -> None:
        for name in ("mojo3.db", "mojo3.db-wal", "mojo3.db-journal"):
            assert classify(str(plan.decisions_dir / name), plan) == Task("validate", "mojo3",
                                                                          throttle=True)

    @pytest.mark.parametrize("name", ["mojo3.db-shm", "mojo3_temp.db", "mojo3.db.backup-1",
                                      ".mojo3.db.tmp", "notes.txt"])
    def test_side_temp_and_foreign_files_are_ignored(self, plan: WatchPlan, name: str) -> None:
        assert classify(str(plan.decisions_dir / name), plan) is None

    def test_reader_events_are_ignored(self, plan: WatchPlan) -> None:
        """Opening, attribute changes and our own close of a -wal are not news."""
        wal = str(plan.decisions_dir / "mojo3.db-wal")
        for event in ("opened", "closed_no_write", "attrib", "closed"):
            assert classify(wal, plan, event_type=event) is None

    def test_image_root_files(self, plan: WatchPlan) -> None:
        root = next(iter(plan.image_roots))
        sidecar = str(root / "__crop" / "20250709_101500_stage2_upscaled.decision")
        image = str(root / "__crop" / "20250709_101500_stage2_upscaled.PNG")
        assert classify(sidecar, plan) == Task("sidecar", "mojo3", paths=frozenset({sidecar}))
        assert classify(image, plan) == Task("image", "mojo3", paths=frozenset({image}))
        assert classify(str(root / "x.yaml"), plan) is None
        assert classify(str(root / "sub"), plan, is_directory=True,
                        event_type="created") == Task(
            "scan", "mojo3", paths=frozenset({str(root / "sub")}))

    def test_trigger_files(self, plan: WatchPlan) -> None:
        assert classify(str(plan.triggers_dir / "retrain"), plan) == Task("triggers")
        assert classify(str(plan.triggers_dir / ".retrain.tmp"), plan) is None

    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        plan = WatchPlan(Path("/d"), Path("/t"), {Path("/r"): "p"})
        for event in ("modified", "created", "closed", "moved"):
            classify(text, plan, event_type=event)
            classify("/r/" + text, plan, is_directory=True)


class Collector:
    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.lock = threading.Lock()

    def put(self, task: Task) -> None:
        with self.lock:
            self.tasks.append(task)

    def wait_for(self, pred: object, timeout: float = 10.0) -> list[Task]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [t for t in self.tasks if pred(t)]  # type: ignore[operator]
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no matching task within {timeout}s; got {self.tasks}")


@pytest.fixture(params=["inotify", "polling"])
def running(plan: WatchPlan, request: pytest.FixtureRequest) -> Iterator[tuple[Watcher, Collector]]:
    sink = Collector()
    watcher = Watcher(plan, sink.put, observer=request.param, polling_interval_seconds=0.1)
    watcher.start()
    yield watcher, sink
    watcher.stop()
    assert not watcher.observer.is_alive()


class TestRealObserver:
    """A real watchdog observer on temp folders (inotify and polling)."""

    def test_a_commit_in_wal_mode_wakes_validation(self, plan: WatchPlan,
                                                   running: tuple[Watcher, Collector]) -> None:
        _, sink = running
        conn = create_v3_db(plan.decisions_dir / "mojo3.db")
        conn.execute("INSERT INTO ai_decisions (group_id, timestamp, project_id, images, "
                     "user_selected_index, user_action, image_width, image_height) "
                     "VALUES ('g', '2025-10-23T20:44:56Z', 'mojo3', '[\"a.png\"]', 0, "
                     "'approve', 10, 10)")
        sink.wait_for(lambda t: t == Task("validate", "mojo3", throttle=True))
        conn.close()

    def test_our_read_only_open_does_not_wake_us(self, plan: WatchPlan,
                                                 running: tuple[Watcher, Collector]) -> None:
        """No feedback loop: reading a DB produces no validate task."""
        conn = create_v3_db(plan.decisions_dir / "mojo3.db")
        conn.execute("CREATE TABLE t (x)")  # leave a -wal behind: the writer stays open
        _, sink = running
        sink.wait_for(lambda t: t.kind == "validate")
        self._barrier(plan, sink, "first")  # everything the writer caused has been delivered
        for _ in range(3):
            with SourceReader(plan.decisions_dir / "mojo3.db") as reader:
                reader.snapshot()
        self._barrier(plan, sink, "second")  # and everything the reads caused, too
        with sink.lock:
            assert not [t for t in sink.tasks if t.kind == "validate"]
        conn.close()

    @staticmethod
    def _barrier(plan: WatchPlan, sink: Collector, name: str) -> None:
        """Events are delivered in order: once a marker's event arrives, earlier ones have."""
        (plan.triggers_dir / name).write_text("")
        sink.wait_for(lambda t: t.kind == "triggers")
        with sink.lock:
            sink.tasks.clear()

    def test_moves_are_classified_by_destination(self, plan: WatchPlan,
                                                 running: tuple[Watcher, Collector]) -> None:
        """A sidecar moving with its image to __cropped/ yields tasks for both places."""
        root = next(iter(plan.image_roots))
        (root / "__crop").mkdir()
        (root / "__cropped").mkdir()
        src = root / "__crop" / "20250709_101500_stage2_upscaled.decision"
        src.write_text('{"group_id": "g"}')
        _, sink = running
        sink.wait_for(lambda t: t.kind == "sidecar" and str(src) in t.paths)
        dest = root / "__cropped" / src.name
        src.rename(dest)
        sink.wait_for(lambda t: t.kind == "sidecar" and str(dest) in t.paths)


class TestWorkQueue:
    """Coalescing with a settle delay and a maximum wait."""

    def test_burst_becomes_one_task_with_merged_paths(self) -> None:
        q = WorkQueue(settle_seconds=0.05, max_wait_seconds=5)
        for i in range(100):
            q.put(Task("image", "p", paths=frozenset({f"/r/{i}.png"})))
        task = q.get(timeout=2)
        assert task is not None and len(task.paths) == 100
        assert q.get(timeout=0.1) is None

    def test_steady_stream_does_not_starve(self) -> None:
        """Events every 10 ms forever: the task still leaves after max_wait."""
        q = WorkQueue(settle_seconds=0.2, max_wait_seconds=0.3)
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                q.put(Task("validate", "p"))
                time.sleep(0.01)

        t = threading.Thread(target=stream)
        t.start()
        try:
            assert q.get(timeout=3) == Task("validate", "p")
        finally:
            stop.set()
            t.join()

    def test_commits_are_throttled_not_debounced(self) -> None:
        """A commit stream every 10 ms is validated settle seconds after its first event,
        long before max_wait."""
        q = WorkQueue(settle_seconds=0.1, max_wait_seconds=30)
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                q.put(Task("validate", "p", throttle=True))
                time.sleep(0.01)

        t = threading.Thread(target=stream)
        t.start()
        try:
            started = time.monotonic()
            assert q.get(timeout=5) is not None
            assert time.monotonic() - started < 5  # 30 s would mean debounced to max_wait
        finally:
            stop.set()
            t.join()

    def test_first_come_first_served_and_triggers_never_merge(self) -> None:
        q = WorkQueue(settle_seconds=0.0, max_wait_seconds=1)
        q.put(Task("validate", "a"))
        q.put(Task("validate", "b"))
        q.put(Task("retrain", trigger="/t/processing/retrain", urgent=True))
        q.put(Task("retrain", trigger="/t/processing/retrain.2", urgent=True))
        got = [q.get(timeout=1) for _ in range(4)]
        assert [(t.kind, t.project) for t in got if t] == [
            ("validate", "a"), ("validate", "b"), ("retrain", None), ("retrain", None)]
