"""journald-native logs: every line on the stream is one JSON record, prefixed with its syslog
priority when ``JOURNAL_STREAM`` names the stream, so ``journalctl -p warning`` works and
``journalctl -o cat | jq`` still sees JSON (issue 10, item 4).

No journald runs on the CI box, so the priorities are read the way journald reads them: the
``<N>`` prefix of each line of a real subprocess whose stdout is the file that
``JOURNAL_STREAM`` names (``dev:ino``).  Where journald runs, ``systemd-cat`` is used as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon.demo.sample import write_sample_project

REPO = Path(__file__).resolve().parents[1]
PREFIXED = re.compile(r"^<([0-7])>(.*)$")
#: the journal's names for the priorities we use
ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7

#: logs one line per level plus the chatter of libraries, with logging configured as the CLI does
LEVELS_SCRIPT = textwrap.dedent("""
    import logging, sys
    import structlog
    from daemon.logs import configure_logging
    configure_logging(sys.argv[1], "json", stream=sys.stdout)
    log = structlog.get_logger("probe")
    log.debug("probe.debugged")
    log.info("probe.informed")
    log.warning("probe.warned")
    log.error("probe.failed")
    logging.info("Loaded built-in ViT-B-32 model config.")  # open_clip logs on the root logger
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")
    logging.getLogger("huggingface_hub.file_download").info("downloading")
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=4))")
""")


def stream_env(log_file: Path, **extra: str) -> dict[str, str]:
    """The environment systemd gives a unit whose stdout is ``log_file``'s journal stream."""
    st = os.stat(log_file)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                "PYTHONPATH": str(REPO)}, **extra)
    return env


def journal_entries(text: str) -> list[tuple[int, dict[str, Any]]]:
    """``(priority, record)`` per line, as journald with ``SyslogLevelPrefix=`` files them;
    a line without a prefix or whose rest is not one JSON object fails the test."""
    entries = []
    for line in text.splitlines():
        match = PREFIXED.match(line)
        assert match, f"line without a <N> priority prefix: {line!r}"
        try:
            record = json.loads(match.group(2))
        except json.JSONDecodeError:
            pytest.fail(f"line whose message is not JSON: {line!r}")
        assert isinstance(record, dict), line
        entries.append((int(match.group(1)), record))
    return entries


def run_levels(tmp_path: Path, level: str) -> list[tuple[int, dict[str, Any]]]:
    log_file = tmp_path / f"stream-{level}.log"
    with log_file.open("wb") as out:
        subprocess.run([sys.executable, "-c", LEVELS_SCRIPT, level], stdout=out,
                       stderr=subprocess.STDOUT, env=stream_env(log_file), cwd=tmp_path,
                       check=True, timeout=60)
    return journal_entries(log_file.read_text())


