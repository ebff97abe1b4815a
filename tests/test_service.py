"""``trainingd run`` as systemd would run it: a real process, real signals, a real notify
socket, real files dropped in while it runs."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.demo.sample import write_sample_project
from tests.conftest import fixture_path
from tests.daemon_harness import Daemon, wait_until, write_config

#: 376 lines of the real crop log; 95 of them repeat an image logged earlier in it.
CROP_LOG = fixture_path("legacy", "select_crop_log_subset.csv")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "data" / "training" / "ai_training_decisions").mkdir(parents=True)
    return tmp_path


def decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


@pytest.fixture
def daemon(home: Path) -> Iterator[Daemon]:
    write_sample_project(decisions(home), "demo", rows=40)
    d = Daemon(write_config(home / "config.toml"))
    yield d
    if d.proc.poll() is None:
        d.kill()


class TestLifecycle:
    """Startup, signals, reload and exit codes."""

    def test_notify_protocol_and_clean_sigterm(self, home: Path) -> None:
        """READY, STATUS and WATCHDOG reach a real notify socket; SIGTERM exits 0."""
        write_sample_project(decisions(home), "demo", rows=10)
        sock_path = home / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(20)
        d = Daemon(write_config(home / "config.toml"),
                   env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        try:
            messages: list[str] = []
            while not any("WATCHDOG=1" in m for m in messages):
                messages.append(sock.recv(4096).decode())
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=" in ready and f"MAINPID={d.proc.pid}" in ready
            d.signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0
            while not any("STOPPING=1" in m for m in messages):
                messages.append(sock.recv(4096).decode())
        finally:
            sock.close()
            d.stop()
        assert d.wait_event("service.stopped")["exit_code"] == 0

    def test_reload_on_sighup_and_bad_reload_keeps_running(self, home: Path,
                                                           daemon: Daemon) -> None:
        daemon.wait_event("validation.project_checked", project="demo")
        img = home / "img"
        img.mkdir()
        write_config(daemon.config, image_roots={"demo": [img]})
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("service.reloaded")
        daemon.wait_for(lambda r: r.get("event") == "watcher.started" and str(img) in
                        r.get("folders", []), what="watcher on the new image root")
        daemon.config.write_text("[validation]\nchunk_rowz = 1\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("service.reload_failed")
        assert "validation.chunk_rowz" in failed["error"]
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0

    def test_bad_config_exits_78(self, home: Path) -> None:
        d = Daemon(write_config(home / "config.toml", "[sources]\nbusy_timout_ms = 1\n"))
        assert d.proc.wait(30) == 78
        d.stop()
        assert "sources.busy_timout_ms" in d.log_path.read_text()

    def test_status_shows_the_live_daemon(self, home: Path, daemon: Daemon) -> None:
        import subprocess
        import sys

        daemon.wait_event("validation.project_checked", project="demo")
        heartbeat = home / "data" / "daemon" / "heartbeat.json"
        wait_until(heartbeat.exists, what="heartbeat")
        out = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--config",
                              str(daemon.config)], capture_output=True, text=True, timeout=60)
        doc = json.loads(out.stdout)
        assert doc["daemon"]["verdict"] == "running" and doc["daemon"]["pid"] == daemon.proc.pid
        assert doc["daemon"]["observer_alive"] and doc["daemon"]["worker_alive"]
        assert {p["project"]: p["rows"] for p in doc["projects"]}["demo"] == 52
        daemon.stop()
        assert json.loads(heartbeat.read_text())["state"] == "stopped"


class TestWork:
    """Files dropped in while it runs are worked within about a second."""

    def test_new_rows_are_validated_promptly(self, home: Path, daemon: Daemon) -> None:
        daemon.wait_event("validation.project_checked", project="demo")
        import random

        from daemon.decisions.schema import INSERT_SQL
        from daemon.demo.sample import reviewer_row, row_tuple

        conn = sqlite3.connect(decisions(home) / "demo.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        for n in range(3):
            conn.execute(INSERT_SQL, row_tuple(reviewer_row("demo", 5000 + n, random.Random(n))))
        daemon.wait_for(lambda r: r.get("event") == "validation.project_checked"
                        and r.get("rows_total") == 55, timeout=10, what="3 new rows")
        conn.close()
        assert daemon.stop() == 0

    def test_triggers_are_consumed(self, home: Path, daemon: Daemon) -> None:
        daemon.wait_event("validation.project_checked", project="demo")
        triggers = home / "data" / "triggers"
        (triggers / "inspect.json").write_text('{"project": "demo"}')
        (triggers / "reboot").write_text("")
        (triggers / "backfill.json").write_text('{"csv": ["/etc/passwd"]}')
        done, failed = triggers / "done", triggers / "failed"
        wait_until(lambda: (done / "inspect.json.result.json").exists()
                   and (failed / "reboot.result.json").exists()
                   and (failed / "backfill.json.result.json").exists(), what="trigger results")
        result = json.loads((done / "inspect.json.result.json").read_text())
        assert result["status"] == "done" and Path(result["result"]["json"]).exists()
        assert "outside the configured data roots" in json.loads(
            (failed / "backfill.json.result.json").read_text())["error"]
        assert daemon.stop() == 0

    def test_backfill_trigger_writes_a_new_db_that_is_then_validated(
        self, home: Path, daemon: Daemon
    ) -> None:
        """The backfill trigger runs the same conversion with the same safety rules: the CSV
        must lie inside the data roots; the new DB appears in <data_root>/backfill (never in
        the reviewer's decisions folder) and is validated once the operator moves it there."""
        daemon.wait_event("validation.project_checked", project="demo")
        legacy = home / "data" / "legacy"
        legacy.mkdir()
        shutil.copy(CROP_LOG, legacy)
        (home / "data" / "triggers" / "backfill.json").write_text(json.dumps(
            {"csv": [str(legacy / CROP_LOG.name)], "project": "mojo1", "execute": True}))
        done = home / "data" / "triggers" / "done" / "backfill.json.result.json"
        wait_until(done.exists, timeout=60, what="backfill trigger done")
        result = json.loads(done.read_text())["result"]
        assert result["converted"] + result["rejected"] == 376 and result["converted"] >= 281
        made = home / "data" / "backfill" / "mojo1.db"
        assert result["created"] == [str(made)]
        assert not (decisions(home) / "mojo1.db").exists()
        made.rename(decisions(home) / "mojo1.db")  # the operator's step, as the reviewer's user
        daemon.wait_event("validation.project_checked", project="mojo1",
                          rows_checked=result["converted"], errors=0)
        assert daemon.stop() == 0

    def test_pause_defers_work_and_resume_runs_it(self, home: Path, daemon: Daemon) -> None:
        daemon.wait_event("validation.project_checked", project="demo")
        triggers = home / "data" / "triggers"
        (triggers / "pause").write_text("")
        daemon.wait_event("pipeline.paused")
        (triggers / "validate.json").write_text('{"project": "demo", "full": true}')
        wait_until(lambda: (triggers / "processing" / "validate.json").exists(),
                   what="claimed while paused")
        assert not (triggers / "done" / "validate.json").exists()
        (triggers / "resume").write_text("")
        wait_until(lambda: (triggers / "done" / "validate.json.result.json").exists(),
                   what="deferred trigger run after resume")
        assert daemon.stop() == 0


class TestFaults:
    """Broken inputs and lost state: reported or rebuilt, never fatal."""

    def test_corrupt_db_for_one_project_others_go_on(self, home: Path, daemon: Daemon) -> None:
        (decisions(home) / "broken.db").write_bytes(b"garbage" * 500)
        daemon.wait_event("validation.db_unreadable", project="broken")
        daemon.wait_event("validation.project_checked", project="demo")
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0

    def test_state_db_deleted_while_stopped_is_rebuilt(self, home: Path, daemon: Daemon) -> None:
        daemon.wait_event("validation.project_checked", project="demo", rows_checked=52)
        assert daemon.stop() == 0
        state = home / "data" / "daemon"
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (state / name).unlink(missing_ok=True)
        again = Daemon(daemon.config)
        try:
            again.wait_event("store.migration_applied", name="0001_validation_state")
            again.wait_event("validation.project_checked", project="demo", rows_checked=52)
        finally:
            assert again.stop() == 0

    def test_db_locked_by_a_writer_for_ten_seconds(self, home: Path) -> None:
        """A rollback-journal DB held EXCLUSIVE for 10 s: retried (not failed, not skipped),
        validated once the writer lets go; the daemon stays healthy throughout."""
        path, _ = write_sample_project(decisions(home), "locked", rows=5, faults=False)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        d = Daemon(write_config(home / "config.toml"))
        try:
            d.wait_event("service.started")
            wait_until(lambda: time.monotonic() - locked_at >= 10, timeout=30, what="10 s")
            assert d.proc.poll() is None
            assert not [r for r in d.records() if r.get("event") in
                        ("validation.project_checked", "validation.db_unreadable",
                         "validation.source_busy")]
            conn.execute("COMMIT")
            d.wait_event("validation.project_checked", project="locked", rows_checked=5)
        finally:
            conn.close()
            assert d.stop() == 0


class TestSidecarFaults:
    """Floods and broken folders under an image root."""

    @pytest.fixture
    def photo_daemon(self, home: Path) -> Iterator[tuple[Daemon, Path]]:
        photos = home / "photos"
        (photos / "__crop").mkdir(parents=True)
        write_sample_project(decisions(home), "demo", rows=5, faults=False)
        config = write_config(home / "config.toml", image_roots={"demo": [photos]})
        # a reconcile every 3 s: what an overflowed inotify queue falls back on
        config.write_text(config.read_text().replace(
            "max_wait_seconds = 1.0", "max_wait_seconds = 1.0\nreconcile_minutes = 0.05"))
        d = Daemon(config)
        d.wait_event("service.started")
        yield d, photos
        if d.proc.poll() is None:
            d.kill()

    @staticmethod
    def sidecar_count(home: Path) -> int:
        try:
            conn = sqlite3.connect(f"file:{home / 'data' / 'daemon' / 'state.db'}?mode=ro",
                                   uri=True)
            try:
                return int(conn.execute("SELECT count(*) FROM sidecars WHERE gone_at IS NULL")
                           .fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error:
            return -1

    def test_ten_thousand_sidecars_at_once(self, home: Path,
                                           photo_daemon: tuple[Daemon, Path]) -> None:
        """Every one is recorded (events or the reconcile) and reported as an orphan."""
        d, photos = photo_daemon
        body = json.dumps({"group_id": "x", "project_id": "demo", "needs_crop": True})
        for i in range(10_000):
            (photos / "__crop" / f"20250101_{i:06d}_stage2_upscaled.decision").write_text(body)
        wait_until(lambda: self.sidecar_count(home) == 10_000, timeout=120,
                   what="10,000 sidecars recorded")
        assert d.proc.poll() is None
        assert d.stop() == 0

    def test_sidecar_folder_becomes_unreadable(self, home: Path,
                                               photo_daemon: tuple[Daemon, Path]) -> None:
        """The folder turns into a symlink loop (ELOOP: what root can feel of 'unreadable'):
        the daemon keeps running, the sidecars are marked gone, and come back with it."""
        d, photos = photo_daemon
        crop = photos / "__crop"
        (crop / "20250101_000001_stage2_upscaled.decision").write_text(
            json.dumps({"group_id": "x", "project_id": "demo", "needs_crop": True}))
        wait_until(lambda: self.sidecar_count(home) == 1, what="sidecar recorded")
        crop.rename(home / "saved")  # out of the image root
        crop.symlink_to(crop)  # every access: too many levels of symbolic links
        wait_until(lambda: self.sidecar_count(home) == 0, timeout=60, what="marked gone")
        assert d.proc.poll() is None
        crop.unlink()
        (home / "saved").rename(crop)
        wait_until(lambda: self.sidecar_count(home) == 1, timeout=60, what="back again")
        assert d.stop() == 0
