"""The upstream simulator behaves like the reviewer and the crop tool, as a real process: rows in
WAL mode, files moved between the review folders, sidecars that parse, crops that validate."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.demo.simulator import Simulator, SimulatorConfig
from daemon.records import Sidecar
from daemon.settings import Settings
from daemon.sidecars import check_sidecar_link, crop_state, folder_role, parse_sidecar
from daemon.store import StateStore
from daemon.validation import Validator

REPO = Path(__file__).resolve().parents[1]
PROJECT = "simproj"


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def read_rows(db: Path) -> list[dict[str, Any]]:
    """Rows as another process sees them (read-only, while the writer may be open)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ai_decisions ORDER BY rowid")]
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()


def start(decisions: Path, images: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.demo.simulator", "--decisions", str(decisions),
         "--images", str(images), "--project", PROJECT, *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:  # a failed assertion must not leave a simulator behind
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class TestSimulatorProcess:
    """A real simulator process writes what the reviewer and crop tool would."""

    def test_a_short_run_leaves_the_reviewers_output(
        self, settings: Settings, store: StateStore, tmp_path: Path,
        procs: list[subprocess.Popen[str]],
    ) -> None:
        """Rows, moved files, sidecars in __crop/ then __cropped/, final crops, 0 errors."""
        images = tmp_path / "image roots" / PROJECT
        log = tmp_path / "commits.jsonl"
        db = settings.decisions_dir / f"{PROJECT}.db"
        proc = start(settings.decisions_dir, images, "--groups", "10", "--rate", "0",
                     "--seed", "11", "--crop-delay-seconds", "1.5",
                     "--delete-delay-seconds", "0.05", "--commit-log", str(log))
        procs.append(proc)

        # while the crop tool has not run yet: sidecars wait in the crop folders
        wait_for(lambda: len(read_rows(db)) == 10, what="10 rows")
        pending = [r for r in read_rows(db) if r["final_crop_coords"] is None
                   and r["user_action"] == "crop"]
        assert pending, "seed 11 must review at least one crop"
        waiting = [p for p in images.glob("__crop*/*.decision")
                   if folder_role(p, images) in ("crop", "crop_auto")]
        assert {json.loads(p.read_text())["group_id"] for p in waiting} >= {
            r["group_id"] for r in pending}
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        summary = json.loads(proc.stdout.read().splitlines()[-1]) if proc.stdout else {}
        assert summary["groups"] == 10 and summary["stopped"] is False

        rows = read_rows(db)
        crops = [r for r in rows if r["user_action"] == "crop"]
        assert len(rows) == 10 and crops
        assert {r["user_action"] for r in rows} <= {"approve", "crop"}
        for r in rows:
            assert r["group_id"].startswith(f"{PROJECT}_group_") and "_batch001_img" in r[
                "group_id"]
            assert r["directory"] == str(images.resolve())
        files = tree(images)
        assert not [f for f in files if f.endswith(".tmp")], "no temp file may be left"
        assert not [f for f in files if "/" not in f], "every image left the source folder"
        assert not list(images.glob("__crop*/*.decision")) or all(
            p.parent.name == "__cropped" for p in images.glob("__crop*/*.decision"))

        by_gid = {r["group_id"]: r for r in rows}
        for r in rows:
            names = json.loads(r["images"])
            picked = names[r["user_selected_index"]]
            stem = Path(picked).stem
            if r["user_action"] == "approve":
                assert f"__selected/{picked}" in files and f"__selected/{stem}.yaml" in files
                assert r["final_crop_coords"] is None
                continue
            # crops: row UPDATEd, image + companion + sidecar moved together to __cropped/
            box = json.loads(r["final_crop_coords"])
            assert len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            assert r["crop_timestamp"] and r["crop_match"] in (0, 1)
            for name in (picked, f"{stem}.yaml", f"{stem}.decision"):
                assert f"__cropped/{name}" in files
            parsed = parse_sidecar(images / "__cropped" / f"{stem}.decision", project=PROJECT,
                                   image_root=images)
            assert isinstance(parsed, Sidecar) and parsed.kind == "A"
            assert crop_state(parsed) == "cropped" and parsed.group_id == r["group_id"]
            assert check_sidecar_link(parsed, row_exists=parsed.group_id in by_gid,
                                      row_project=PROJECT, image_present=True,
                                      expected_project=PROJECT) == []
            for loser in (n for n in names if n != picked):
                deleted = not any(f.endswith(f"/{loser}") for f in files)
                assert f"__delete_staging/{loser}" in files or deleted

        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["group_id"] for e in events if e["event"] == "insert"] == list(by_gid)
        assert sorted(e["group_id"] for e in events if e["event"] == "crop_update") == sorted(
            r["group_id"] for r in crops)
        assert all(e["monotonic"] > 0 and e["wall"] > 1e9 for e in events)

        results = Validator(store, settings).validate_all()
        assert [(r.project, r.rows_total, r.errors) for r in results] == [(PROJECT, 10, 0)]
        assert store.issues(PROJECT, severity="error") == []

    def test_sigterm_ends_it_cleanly(
        self, tmp_path: Path, procs: list[subprocess.Popen[str]]
    ) -> None:
        """SIGTERM mid-run: the step finishes, the DB closes intact, the exit status is 0."""
        decisions, images = tmp_path / "decisions", tmp_path / "images"
        db = decisions / f"{PROJECT}.db"
        proc = start(decisions, images, "--groups", "100000", "--rate", "50",
                     "--crop-delay-seconds", "0.2")
        procs.append(proc)
        wait_for(lambda: len(read_rows(db)) >= 3, what="3 rows")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert json.loads(out.splitlines()[-1])["stopped"] is True
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not [p for p in tmp_path.rglob("*.tmp")]
        assert len(read_rows(db)) < 100000


class TestSimulatorApi:
    """The in-process API is deterministic under a seed and resumes an existing DB."""

    def run(self, root: Path, seed: int, groups: int = 12) -> tuple[list[str], list[tuple[Any,
                                                                                        ...]]]:
        config = SimulatorConfig(decisions_dir=root / "decisions", image_root=root / "images",
                                 project=PROJECT, groups=groups, rate_per_second=0, seed=seed,
                                 crop_delay_seconds=3600, delete_delay_seconds=3600)
        with Simulator(config) as sim:
            while sim.step() is not None:
                pass
            waiting = not sim.done  # crops and deletes still wait for their delay
            sim.finish_now()
            assert waiting and sim.done
        rows = [(r["images"], r["user_action"], r["user_selected_index"],
                 r["final_crop_coords"], r["ai_crop_coords"], r["image_width"])
                for r in read_rows(config.db_path)]
        return tree(config.image_root), rows

    def test_same_seed_same_output(self, tmp_path: Path) -> None:
        """Two runs with one seed write the same files and rows (times aside)."""
        first = self.run(tmp_path / "a", seed=5)
        assert first == self.run(tmp_path / "b", seed=5)
        assert first != self.run(tmp_path / "c", seed=6)

    def test_a_second_run_continues_the_db(self, tmp_path: Path) -> None:
        """A later run appends rows with new file names instead of overwriting images."""
        files1, rows1 = self.run(tmp_path, seed=1, groups=4)
        files2, rows2 = self.run(tmp_path, seed=1, groups=4)
        assert len(rows2) == 8 and rows2[:4] == rows1
        assert set(files1) < set(files2)
