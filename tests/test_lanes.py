"""Lanes and the typed task protocol (issue 11): a commit is validated while the heavy lane
embeds a backlog or a model trains; every task kind has one lane and one handler; pause holds
both lanes; SIGTERM ends a heavy task within the stop budget."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import DaemonError
from daemon.health import Progress
from daemon.lanes import Lanes, LaneWorker, ThreadProgress
from daemon.pipeline import Pipeline
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.tasks import LANE_OF, SERVICE_KINDS, Lane, TaskKind, lane_for
from daemon.triggers import ACTIONS, TASK_OF_ACTION
from daemon.workqueue import Task
from tests.daemon_harness import Daemon, Record, wait_until, write_config
from tests.embedding_helpers import make_images

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("lanes_helpers.py")
FAST = {TaskKind.VALIDATE, TaskKind.SIDECAR, TaskKind.IMAGE, TaskKind.SCAN,
        TaskKind.RECONCILE, TaskKind.INSPECT, TaskKind.TRIGGERS, TaskKind.PAUSE,
        TaskKind.RESUME}


class TestProtocol:
    """Adding a kind is one place plus this table: kind -> lane, kind -> handler, action ->
    kind."""

    def test_every_kind_has_a_lane(self) -> None:
        """Each TaskKind is in exactly one lane, and the short kinds are in the fast one."""
        assert set(LANE_OF) == set(TaskKind)
        assert {k for k, lane in LANE_OF.items() if lane is Lane.FAST} == FAST

    def test_every_kind_has_a_handler(self, settings: Settings) -> None:
        """The pipeline's explicit map covers every kind the service does not handle itself."""
        store = StateStore(":memory:")
        try:
            handlers = Pipeline(settings, store, lambda task: None).handlers
        finally:
            store.close()
        assert set(handlers) | SERVICE_KINDS == set(TaskKind)
        assert not set(handlers) & SERVICE_KINDS

    def test_every_trigger_action_maps_to_a_kind(self) -> None:
        """Each trigger action becomes a task kind that has a lane (no string dispatch)."""
        assert set(TASK_OF_ACTION) == set(ACTIONS)
        assert all(TASK_OF_ACTION[a] in LANE_OF for a in ACTIONS)

    def test_an_unknown_kind_fails_in_the_fast_lane(self, settings: Settings) -> None:
        """A kind no handler takes is a failed task with its name, never waiting for embeds."""
        assert lane_for("reboot") is Lane.FAST
        store = StateStore(":memory:")
        try:
            with pytest.raises(DaemonError, match="reboot"):
                Pipeline(settings, store, lambda task: None).run(Task("reboot"), lambda: False)
        finally:
            store.close()

    def test_results_are_typed_and_serialize(self, settings: Settings) -> None:
        """A handler returns a frozen dataclass; to_dict() is what the trigger file holds."""
        store = StateStore(":memory:")
        try:
            pipe = Pipeline(settings, store, lambda task: None)
            result = pipe.run(Task(TaskKind.PAUSE), lambda: False)
        finally:
            store.close()
        assert json.loads(json.dumps(result.to_dict())) == {"paused": True}
        with pytest.raises(AttributeError):
            result.paused = False  # type: ignore[misc]


class TestLaneParts:
    """The lanes route, hold and measure; each lane's stamp is its own."""

    def test_put_routes_by_kind(self) -> None:
        """A validate task lands in the fast queue, an embed task in the heavy one."""
        lanes = Lanes(0.0, 0.0)
        lanes.put(Task(TaskKind.VALIDATE, "p", urgent=True))
        lanes.put(Task(TaskKind.EMBED, "p", urgent=True))
        fast, heavy = lanes[Lane.FAST].queue.get(0.1), lanes[Lane.HEAVY].queue.get(0.1)
        assert fast is not None and fast.kind == "validate"
        assert heavy is not None and heavy.kind == "embed"
        assert lanes.depth() == 0

    def test_hold_and_release(self) -> None:
        """Held tasks merge per key and go back into the lane's queue on release."""
        lane = LaneWorker(Lane.HEAVY, 0.0, 0.0)
        lane.hold(Task(TaskKind.EMBED, "p", paths=frozenset({"a"})))
        lane.hold(Task(TaskKind.EMBED, "p", paths=frozenset({"b"})))
        assert lane.held() == 1 and lane.release() == 1 and lane.held() == 0
        task = lane.queue.get(0.1)
        assert task is not None and task.paths == {"a", "b"}

    def test_a_fast_beat_never_hides_a_heavy_stall(self) -> None:
        """Beats from the fast lane's thread move only the fast lane's stamp."""
        now = [0.0]
        fast, heavy = Progress(lambda: now[0]), Progress(lambda: now[0])
        routed = ThreadProgress()
        routed.bind(heavy)  # this thread is the heavy lane
        now[0] = 100.0

        def fast_lane() -> None:
            routed.bind(fast)
            routed.beat("validating")

        thread = threading.Thread(target=fast_lane)
        thread.start()
        thread.join()
        assert not fast.stalled(45) and heavy.stalled(45)