class TestPriorities:
    """Each line carries its syslog priority when JOURNAL_STREAM names the stream."""

    def test_each_level_gets_its_priority(self, tmp_path: Path) -> None:
        """debug 7, info 6, warning 4, error 3, read from the <N> prefixes."""
        by_event = {rec["event"]: prio for prio, rec in run_levels(tmp_path, "debug")}
        assert by_event["probe.debugged"] == DEBUG
        assert by_event["probe.informed"] == INFO
        assert by_event["probe.warned"] == WARNING
        assert by_event["probe.failed"] == ERR

    def test_the_prefix_is_not_part_of_the_json(self, tmp_path: Path) -> None:
        """After the prefix the line is one JSON object with the usual keys (jq recipes)."""
        (prio, rec), *_ = [e for e in run_levels(tmp_path, "info")
                           if e[1]["event"] == "probe.warned"]
        assert prio == WARNING
        assert rec["level"] == "warning" and rec["logger"] == "probe"
        assert str(rec["timestamp"]).endswith("Z")

    def test_no_prefix_on_a_stream_journald_did_not_open(self, tmp_path: Path) -> None:
        """A JOURNAL_STREAM inherited by a process whose stdout is another file: plain JSON."""
        other = tmp_path / "other.log"
        other.write_text("")
        log_file = tmp_path / "redirected.log"
        with log_file.open("wb") as out:
            subprocess.run([sys.executable, "-c", LEVELS_SCRIPT, "info"], stdout=out,
                           stderr=subprocess.STDOUT, env=stream_env(other), cwd=tmp_path,
                           check=True, timeout=60)
        lines = log_file.read_text().splitlines()
        assert lines and all(json.loads(line)["event"] for line in lines)

    @pytest.mark.skipif(not (shutil.which("systemd-cat") and shutil.which("journalctl")
                             and Path("/run/systemd/journal/stdout").exists()),
                        reason="no journald running here; the <N> prefixes are parsed instead")
    def test_journalctl_filters_by_priority(self, tmp_path: Path) -> None:
        """Through a real systemd-cat, journalctl -p warning shows the warning and the error
        and neither the info nor the debug record."""
        tag = f"trainingd-test-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(["systemd-cat", "-t", tag, sys.executable, "-c", LEVELS_SCRIPT, "debug"],
                       env=env, check=True, timeout=60)
        deadline = time.monotonic() + 10
        events: list[str] = []
        while time.monotonic() < deadline:
            out = subprocess.run(["journalctl", "-t", tag, "-p", "warning", "-o", "cat"],
                                 capture_output=True, text=True, check=False).stdout
            events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
            if "probe.failed" in events:
                break
            time.sleep(0.1)
        assert "probe.warned" in events and "probe.failed" in events
        assert "probe.informed" not in events and "probe.debugged" not in events


class TestChatter:
    """Library chatter stays out of the journal unless the level is debug."""

    def test_library_info_lines_are_dropped_at_info(self, tmp_path: Path) -> None:
        """open_clip's root-logger info and huggingface_hub's info never reach the stream."""
        entries = run_levels(tmp_path, "info")
        text = json.dumps([rec for _, rec in entries])
        assert "Loaded built-in" not in text and "downloading" not in text

    def test_library_warnings_still_pass(self, tmp_path: Path) -> None:
        """A library's warning is a warning: kept, at priority 4, as JSON with its logger."""
        (prio, rec), = [e for e in run_levels(tmp_path, "info")
                        if e[1]["event"].startswith("Retrying")]
        assert prio == WARNING and rec["logger"] == "urllib3.connectionpool"

    def test_debug_shows_the_chatter(self, tmp_path: Path) -> None:
        """With --log-level debug the libraries' lines are there, each one JSON."""
        events = [rec["event"] for _, rec in run_levels(tmp_path, "debug")]
        assert "Loaded built-in ViT-B-32 model config." in events
        assert "STREAM b'IHDR' 16 13" in events and "downloading" in events


# -- a real `trainingd run` ---------------------------------------------------------------------

