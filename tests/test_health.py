"""Issue 9, items 3 and part of 1: only regular files are opened in image roots, health means
*work is moving*, SIGTERM ends the process whatever the worker does, and a reload that fails in
any way keeps the old configuration.  Real FIFOs, sockets and symlinks; real subprocesses,
signals and notify sockets; the only seam is the Embedder protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.backfill.run import ImageSizer
from daemon.demo.sample import write_sample_project
from daemon.embedding.decode import DecodeOptions, Job, prepare
from daemon.files import NotRegularFileError, read_regular, sha256_file
from daemon.health import Progress, describe_stall
from daemon.records import ImageCandidate
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.training.runner import _run_child
from daemon.workqueue import Task
from tests.daemon_harness import wait_until, write_config
from tests.embedding_helpers import make_images
from tests.health_helpers import ROOT, Launched, release, tiny_embedding_toml

IMAGE = "20250101_000000_stage2_upscaled.png"


def _decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    _decisions(tmp_path).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO named like an image; released at the end so no reader stays blocked on it."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    path = folder / IMAGE
    os.mkfifo(path)
    yield path
    release(path)


def _prepare_in_thread(path: Path) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    job = Job(ImageCandidate("p", path.name, path, 1))
    opts = DecodeOptions(32, True, 10_000_000)
    thread = threading.Thread(target=lambda: out.append(
        prepare(job, opts, lambda sha: False, lambda image: image)), daemon=True)
    thread.start()
    thread.join(10)
    return thread, out


class TestRegularFilesOnly:
    """A FIFO, socket, device or symlink in an image root is an issue record, never a hang."""

    def test_fifo_named_like_an_image_becomes_image_not_regular(self, fifo: Path) -> None:
        """Decoding a FIFO x.png returns at once with the code image_not_regular."""
        thread, out = _prepare_in_thread(fifo)
        assert not thread.is_alive(), "prepare() blocked on the FIFO"
        assert [getattr(o, "code", None) for o in out] == ["image_not_regular"]
        assert "FIFO" in str(getattr(out[0], "message", ""))

    def test_socket_and_symlink_become_image_not_regular(self, tmp_path: Path) -> None:
        """A UNIX socket and a symbolic link named like images are refused by kind."""
        sock_path = tmp_path / "a_stage2_upscaled.png"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(sock_path))
        link = tmp_path / "b_stage2_upscaled.png"
        target = make_images(tmp_path / "real", 1)[0]
        link.symlink_to(target)
        try:
            for path, what in ((sock_path, "socket"), (link, "symbolic link")):
                thread, out = _prepare_in_thread(path)
                assert not thread.is_alive()
                assert getattr(out[0], "code", None) == "image_not_regular"
                assert what in str(getattr(out[0], "message", ""))
        finally:
            sock.close()

    def test_character_device_is_refused_before_reading(self, tmp_path: Path) -> None:
        """A device node named like an image (here /dev/zero's numbers) is never read."""
        dev = tmp_path / IMAGE
        try:
            os.mknod(dev, 0o600 | 0o020000, os.makedev(1, 5))
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
        with pytest.raises(NotRegularFileError, match="character device"):
            read_regular(dev)

    def test_hashing_a_fifo_raises_instead_of_blocking(self, fifo: Path) -> None:
        """The one image-hash helper (used by `trainingd embed --verify`) refuses a FIFO."""
        with pytest.raises(NotRegularFileError, match="FIFO"):
            sha256_file(fifo)

    def test_backfill_size_lookup_skips_a_fifo(self, fifo: Path) -> None:
        """The backfill's image-size lookup answers without a size for a FIFO, at once."""
        sizer = ImageSizer((fifo.parent,))
        out: list[object] = []
        thread = threading.Thread(target=lambda: out.append(sizer("p", fifo.name)), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the size lookup blocked on the FIFO"
        assert len(out) == 1 and not isinstance(out[0], tuple)  # no size: None or a problem


class TestProgress:
    """The progress stamp and the stall report, in process."""

    def test_a_declared_long_step_is_not_a_stall_until_its_bound(self) -> None:
        """allow() holds off a stall for its bound; after it, silence is a stall."""
        now = [0.0]
        p = Progress(clock=lambda: now[0])
        p.allow(100, "loading the model")
        now[0] = 50
        assert not p.stalled(10)
        now[0] = 101
        assert p.stalled(10)
        p.beat()
        assert not p.stalled(10)

    def test_stall_report_names_task_paths_and_stack(self) -> None:
        """The report carries task kind, project, paths, trigger, quiet time and a stack."""
        now = [5.0]
        p = Progress(clock=lambda: now[0])
        p.beat("embedding")
        now[0] = 17.0
        task = Task("embed", "p", paths=frozenset({"/a.png", "/b.png"}), trigger="/t.json")
        facts = describe_stall(task, p, threading.current_thread(), 1.0)
        assert facts["task"] == "embed" and facts["project"] == "p"
        assert facts["paths"] == ["/a.png", "/b.png"] and facts["trigger"] == "/t.json"
        assert facts["seconds_since_progress"] == 12.0 and facts["last_progress"] == "embedding"
        assert any("test_stall_report_names_task_paths_and_stack" in line
                   for line in facts["worker_stack"])

    @pytest.mark.slow
    def test_a_long_training_run_is_not_a_stall(self, settings: Settings, store: StateStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """A training process busy for twice the stall limit keeps the stamp fresh through
        the runner's poll loop (the service hands it this should_stop)."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        progress = Progress()
        stalled: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                if progress.stalled(2.0):
                    stalled.append(progress.quiet_seconds())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            outcome = _run_child(settings, "ranker",
                                 vectors_factory="tests.health_helpers:slow_vectors",
                                 should_stop=progress.should_stop(lambda: False),
                                 timeout_seconds=60, progress=None)
        finally:
            done.set()
            watcher.join()
        assert outcome.status == "failed" and "no vectors in this test" in (outcome.reason or "")
        assert stalled == []


def _notify_socket(home: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(home / "notify.sock"))
    sock.settimeout(0.2)
    return sock


def _drain(sock: socket.socket, into: list[str]) -> None:
    while True:
        try:
            into.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return


@pytest.mark.slow
class TestStalledWorker:
    """A worker truly blocked in the kernel: the pings stop, exit 70; SIGTERM always ends it."""

    def _start(self, home: Path, fifo: Path, extra: str, env: dict[str, str] | None = None
               ) -> Launched:
        make_images(fifo.parent, 1)
        write_sample_project(_decisions(home), "demo", rows=5)
        config = write_config(home / "config.toml", tiny_embedding_toml() + extra,
                              image_roots={"demo": [fifo.parent]})
        return Launched(config, "blocking", str(home / "block.fifo"), env=env)

    def test_no_progress_stops_pings_logs_the_stack_and_exits_70(self, home: Path,
                                                                 fifo: Path) -> None:
        """Stalled: worker_stalled names the task and the worker's stack, no WATCHDOG=1
        follows it, the heartbeat says stalled and the process exits 70."""
        blocker = home / "block.fifo"
        os.mkfifo(blocker)
        sock = _notify_socket(home)
        messages: list[str] = []
        d = self._start(home, fifo, "", env={"NOTIFY_SOCKET": str(home / "notify.sock"),
                                             "WATCHDOG_USEC": "1000000",
                                             "TRAININGD_SERVICE__STALL_SECONDS": "2"})
        try:
            rec = d.wait_event("service.worker_stalled", timeout=90)
            assert d.proc.wait(30) == 70
        finally:
            release(blocker)
            if d.proc.poll() is None:
                d.kill()
            _drain(sock, messages)
            sock.close()
        assert rec["task"] == "embed" and rec["seconds_since_progress"] >= 2
        assert any("preprocess" in line for line in rec["worker_stack"]) or any(
            "result" in line for line in rec["worker_stack"])
        stalled_at = next(i for i, m in enumerate(messages) if "STATUS=stalled" in m)
        assert any("WATCHDOG=1" in m for m in messages[:stalled_at])
        assert not any("WATCHDOG=1" in m for m in messages[stalled_at:])
        beat = json.loads((home / "data" / "daemon" / "heartbeat.json").read_text())
        assert beat["state"] == "stalled"

    def test_sigterm_ends_a_worker_blocked_in_a_system_call(self, home: Path,
                                                           fifo: Path) -> None:
        """SIGTERM while a decode thread sits in open() on a FIFO: the process still exits
        within the stop budget, and says what it left behind."""
        blocker = home / "block.fifo"
        os.mkfifo(blocker)
        d = self._start(home, fifo, "", env={"TRAININGD_SERVICE__SHUTDOWN_BUDGET_SECONDS": "2"})
        try:
            wait_until(lambda: Path(str(blocker) + ".blocked").exists(), 90,
                       "a decode thread blocked in open()")
            d.signal(signal.SIGTERM)
            code = d.proc.wait(60)
        finally:
            release(blocker)
            if d.proc.poll() is None:
                d.kill()
        assert code == 1
        rec = d.wait_event("service.shutdown_budget_exceeded")
        assert rec["task"] == "embed" and rec["worker_stack"]
        assert d.wait_event("service.stopped")["worker_abandoned"] is True


@pytest.mark.slow
class TestFifoInImageRoot:
    """The original report: a FIFO x.png beside real images, the only worker, a real daemon."""

    def test_fifo_becomes_an_issue_and_the_rest_is_embedded(self, home: Path,
                                                           fifo: Path) -> None:
        """The FIFO is recorded as image_not_regular, the real images are embedded, new rows
        are still validated, and SIGTERM exits 0."""
        make_images(fifo.parent, 3)
        db, _ = write_sample_project(_decisions(home), "demo", rows=5)
        config = write_config(home / "config.toml", tiny_embedding_toml(),
                              image_roots={"demo": [fifo.parent]})
        d = Launched(config, "run")
        try:
            d.wait_for(lambda r: r.get("event") == "embedding.image_failed"
                       and r.get("code") == "image_not_regular", 90, "the FIFO's issue")
            d.wait_for(lambda r: r.get("event") == "embedding.run_finished"
                       and r.get("embedded") == 3, 90, "three images embedded")
            d.wait_event("validation.project_checked", project="demo")
            assert d.stop(30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()
        conn = sqlite3.connect(home / "data" / "daemon" / "state.db")
        try:
            codes = [r[0] for r in conn.execute(
                "SELECT code FROM issues WHERE row_key = ?", ("#image:" + str(fifo),))]
        finally:
            conn.close()
        assert codes == ["image_not_regular"]
        assert db.exists()


@pytest.mark.slow
class TestReload:
    """SIGHUP: any exception while reloading is logged and the old config kept."""

    def test_a_config_that_crashes_the_parser_keeps_the_old_one(self, home: Path) -> None:
        """A TOML nested 5,000 deep (RecursionError, not a ConfigError) is reported, and the
        daemon goes on validating with the old configuration."""
        write_sample_project(_decisions(home), "demo", rows=5)
        config = write_config(home / "config.toml")
        d = Launched(config, "run")
        try:
            d.wait_event("validation.project_checked", project="demo")
            good = config.read_text()
            config.write_text(good + "\n[audit]\ncommand = " + "[" * 5000 + "]" * 5000 + "\n")
            d.signal(signal.SIGHUP)
            rec = d.wait_event("service.reload_failed")
            assert "RecursionError" in rec["error"] and rec["kind"] == "unexpected"
            write_sample_project(_decisions(home), "late", rows=3)
            d.wait_event("validation.project_checked", project="late")
            assert d.proc.poll() is None
            assert d.stop(30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()
