"""Hostile trigger files (issue 9, item 7 and item 4 for triggers): whatever lands in the
triggers folder, and however the disk behaves, ``claim()`` and ``finish()`` never raise, never
block, never follow a link, and every trigger ends with a result file saying why."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.demo.sample import write_sample_project
from daemon.fsutil import atomic_write_text
from daemon.triggers import MAX_BODY_BYTES, TriggerBox, parse_trigger
from tests.daemon_harness import Daemon, wait_until, write_config

ROOTS = [Path("/srv/data"), Path("/srv/img")]
LATER = timedelta(hours=1)


def make_box(folder: Path, **kw: object) -> TriggerBox:
    return TriggerBox(folder, roots=lambda: [folder.parent], projects=lambda: {"mojo3"},
                      **kw)  # type: ignore[arg-type]


def result_of(box: TriggerBox, name: str, where: str = "failed") -> dict[str, object]:
    doc: dict[str, object] = json.loads(
        (getattr(box, where) / f"{name}.result.json").read_text())
    return doc


def leftovers(folder: Path) -> list[str]:
    """Temp files of the atomic writer, anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


class TestBodies:
    """Bodies that make a JSON or int parser raise are failed triggers, not crashes."""

    def test_deep_json_is_a_failed_trigger(self, tmp_path: Path) -> None:
        """60,000 '[' (RecursionError in the parser) fails the trigger with a reason."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "validate.json").write_text("[" * 60_000)
        assert box.claim() == []
        doc = result_of(box, "validate.json")
        assert doc["status"] == "failed" and "nests" in str(doc["error"])
        assert list(box.processing.iterdir()) == []

    def test_deep_json_left_in_processing_by_a_crash_does_not_crash_again(
            self, tmp_path: Path) -> None:
        """The same body found in processing/ at start is failed too, not re-raised forever."""
        box = make_box(tmp_path / "triggers")
        (box.processing / "validate.json").write_text("[" * 60_000)
        assert box.claim() == []
        assert "nests" in str(result_of(box, "validate.json")["error"])

    def test_huge_integer_is_a_failed_trigger(self, tmp_path: Path) -> None:
        """A 5,000-digit number (ValueError in int parsing) fails the trigger with a reason."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "embed.json").write_text('{"limit": ' + "7" * 5000 + "}")
        assert box.claim() == []
        assert "not valid JSON" in str(result_of(box, "embed.json")["error"])

    @pytest.mark.parametrize(("body", "reason"), [
        (b"[" * 60_000, "nests"),
        (b'{"a":' * 10_000, "nests"),
        (b'{"limit": ' + b"9" * 4301 + b"}", "not valid JSON"),
        (b'{"limit": 1e999999}', "non-negative integer"),
        (b'{"limit": NaN}', "non-negative integer"),
        (b"\x00\x01", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
    ])
    def test_parser_turns_every_bad_body_into_a_reason(self, body: bytes, reason: str) -> None:
        """Each body raises ValueError with a readable reason, never another exception."""
        with pytest.raises(ValueError, match=reason):
            parse_trigger("embed.json", body, projects={"mojo3"}, roots=ROOTS)

    def test_path_with_nul_byte_is_refused(self) -> None:
        """A NUL byte in a path argument is a reason, not an exception from realpath."""
        with pytest.raises(ValueError, match="NUL"):
            parse_trigger("backfill.json", b'{"csv": ["/srv/data/a\\u0000.csv"]}',
                          projects=set(), roots=ROOTS)

    def test_oversize_trigger_is_refused_before_reading(self, tmp_path: Path) -> None:
        """A 50 MB trigger fails on its fstat size (named in the reason), before a byte is read."""
        box = make_box(tmp_path / "triggers")
        with (box.folder / "validate.json").open("wb") as fh:
            fh.truncate(50 * 1024 * 1024)  # sparse: 50 MB to stat, nothing to read
        assert box.claim() == []
        reason = str(result_of(box, "validate.json")["error"])
        assert str(50 * 1024 * 1024) in reason and str(MAX_BODY_BYTES) in reason
        assert (box.failed / "validate.json").stat().st_size == 50 * 1024 * 1024


class TestNames:
    """Only exact action names run."""

    @pytest.mark.parametrize("name", ["retrain.json.orig", "retrain.json~bak", "retrain.bak",
                                      "retrain.20251125.json", "RETRAIN", "retrain.json.json",
                                      "retrain.JSON", " retrain"])
    def test_near_names_fail_with_the_accepted_forms(self, tmp_path: Path, name: str) -> None:
        """A copy or backup of a trigger never runs; the reason names the accepted forms."""
        box = make_box(tmp_path / "triggers")
        (box.folder / name).write_text('{"model": "ranker", "force": true}')
        assert box.claim() == []
        reason = str(result_of(box, name)["error"])
        assert "'<action>' or '<action>.json'" in reason and "retrain" in reason
        assert (box.failed / name).exists()

    @pytest.mark.parametrize("name", ["retrain", "retrain.json"])
    def test_exact_names_run(self, tmp_path: Path, name: str) -> None:
        """Both accepted forms become a task."""
        box = make_box(tmp_path / "triggers")
        (box.folder / name).write_text('{"model": "crop"}')
        (task,) = box.claim()
        assert task.kind == "retrain" and task.arg("model") == "crop"

    def test_renamed_twin_in_processing_keeps_its_action(self, tmp_path: Path) -> None:
        """A same-named trigger claimed while the first is still running gets a stamped name in
        processing/ and still runs as its action after a restart."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "reconcile").write_text("")
        (first,) = box.claim()
        (box.folder / "reconcile").write_text("")
        (second,) = box.claim()
        assert first.trigger != second.trigger
        restarted = make_box(box.folder)
        assert sorted(t.kind for t in restarted.claim()) == ["reconcile", "reconcile"]


class TestFileKinds:
    """Symlinks, FIFOs, sockets and folders are never opened or followed."""

    def test_symlink_is_failed_and_never_followed(self, tmp_path: Path) -> None:
        """The link itself moves to failed/; nothing of its target reaches a task or result."""
        box = make_box(tmp_path / "triggers")
        target = tmp_path / "secret.json"
        target.write_text('{"project": "mojo3", "full": true}')
        (box.folder / "validate.json").symlink_to(target)
        assert box.claim() == []
        moved = box.failed / "validate.json"
        assert moved.is_symlink() and os.readlink(moved) == str(target)
        text = (box.failed / "validate.json.result.json").read_text()
        assert "symbolic link" in json.loads(text)["error"]
        assert "full" not in text and target.read_text() == '{"project": "mojo3", "full": true}'

    def test_symlink_to_a_folder_is_failed_not_entered(self, tmp_path: Path) -> None:
        """A link to a folder is a link: moved to failed/, the folder untouched."""
        box = make_box(tmp_path / "triggers")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "summary").write_text("")
        (box.folder / "summary").symlink_to(elsewhere)
        assert box.claim() == []
        assert (box.failed / "summary").is_symlink() and (elsewhere / "summary").exists()

    def test_fifo_is_failed_without_being_opened(self, tmp_path: Path) -> None:
        """A FIFO named like a trigger moves to failed/ with a reason; claim() does not block."""
        box = make_box(tmp_path / "triggers")
        os.mkfifo(box.folder / "summary")
        assert box.claim() == []
        assert (box.failed / "summary").is_fifo()
        assert "a FIFO" in str(result_of(box, "summary")["error"])

    def test_socket_is_failed(self, tmp_path: Path) -> None:
        """A socket named like a trigger moves to failed/ with a reason."""
        folder = tmp_path / "t"
        box = make_box(folder)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(folder / "pause"))
            assert box.claim() == []
        finally:
            sock.close()
        assert (box.failed / "pause").is_socket()
        assert "a socket" in str(result_of(box, "pause")["error"])

    def test_folder_is_reported_once_and_left_alone(self, tmp_path: Path) -> None:
        """A folder is logged once (not at every claim), not entered, not moved."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "validate").mkdir()
        (box.folder / "validate" / "summary").write_text("")
        with capture_logs() as logs:
            assert box.claim() == [] and box.claim() == []
        warned = [e for e in logs if e["event"] == "triggers.folder_ignored"]
        assert len(warned) == 1 and warned[0]["trigger"] == "validate"
        assert (box.folder / "validate" / "summary").exists()
        assert not (box.failed / "validate").exists()

    def test_good_triggers_beside_bad_ones_still_run(self, tmp_path: Path) -> None:
        """One bad entry never stops the others in the same claim."""
        box = make_box(tmp_path / "triggers")
        os.mkfifo(box.folder / "embed")
        (box.folder / "inspect.json").write_text("[" * 60_000)
        (box.folder / "retrain.json.orig").write_text("")
        (box.folder / "summary").write_text("")
        (box.folder / "validate.json").write_text('{"project": "mojo3"}')
        assert sorted(t.kind for t in box.claim()) == ["summary", "validate"]
        assert sorted(p.name for p in box.failed.iterdir() if p.name.endswith(".result.json")) \
            == ["embed.result.json", "inspect.json.result.json", "retrain.json.orig.result.json"]

    def test_running_trigger_is_not_handed_out_twice(self, tmp_path: Path) -> None:
        """A trigger claimed and not yet finished is not returned again by the next claim."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "summary").write_text("")
        assert len(box.claim()) == 1
        assert box.claim() == []


class _FullDisk:
    """A result writer that fails like a full disk for its first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, path: Path, text: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        atomic_write_text(path, text)


class TestResultWrites:
    """A result that cannot be written is retried later; nothing half-written is left."""

    def test_full_disk_at_finish_is_retried_with_backoff(self, tmp_path: Path) -> None:
        """finish() does not raise; the trigger waits in processing/; the next claim after the
        backoff writes the result and moves the trigger; a claim before it does not retry."""
        writer = _FullDisk(failures=2)
        now = datetime.now(UTC)
        box = make_box(tmp_path / "triggers", write_result=writer, clock=lambda: now)
        (box.folder / "summary").write_text("")
        (task,) = box.claim(now)
        claimed = Path(task.trigger or "")
        with capture_logs() as logs:
            box.finish(claimed, ok=True, result={"rows": 3})
        assert [e["event"] for e in logs].count("triggers.result_write_failed") == 1
        assert claimed.exists() and box.pending_results == [claimed]
        assert list(box.done.iterdir()) == []
        assert box.claim(now) == [] and writer.calls == 1  # not due yet, not handed out again
        assert box.claim(now + LATER) == [] and writer.calls == 2  # due: fails again
        assert box.claim(now + LATER) == [] and writer.calls == 2  # backoff doubled
        assert box.claim(now + 2 * LATER) == [] and writer.calls == 3
        assert box.pending_results == [] and not claimed.exists()
        assert result_of(box, "summary", "done")["rows"] == 3
        assert (box.done / "summary").exists()

    def test_a_due_result_asks_for_a_claim(self, tmp_path: Path) -> None:
        """results_due() (which the service checks every heartbeat, so a retry never waits for
        the next dropped trigger) is false before the backoff, true after, false once written."""
        writer = _FullDisk(failures=1)
        now = datetime.now(UTC)
        box = make_box(tmp_path / "triggers", write_result=writer, clock=lambda: now)
        (box.folder / "summary").write_text("")
        (task,) = box.claim(now)
        assert not box.results_due(now)
        box.finish(Path(task.trigger or ""), ok=True, result={})
        assert not box.results_due(now) and box.results_due(now + LATER)
        box.claim(now + LATER)
        assert box.pending_results == [] and not box.results_due(now + LATER)

    def test_rejected_trigger_on_a_full_disk_is_not_lost(self, tmp_path: Path) -> None:
        """A bad trigger whose failure result cannot be written gets it written later."""
        writer = _FullDisk(failures=1)
        box = make_box(tmp_path / "triggers", write_result=writer)
        (box.folder / "explode").write_text("")
        assert box.claim() == []
        assert (box.processing / "explode").exists()
        assert box.claim(datetime.now(UTC) + LATER) == []
        assert "unknown action" in str(result_of(box, "explode")["error"])
        assert not (box.processing / "explode").exists()

    def test_any_writer_error_is_caught(self, tmp_path: Path) -> None:
        """Not only OSError: whatever the writer raises, finish() returns and keeps the state."""
        def broken(path: Path, text: str) -> None:
            raise RuntimeError("writer bug")
        box = make_box(tmp_path / "triggers", write_result=broken)
        (box.folder / "summary").write_text("")
        (task,) = box.claim()
        box.finish(Path(task.trigger or ""), ok=False, result={"error": "x"})
        assert box.pending_results == [Path(task.trigger or "")]

    def test_vanished_subfolders_are_made_again(self, tmp_path: Path) -> None:
        """done/ removed while running: the result is still written."""
        box = make_box(tmp_path / "triggers")
        (box.folder / "summary").write_text("")
        (task,) = box.claim()
        box.done.rmdir()
        box.finish(Path(task.trigger or ""), ok=True, result={})
        assert result_of(box, "summary", "done")["status"] == "done"

    def test_triggers_folder_removed_is_not_a_crash(self, tmp_path: Path) -> None:
        """claim() on a folder that vanished returns nothing and makes it again."""
        box = make_box(tmp_path / "triggers")
        for sub in (box.processing, box.done, box.failed):
            sub.rmdir()
        box.folder.rmdir()
        assert box.claim() == [] and box.processing.is_dir()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (needs root and CAP_SYS_ADMIN: skipped with the reason otherwise)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system says ENOSPC."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


class TestRealFullDisk:
    """The same, on a real full file system."""

    def test_full_tmpfs_leaves_no_half_result_and_heals(self, small_tmpfs: Path) -> None:
        """On a full tmpfs finish() neither raises nor leaves a partial or temp result; once
        space is back, the next due claim writes the result and moves the trigger."""
        box = make_box(small_tmpfs / "triggers")
        (box.folder / "summary").write_text("")
        (task,) = box.claim()
        claimed = Path(task.trigger or "")
        filler = fill(small_tmpfs)
        big = {"result": {"rows": list(range(3000))}}  # more than one page: cannot fit
        box.finish(claimed, ok=True, result=big)
        assert claimed.exists() and box.pending_results == [claimed]
        assert list(box.done.iterdir()) == [] and leftovers(small_tmpfs) == []
        filler.unlink()
        assert box.claim(datetime.now(UTC) + LATER) == []
        assert box.pending_results == [] and not claimed.exists()
        assert result_of(box, "summary", "done")["result"] == big["result"]
        assert leftovers(small_tmpfs) == []


@pytest.mark.slow
class TestDaemon:
    """The real daemon fed every hostile trigger at once."""

    def test_hostile_triggers_fail_and_the_daemon_goes_on(self, tmp_path: Path) -> None:
        """Deep JSON, a symlink, a FIFO, a near name and a folder each end as they should, a good
        trigger dropped after them still runs, and the daemon stops cleanly."""
        decisions = tmp_path / "data" / "training" / "ai_training_decisions"
        decisions.mkdir(parents=True)
        write_sample_project(decisions, "demo", rows=5)
        daemon = Daemon(write_config(tmp_path / "config.toml"))
        try:
            daemon.wait_event("validation.project_checked", project="demo")
            triggers = tmp_path / "data" / "triggers"
            secret = tmp_path / "secret.json"
            secret.write_text('{"project": "demo", "full": true}')
            (triggers / "validate.json").symlink_to(secret)
            (triggers / "inspect.json").write_text("[" * 60_000)
            os.mkfifo(triggers / "summary")
            (triggers / "retrain.json.orig").write_text('{"force": true}')
            (triggers / "embed").mkdir()
            failed = triggers / "failed"
            names = ["validate.json", "inspect.json", "summary", "retrain.json.orig"]
            wait_until(lambda: all((failed / f"{n}.result.json").exists() for n in names),
                       timeout=30, what="four failed results")
            (triggers / "reconcile").write_text("")
            wait_until((triggers / "done" / "reconcile.result.json").exists, timeout=30,
                       what="a good trigger after the bad ones")
            assert "full" not in (failed / "validate.json.result.json").read_text()
            assert (triggers / "embed").is_dir() and daemon.proc.poll() is None
            assert len([r for r in daemon.records()
                        if r.get("event") == "triggers.folder_ignored"]) == 1
        finally:
            code = daemon.stop()
        assert code == 0