#: `trainingd run`, plus a thread that waits for a marker file and then does what a library or
#: a bug would do inside the daemon: a Python warning, a third-party log line, a thread crash
RUN_LAUNCHER = textwrap.dedent("""
    import logging, os, sys, threading, time, warnings

    def meddle(marker):
        while not os.path.exists(marker):
            time.sleep(0.05)
        warnings.warn("torch.cuda.amp.autocast is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("PIL.TiffImagePlugin").warning("Corrupt EXIF data.  Expecting to read"
                                                         " 2 bytes but only got 0.")
        logging.info("Loaded built-in ViT-B-32 model config.")
        crash = threading.Thread(target=lambda: 1 / 0, name="plugin-thread")
        crash.start()
        crash.join()
        open(marker + ".done", "w").close()

    threading.Thread(target=meddle, args=(os.environ["MEDDLE_MARKER"],), daemon=True).start()
    from daemon import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def locked_rollback_db(decisions: Path) -> sqlite3.Connection:
    """The sample project in rollback-journal mode with the reviewer holding an exclusive lock:
    the worker's first read waits on it (a real reason for a slow shutdown)."""
    db_path, _ = write_sample_project(decisions, "demo", rows=20)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("BEGIN EXCLUSIVE")
    return conn


@pytest.mark.slow
class TestEveryLineOfARunIsJson:
    """A real `trainingd run` under JOURNAL_STREAM: warnings, library lines, a crashed thread
    and the second-SIGINT message are all prefixed JSON records."""

    @pytest.fixture
    def run_output(self, tmp_path: Path) -> dict[str, Any]:
        decisions = tmp_path / "data" / "decisions"
        holder = locked_rollback_db(decisions)
        config = tmp_path / "config.toml"
        config.write_text(textwrap.dedent(f"""
            [paths]
            data_root = "data"
            decisions_dir = {json.dumps(str(decisions))}
            [service]
            heartbeat_seconds = 0.5
            shutdown_budget_seconds = 60
            [sources]
            busy_retry_seconds = 120
        """))
        log_file = tmp_path / "journal-stream.log"
        marker = tmp_path / "meddle"
        out = log_file.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN_LAUNCHER, "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=stream_env(log_file, MEDDLE_MARKER=str(marker)))
        try:
            wait_for_line(log_file, proc, '"service.started"')
            marker.write_text("")
            wait_for(lambda: Path(f"{marker}.done").exists(), proc, "the meddling thread")
            proc.send_signal(signal.SIGINT)
            wait_for_line(log_file, proc, '"service.stopping"')
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            out.close()
            holder.rollback()
            holder.close()
        return {"code": code, "text": log_file.read_text(errors="replace")}

    def test_every_line_is_a_prefixed_json_object(self, run_output: dict[str, Any]) -> None:
        """journal_entries fails on any line that is not <N> + one JSON object."""
        entries = journal_entries(run_output["text"])
        assert any(rec["event"] == "service.started" for _, rec in entries)

    def test_python_warning_is_a_warning_record(self, run_output: dict[str, Any]) -> None:
        """warnings.warn inside the daemon: one JSON record at priority 4 with its category."""
        (prio, rec), = [e for e in journal_entries(run_output["text"])
                        if e[1]["event"] == "python.warning_issued"]
        assert prio == WARNING and rec["category"] == "FutureWarning"
        assert "autocast is deprecated" in rec["message"]

    def test_third_party_logger_line_is_json(self, run_output: dict[str, Any]) -> None:
        """A library's stdlib warning keeps its logger name and gets priority 4; a library's
        root-logger info line (open_clip's habit) is dropped."""
        entries = journal_entries(run_output["text"])
        (prio, rec), = [e for e in entries if e[1]["logger"] == "PIL.TiffImagePlugin"]
        assert prio == WARNING and rec["event"].startswith("Corrupt EXIF data")
        assert not [e for e in entries if "Loaded built-in" in e[1]["event"]]

    def test_thread_crash_is_an_error_record(self, run_output: dict[str, Any]) -> None:
        """An uncaught exception in a thread: priority 3, its thread and its traceback."""
        (prio, rec), = [e for e in journal_entries(run_output["text"])
                        if e[1]["event"] == "python.thread_crashed"]
        assert prio == ERR and rec["thread"] == "plugin-thread"
        assert rec["exception"][0]["exc_type"] == "ZeroDivisionError"

    def test_second_sigint_is_a_json_line(self, run_output: dict[str, Any]) -> None:
        """The forced exit says so in one JSON record at priority 4, and exits 130."""
        assert run_output["code"] == 130
        (prio, rec), = [e for e in journal_entries(run_output["text"])
                        if e[1]["event"] == "service.second_sigint"]
        assert prio == WARNING and rec["exit_code"] == 130 and rec["level"] == "warning"
        assert str(rec["timestamp"]).endswith("Z")


def wait_for(pred: Any, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0
             ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainingd run exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_line(log_file: Path, proc: subprocess.Popen[bytes], needle: str) -> None:
    wait_for(lambda: needle in log_file.read_text(errors="replace"), proc, needle)
