"""Issue 9, item 4: writes fail soft.  A real full filesystem (a small tmpfs) and a real
read-only remount under a running daemon while the reviewer keeps writing rows: rows go on
being validated, the summary fails and is retried with backoff, and once space or write access
returns everything completes, with nothing half-written under a final name."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.workqueue import Backoff, Task, WorkQueue
from tests.conftest import ReviewerDB
from tests.daemon_harness import Daemon, wait_until, write_config

FAST_RETRY = {"TRAININGD_SERVICE__RETRY_BASE_SECONDS": "0.2",
              "TRAININGD_SERVICE__RETRY_MAX_SECONDS": "1"}


class TestBackoff:
    """The retry bookkeeping of the queue, with a fake clock."""

    def test_delays_double_up_to_the_cap_and_success_forgets(self) -> None:
        """base, 2 base, 4 base ... capped; a success resets the key."""
        b = Backoff(1.0, 5.0)
        key = ("summary", None, None)
        assert [b.failed(key)[1] for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
        assert b.succeeded(key) == 5 and b.failed(key) == (1, 1.0)

    def test_a_retry_waits_its_delay_even_when_events_merge_into_it(self) -> None:
        """A delayed task is pending (visible, merged into) but not ready before its time."""
        now = [0.0]
        q = WorkQueue(0.0, 1.0, clock=lambda: now[0])
        q.put(Task("validate", "p", urgent=True), delay=10)
        q.put(Task("validate", "p", hints=frozenset({"g1"}), urgent=True))
        assert q.depth() == 1 and q.get(timeout=0) is None
        now[0] = 10.5
        task = q.get(timeout=0)
        assert task is not None and task.hints == frozenset({"g1"})


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {exc}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of our own, unmounted afterwards."""
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "4m")
    yield mount
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True, timeout=30)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(disk: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC."""
    filler = disk / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def _start(home: Path, disk: Path, *, state_on_disk: bool) -> tuple[Daemon, ReviewerDB]:
    decisions = home / "decisions"
    decisions.mkdir()
    db = ReviewerDB(decisions / "demo.db")
    db.insert_many(50)
    env = {**FAST_RETRY, "TRAININGD_PATHS__DATA_ROOT": str(disk),
           "TRAININGD_PATHS__DECISIONS_DIR": str(decisions),
           "TRAININGD_PATHS__TRIGGERS_DIR": str(home / "triggers")}
    if not state_on_disk:
        env["TRAININGD_PATHS__STATE_DB"] = str(home / "state" / "state.db")
    return Daemon(write_config(home / "config.toml"), env=env), db


def _checked_after(d: Daemon, mark: int, rows: int) -> bool:
    """A validation pass after record ``mark`` saw ``rows`` rows in total."""
    return any(r.get("event") == "validation.project_checked" and r.get("rows_total") == rows
               for r in d.records()[mark:])


def _no_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


@pytest.mark.slow
class TestFullDisk:
    """ENOSPC under a running daemon."""

    def test_summary_retried_while_rows_are_validated(self, tmp_path: Path, disk: Path) -> None:
        """Data folder full, state DB elsewhere: new rows are validated at once, the summary
        trigger fails with the reason and is retried, then completes once space returns."""
        d, db = _start(tmp_path, disk, state_on_disk=False)
        try:
            d.wait_for(lambda r: r.get("event") == "validation.project_checked"
                       and r.get("rows_total") == 50, 60, "first validation")
            filler = _fill(disk)
            mark = len(d.records())
            (tmp_path / "triggers" / "summary").write_text("")
            rec = d.wait_event("worker.task_retry_scheduled", kind="summary", timeout=60)
            assert "No space left" in rec["reason"]
            db.insert_many(30)
            wait_until(lambda: _checked_after(d, mark, 80), 60, "rows validated on a full disk")
            filler.unlink()
            d.wait_event("worker.task_recovered", kind="summary", timeout=60)
            done = tmp_path / "triggers" / "done"
            wait_until(lambda: any(done.glob("summary*.result.json")), 30, "trigger result")
            result = json.loads(next(done.glob("summary*.result.json")).read_text())
            assert result["result"]["attempts"] >= 2
            assert d.stop(30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()
            db.close()
        assert _no_temp_files(disk) == []
        for path in (disk / "daily_summaries").glob("*.json"):
            json.loads(path.read_text())  # whole files only under final names

    def test_state_db_on_the_full_disk_recovers_when_space_returns(self, tmp_path: Path,
                                                                    disk: Path) -> None:
        """State DB on the full disk: validation fails with the reason and is retried (the
        rows wait in the source DB, nothing is lost); once space returns every row is in."""
        d, db = _start(tmp_path, disk, state_on_disk=True)
        try:
            d.wait_for(lambda r: r.get("event") == "validation.project_checked"
                       and r.get("rows_total") == 50, 60, "first validation")
            filler = _fill(disk)
            mark = len(d.records())
            db.insert_many(3000)
            d.wait_for(lambda r: r.get("event") == "worker.task_retry_scheduled"
                       and "full" in str(r.get("reason")), 60, "a retried validation")
            filler.unlink()
            wait_until(lambda: _checked_after(d, mark, 3050), 90, "all rows validated")
            assert d.proc.poll() is None
            assert d.stop(30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()
            db.close()
        conn = sqlite3.connect(disk / "daemon" / "state.db")
        try:
            count = conn.execute("SELECT count(*) FROM row_state WHERE project = 'demo'"
                                 ).fetchone()[0]
        finally:
            conn.close()
        assert count == 3050


@pytest.mark.slow
class TestReadOnlyDataDir:
    """EROFS: the data folder remounted read-only under a running daemon."""

    def test_summary_retried_until_the_folder_is_writable_again(self, tmp_path: Path,
                                                                disk: Path) -> None:
        """Read-only data folder: rows are still validated, the summary is retried, and it
        completes after the remount read-write."""
        d, db = _start(tmp_path, disk, state_on_disk=False)
        try:
            d.wait_for(lambda r: r.get("event") == "validation.project_checked"
                       and r.get("rows_total") == 50, 60, "first validation")
            wait_until(lambda: subprocess.run(
                ["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0,
                30, "remount read-only")
            mark = len(d.records())
            (tmp_path / "triggers" / "summary").write_text("")
            rec = d.wait_event("worker.task_retry_scheduled", kind="summary", timeout=60)
            assert "Read-only" in rec["reason"]
            db.insert_many(20)
            wait_until(lambda: _checked_after(d, mark, 70), 60, "rows validated meanwhile")
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, timeout=30)
            d.wait_event("worker.task_recovered", kind="summary", timeout=60)
            assert d.stop(30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()
            db.close()
        assert _no_temp_files(disk) == []
        assert os.access(disk, os.W_OK)