# -- a real daemon whose heavy work waits on gate files --------------------------------------


def _decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


def _start(home: Path, gates: Path, *, rows: int = 5, images: int = 12,
           service: str = "") -> Daemon:
    from daemon.demo.sample import write_sample_project

    make_images(home / "photos", images)
    write_sample_project(_decisions(home), "demo", rows=rows)
    config = write_config(
        home / "config.toml",
        '[logging]\nlevel = "debug"\n[embedding]\nmodel = "trainingd-tiny"\n'
        'pretrained = "none"\nbatch_size = 4\ndecode_workers = 2\ndevice = "cpu"\n',
        image_roots={"demo": [home / "photos"]})
    # a gated batch is not a stall: the test holds it as long as it needs
    text = config.read_text().replace("[service]\n", "[service]\nstall_seconds = 600\n")
    if service:  # e.g. a shorter stop budget than the harness's default
        text = text.replace("shutdown_budget_seconds = 10\n", service)
    config.write_text(text)
    return _Gated(config, gates)


class _Gated(Daemon):
    def __init__(self, config: Path, gates: Path) -> None:
        import subprocess
        import sys
        import time

        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(HELPER), str(config), str(gates)],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=config.parent)


def _commit_rows(home: Path, count: int, first: int = 9000) -> set[str]:
    """Rows committed the way the reviewer does (WAL, its own connection); their group ids."""
    from daemon.decisions.schema import INSERT_SQL
    from daemon.demo.sample import reviewer_row, row_tuple

    conn = sqlite3.connect(_decisions(home) / "demo.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        groups = set()
        for n in range(first, first + count):
            row = reviewer_row("demo", n, random.Random(n))
            conn.execute(INSERT_SQL, row_tuple(row))
            groups.add(str(row["group_id"]))
        return groups
    finally:
        conn.close()


def _checked(records: list[Record], groups: set[str]) -> int | None:
    """Index of the log record that checked the last of ``groups``, or None."""
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if rec.get("event") == "validation.row_checked" and rec.get("group_id") in groups:
            seen.add(str(rec["group_id"]))
            if seen == groups:
                return i
    return None


def _index(records: list[Record], event: str, **facts: Any) -> int | None:
    return next((i for i, r in enumerate(records) if r.get("event") == event
                 and all(r.get(k) == v for k, v in facts.items())), None)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    _decisions(tmp_path).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def gates(home: Path) -> Path:
    folder = home / "gates"
    folder.mkdir()
    return folder


@pytest.mark.slow
class TestFastLaneUnderLoad:
    """With the heavy lane held inside a batch or a training run, commits are validated."""

    def test_rows_are_validated_while_a_backlog_is_embedded(self, home: Path,
                                                            gates: Path) -> None:
        """The heavy lane waits inside the first batch of 12 images; three new rows are
        validated before that backlog finishes (log order), and the backlog then completes."""
        daemon = _start(home, gates)
        try:
            wait_until(lambda: (gates / "embed.waiting").exists(), timeout=180,
                       what="the heavy lane inside a batch")
            groups = _commit_rows(home, 3)
            daemon.wait_for(lambda r: _checked(daemon.records(), groups) is not None,
                            timeout=60, what="the new rows validated during the backlog")
            assert _index(daemon.records(), "embedding.run_finished") is None
            (gates / "embed.open").touch()
            daemon.wait_event("embedding.run_finished", timeout=120, embedded=12)
            records = daemon.records()
        finally:
            (gates / "embed.open").touch()
            code = daemon.stop()
        finished = _index(records, "embedding.run_finished", embedded=12)
        validated = _checked(records, groups)
        assert validated is not None and finished is not None and validated < finished
        assert code == 0

    def test_rows_are_validated_while_a_model_trains(self, home: Path, gates: Path) -> None:
        """A forced retrain holds the heavy lane (its child waits); new rows are validated
        before the training run ends."""
        (gates / "embed.open").touch()
        daemon = _start(home, gates, images=2)
        try:
            daemon.wait_event("embedding.run_finished", timeout=180)
            (home / "data" / "triggers" / "retrain.json").write_text(
                '{"model": "ranker", "force": true}')
            wait_until(lambda: (gates / "train.waiting").exists(), timeout=120,
                       what="the training child inside its run")
            groups = _commit_rows(home, 3)
            daemon.wait_for(lambda r: _checked(daemon.records(), groups) is not None,
                            timeout=60, what="the new rows validated during training")
            result = home / "data" / "triggers" / "done" / "retrain.json.result.json"
            assert not result.exists()
            (gates / "train.open").touch()
            wait_until(result.exists, timeout=120, what="the retrain's result")
        finally:
            (gates / "train.open").touch()
            code = daemon.stop()
        assert json.loads(result.read_text())["result"]["status"] == "failed"
        assert code == 0


@pytest.mark.slow
class TestStopAndPause:
    """SIGTERM and pause act on both lanes."""

    def test_sigterm_during_a_heavy_task_ends_within_the_budget(self, home: Path,
                                                                gates: Path) -> None:
        """The heavy lane is stuck in a model call: SIGTERM still ends the process, and the
        log names the lane it left behind."""
        daemon = _start(home, gates)
        try:
            wait_until(lambda: (gates / "embed.waiting").exists(), timeout=180,
                       what="the heavy lane inside a batch")
            daemon.signal(signal.SIGTERM)
            code = daemon.proc.wait(60)  # budget 10 s; the bound only keeps CI from hanging
        finally:
            (gates / "embed.open").touch()
            if daemon.proc.poll() is None:
                daemon.kill()
            else:
                daemon.log_file.close()
        left = [r for r in daemon.records() if r.get("event") == "service.shutdown_budget_exceeded"]
        assert code == 1 and [r["lane"] for r in left] == ["heavy"]
        assert left[0]["task"] == "embed"

    def test_pause_holds_and_resume_releases_both_lanes(self, home: Path, gates: Path) -> None:
        """While paused, new rows (fast lane) and a summary (heavy lane) are held; resume
        runs both."""
        (gates / "embed.open").touch()
        daemon = _start(home, gates, images=2)
        triggers = home / "data" / "triggers"
        heartbeat = home / "data" / "daemon" / "heartbeat.json"

        def lanes() -> dict[str, Any]:
            try:
                doc = json.loads(heartbeat.read_text())
            except (OSError, ValueError):
                return {}
            got: dict[str, Any] = doc.get("lanes") or {}
            return got

        try:
            daemon.wait_event("embedding.run_finished", timeout=180)
            (triggers / "pause").write_text("")
            wait_until((triggers / "done" / "pause.result.json").exists, timeout=60,
                       what="paused")
            groups = _commit_rows(home, 2)
            (triggers / "summary").write_text("")
            wait_until(lambda: lanes().get("fast", {}).get("held_tasks", 0) >= 1
                       and lanes().get("heavy", {}).get("held_tasks", 0) >= 1,
                       timeout=60, what="a task held in each lane")
            assert _checked(daemon.records(), groups) is None
            assert not (triggers / "done" / "summary.result.json").exists()
            (triggers / "resume").write_text("")
            wait_until((triggers / "done" / "summary.result.json").exists, timeout=120,
                       what="the held summary run after resume")
            daemon.wait_for(lambda r: _checked(daemon.records(), groups) is not None,
                            timeout=60, what="the held rows validated after resume")
        finally:
            code = daemon.stop()
        assert code == 0


@pytest.mark.slow
class TestShutdownWhileLoadingTheModel:
    """A SIGTERM while the heavy lane is still loading the model (a cold torch import on a busy
    box takes longer than the stop budget): a clean stop, since nothing was being written."""

    def test_sigterm_during_the_model_load_exits_zero(self, home: Path, gates: Path) -> None:
        """Exit 0 within the budget, the step named as left behind, no "budget exceeded"."""
        (gates / "gate_load").touch()
        daemon = _start(home, gates, service="shutdown_budget_seconds = 2\n")
        try:
            wait_until(lambda: (gates / "load.waiting").exists(), timeout=180,
                       what="the heavy lane inside the model load")
            daemon.signal(signal.SIGTERM)
            code = daemon.proc.wait(60)
        finally:
            (gates / "load.open").touch()
            if daemon.proc.poll() is None:
                daemon.kill()
            else:
                daemon.log_file.close()
        events = [r.get("event") for r in daemon.records()]
        assert "service.shutdown_budget_exceeded" not in events
        left = [r for r in daemon.records() if r.get("event") == "service.step_left_behind"]
        assert [(r["lane"], r["step"]) for r in left] == [
            ("heavy", "loading the embedding model")]
        assert code == 0
