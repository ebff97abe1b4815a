"""Issue 10, item 3: exit codes monitoring can trust.  A typo'd decisions folder or a missing
image root is a configuration error (78, naming the key and the path) for ``validate`` and
``run`` unless ``paths.create_missing`` says to create it; ``status`` follows LSB (0 running,
1 dead or hung, 3 not running, 4 unknown) and still prints its ``--json`` document.  Real
subprocesses, real signals (SIGKILL, SIGSTOP), real heartbeat files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.demo.sample import write_sample_project
from daemon.status import EXIT_DEAD, EXIT_NOT_RUNNING, EXIT_RUNNING, EXIT_UNKNOWN, exit_code
from tests.daemon_harness import Daemon, wait_until, write_config

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    return env


def trainingd(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=config.parent)


def config_with(home: Path, paths: str, extra: str = "") -> Path:
    """A config file with our own [paths] (the harness's one creates missing folders)."""
    path = home / "config.toml"
    path.write_text(f'[paths]\ndata_root = "data"\n{paths}\n[watcher]\nsettle_seconds = 0.2\n'
                    'max_wait_seconds = 1.0\n[service]\nheartbeat_seconds = 0.5\n'
                    f'shutdown_budget_seconds = 10\n{extra}')
    return path


class TestMissingFolders:
    """A path that does not exist is a configuration error, not an empty project list."""

    def test_validate_with_a_typod_decisions_path_exits_78_naming_the_key(
            self, tmp_path: Path) -> None:
        """validate exits 78 with one message naming paths.decisions_dir and the path, and
        creates nothing (it used to print "no project DBs found" and exit 0)."""
        write_sample_project(tmp_path / "data" / "decisions", "demo", rows=5)
        config = config_with(tmp_path, 'decisions_dir = "data/decsions"')
        proc = trainingd(["validate"], config)
        assert proc.returncode == 78, (proc.stdout, proc.stderr)
        assert "paths.decisions_dir = 'data/decsions'" in proc.stderr
        assert str(tmp_path / "data" / "decsions") in proc.stderr
        assert "paths.create_missing" in proc.stderr and proc.stdout == ""
        assert not (tmp_path / "data" / "decsions").exists()

    def test_validate_json_exits_78_too(self, tmp_path: Path) -> None:
        """The timer unit runs validate --json: the same 78, no empty document on stdout."""
        config = config_with(tmp_path, "")
        proc = trainingd(["validate", "--json"], config)
        assert proc.returncode == 78 and proc.stdout == ""
        assert "paths.decisions_dir (unset" in proc.stderr
        assert str(tmp_path / "data" / "training" / "ai_training_decisions") in proc.stderr

    def test_decisions_path_that_is_a_file_exits_78(self, tmp_path: Path) -> None:
        """A file where the folder should be is named as such."""
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "decisions").write_text("not a folder")
        proc = trainingd(["validate"], config_with(tmp_path, 'decisions_dir = "data/decisions"'))
        assert proc.returncode == 78 and "is not a folder" in proc.stderr

    def test_run_with_a_typod_decisions_path_exits_78_naming_the_key(
            self, tmp_path: Path) -> None:
        """run refuses to start (it used to create the folder and run with no projects)."""
        d = Daemon(config_with(tmp_path, 'decisions_dir = "data/decsions"'))
        assert d.proc.wait(60) == 78
        d.stop()
        text = d.log_path.read_text()
        assert "paths.decisions_dir = 'data/decsions'" in text
        assert not (tmp_path / "data" / "decsions").exists()

    def test_run_with_a_missing_image_root_exits_78_naming_the_key(self, tmp_path: Path) -> None:
        """An image root that does not exist (unmounted disk, typo) stops the start."""
        (tmp_path / "data" / "decisions").mkdir(parents=True)
        missing = tmp_path / "photos-typo"
        d = Daemon(config_with(tmp_path, 'decisions_dir = "data/decisions"',
                               f'[projects.p]\nimage_roots = ["{missing}"]\n'))
        assert d.proc.wait(60) == 78
        d.stop()
        text = d.log_path.read_text()
        assert f"projects.p.image_roots[0] = '{missing}'" in text and "no such folder" in text
        assert not missing.exists()

    def test_validate_with_create_missing_creates_the_folder(self, tmp_path: Path) -> None:
        """paths.create_missing = true: the folder is made and validate exits 0."""
        config = config_with(tmp_path, 'decisions_dir = "data/new"\ncreate_missing = true')
        proc = trainingd(["validate"], config)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "data" / "new").is_dir()

    def test_run_with_create_missing_creates_folder_and_image_root(self, tmp_path: Path) -> None:
        """The daemon makes both and runs; SIGTERM still ends it with 0."""
        photos = tmp_path / "photos"
        d = Daemon(config_with(tmp_path, 'decisions_dir = "data/new"\ncreate_missing = true',
                               f'[projects.p]\nimage_roots = ["{photos}"]\n'))
        try:
            d.wait_event("service.started", timeout=60)
            assert (tmp_path / "data" / "new").is_dir() and photos.is_dir()
            created = {r["folder"] for r in d.records()
                       if r.get("event") == "service.folder_created"}
            assert created == {str(tmp_path / "data" / "new"), str(photos)}
            # the model load (torch import) at startup is not interrupted by the stop
            d.wait_for(lambda r: r.get("event") in ("embedding.stage_ready",
                                                    "embedding.stage_disabled"), 180)
        finally:
            assert d.stop() == 0


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Daemon]:
    write_sample_project(tmp_path / "data" / "training" / "ai_training_decisions", "demo",
                         rows=10)
    d = Daemon(write_config(tmp_path / "config.toml"))
    yield d
    if d.proc.poll() is None:
        with_cont(d)
        d.kill()


