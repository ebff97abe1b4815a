"""The guard every test runs under (``tests/leak_guard.py``, autouse from the conftest) fails a test
that leaves a thread or a child process running or a signal handler changed, names what was left,
and cleans it up so the next test starts clean; and a real in-process service run, stopped by a
real SIGTERM, leaves the process as it found it (issue 11, item 5).

The guard is exercised the way a user meets it: a pytest subprocess runs a small test file under
``-p tests.leak_guard`` and its JUnit XML says which inner test failed and with what message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.service import Service, heartbeat_path
from daemon.settings import Settings
from tests import leak_guard

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import os
import signal
import subprocess
import threading
from pathlib import Path

from tests import leak_guard

leak_guard.GRACE_SECONDS = 1.0  # the leaks below never stop: no need to wait the full grace
PIDFILE = Path(os.environ["LEAK_PIDFILE"])


def test_leaks_a_thread():
    threading.Thread(target=threading.Event().wait, name="forgotten-poller", daemon=True).start()


def test_leaks_a_child():
    proc = subprocess.Popen(["sleep", "60"])
    PIDFILE.write_text(str(proc.pid))


def test_changes_a_handler():
    def on_term(signum, frame):
        pass

    signal.signal(signal.SIGTERM, on_term)


def test_handler_was_put_back():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_clean():
    thread = threading.Thread(target=lambda: None, name="short")
    thread.start()
    thread.join()
    subprocess.run(["true"], check=True)
    old = signal.signal(signal.SIGHUP, lambda signum, frame: None)
    signal.signal(signal.SIGHUP, old)


def test_stopping_thread_and_unwaited_child():
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="stopping").start()
    proc = subprocess.Popen(["true"])  # ends at once; never waited for
    stop.set()  # the thread ends just after the test: within the grace
    PIDFILE.with_suffix(".true").write_text(str(proc.pid))
'''


def _poll(pred: Callable[[], bool], timeout: float, what: str) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        done.wait(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class InnerRun:
    """One pytest subprocess over ``INNER``: each inner test's outcome and message."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        (folder / "pytest.ini").write_text("[pytest]\n")  # pins rootdir: not the project's config
        (folder / "test_inner.py").write_text(INNER)
        self.pidfile = folder / "leaked.pid"
        report = folder / "report.xml"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LEAK_PIDFILE": str(self.pidfile)}
        self.proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.leak_guard", "-p", "no:cacheprovider",
             "-q", f"--junitxml={report}", str(folder / "test_inner.py")],
            cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        self.outcomes: dict[str, tuple[str, str]] = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = child.tag
                    text += f"{child.get('message', '')}\n{child.text or ''}"
            self.outcomes[case.get("name", "")] = (outcome, text)

    def outcome(self, name: str) -> tuple[str, str]:
        assert name in self.outcomes, (name, self.proc.stdout[-3000:], self.proc.stderr[-3000:])
        return self.outcomes[name]


@pytest.fixture(scope="module")
def inner(tmp_path_factory: pytest.TempPathFactory) -> InnerRun:
    return InnerRun(tmp_path_factory.mktemp("guards") / "inner")


class TestGuardFails:
    """A test that leaves something behind fails at teardown, with a message that names it."""

    def test_a_leaked_thread_fails_naming_it(self, inner: InnerRun) -> None:
        """A thread still waiting after the test is named, with its target."""
        outcome, text = inner.outcome("test_leaks_a_thread")
        assert outcome == "error"
        assert "thread 'forgotten-poller'" in text
        assert "Event.wait" in text

    def test_a_leaked_child_fails_naming_it_and_is_killed(self, inner: InnerRun) -> None:
        """A ``sleep 60`` child is named with its pid and command line, then killed."""
        outcome, text = inner.outcome("test_leaks_a_child")
        pid = int(inner.pidfile.read_text())
        assert outcome == "error"
        assert f"child process {pid} (sleep 60)" in text
        # killed and reaped by the guard, not left to init for a minute
        _poll(lambda: not Path(f"/proc/{pid}").exists(), 10.0, f"pid {pid} to be gone")

    def test_a_changed_handler_fails_naming_it_and_is_put_back(self, inner: InnerRun) -> None:
        """A SIGTERM handler left installed is named, and the next test finds the old one."""
        outcome, text = inner.outcome("test_changes_a_handler")
        assert outcome == "error"
        assert "SIGTERM handler changed from SIG_DFL to" in text
        assert "on_term" in text
        assert inner.outcome("test_handler_was_put_back") == ("passed", "")


class TestGuardPasses:
    """What a well-behaved test does passes."""

    def test_a_clean_test_passes(self, inner: InnerRun) -> None:
        """A joined thread, a waited-for child and a restored handler pass."""
        assert inner.outcome("test_clean") == ("passed", "")

    def test_a_stopping_thread_and_an_ended_child_pass(self, inner: InnerRun) -> None:
        """A thread ending just after the test gets its grace; a child that ended is reaped."""
        assert inner.outcome("test_stopping_thread_and_unwaited_child") == ("passed", "")
        pid = int(inner.pidfile.with_suffix(".true").read_text())
        assert not Path(f"/proc/{pid}").exists()

    def test_a_zombie_is_reaped_not_reported(self) -> None:
        """A child that exited and was never waited for no longer runs: reaped, not a failure."""
        before = leak_guard.take()
        pid = os.posix_spawnp("true", ["true"], os.environ)
        _poll(lambda: leak_guard.children().get(pid) == "Z", 10.0, f"pid {pid} to be a zombie")
        assert leak_guard.check(before) == []
        assert pid not in leak_guard.children()
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


class TestInProcessService:
    """A service run inside the test process leaves it as it found it."""

    def test_a_sigterm_run_restores_handlers_and_stops_every_thread(
            self, settings: Settings) -> None:
        """Run, SIGTERM once the heartbeat is written: exit 0, same handlers, no thread or child."""
        before = leak_guard.take()
        service = Service(settings)
        beat = heartbeat_path(settings)

        def stop_once_running() -> None:
            # the heartbeat is first written by the tick loop, after the handlers are installed
            _poll(beat.exists, 60.0, f"{beat} to be written")
            os.kill(os.getpid(), signal.SIGTERM)

        stopper = threading.Thread(target=stop_once_running, name="stopper")
        stopper.start()
        try:
            code = service.run()
        finally:
            stopper.join()
        assert code == 0
        assert {s: signal.getsignal(s) for s in leak_guard.SIGNALS} == before.handlers
        assert leak_guard.check(before) == []