def with_cont(d: Daemon) -> None:
    os.kill(d.proc.pid, signal.SIGCONT)


def status_json(config: Path) -> tuple[int, dict[str, object]]:
    proc = trainingd(["status", "--json"], config)
    return proc.returncode, json.loads(proc.stdout)


class TestStatusExitCodes:
    """What a monitor reads from ``trainingd status``."""

    def test_no_daemon_ever_is_3(self, tmp_path: Path) -> None:
        """Never started here: LSB "not running" (it used to be 0)."""
        config = write_config(tmp_path / "config.toml")
        code, doc = status_json(config)
        assert code == EXIT_NOT_RUNNING and doc["health"] == "not_started"
        assert trainingd(["status"], config).returncode == EXIT_NOT_RUNNING

    def test_running_then_sigkilled_daemon(self, live: Daemon) -> None:
        """Running: 0.  SIGKILLed (heartbeat left, process gone): 1, and the JSON document is
        still printed, naming the dead pid (it used to exit 0)."""
        live.wait_event("validation.project_checked", project="demo", timeout=60)
        wait_until(lambda: status_json(live.config)[0] == EXIT_RUNNING, 60, "status 0")
        pid = live.proc.pid
        live.kill()
        code, doc = status_json(live.config)
        assert code == EXIT_DEAD and doc["health"] == "dead" and doc["exit_code"] == EXIT_DEAD
        assert doc["daemon"]["pid"] == pid  # type: ignore[index]
        text = trainingd(["status"], live.config)
        assert text.returncode == EXIT_DEAD and text.stdout.startswith("daemon: dead")

    @pytest.mark.slow
    def test_stale_heartbeat_of_a_live_process_is_1(self, live: Daemon) -> None:
        """A process that exists but no longer beats (SIGSTOPped: hung) reads as dead."""
        live.wait_event("validation.project_checked", project="demo", timeout=60)
        wait_until(lambda: status_json(live.config)[0] == EXIT_RUNNING, 60, "status 0")
        os.kill(live.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: status_json(live.config)[1]["health"] == "stale", 60,
                       "a stale heartbeat")
            code, doc = status_json(live.config)
            assert code == EXIT_DEAD and "stale" in str(doc["daemon"]["verdict"])  # type: ignore[index]
        finally:
            with_cont(live)
        wait_until(lambda: status_json(live.config)[0] == EXIT_RUNNING, 60, "beating again")
        assert live.stop() == 0

    def test_clean_stop_is_3(self, live: Daemon) -> None:
        """Stopped by SIGTERM: "not running", not "dead"."""
        live.wait_event("validation.project_checked", project="demo", timeout=60)
        assert live.stop() == 0
        code, doc = status_json(live.config)
        assert code == EXIT_NOT_RUNNING and doc["health"] == "stopped"

    def test_unreadable_heartbeat_is_4(self, tmp_path: Path) -> None:
        """A heartbeat that is not JSON: unknown, with the reason in the verdict."""
        config = write_config(tmp_path / "config.toml")
        beat = tmp_path / "data" / "daemon" / "heartbeat.json"
        beat.parent.mkdir(parents=True)
        beat.write_text("{not json")
        code, doc = status_json(config)
        assert code == EXIT_UNKNOWN and doc["health"] == "unknown"


class TestExitCodeTable:
    """The mapping itself, for every health word and the problems rule."""

    @pytest.mark.parametrize(("health", "problems", "expected"), [
        ("running", [], 0), ("running", ["state DB unreadable"], 4), ("dead", [], 1),
        ("stale", [], 1), ("stalled", [], 1), ("stopped", [], 3), ("not_started", [], 3),
        ("stopped", ["state DB unreadable"], 3), ("unknown", [], 4), ("weird", [], 4)])
    def test_health_to_exit_code(self, health: str, problems: list[str], expected: int) -> None:
        """Each health word maps to its LSB code; problems only matter while it runs."""
        assert exit_code(health, problems) == expected
