"""End to end: the simulator (reviewer + crop tool) and ``trainingd run`` as two real processes.

Every row is validated exactly once per content, every crop is joined, bad sidecars are
reported, triggers are consumed, and kill -9 at random moments never loses or double-counts
anything: the state after many crashes equals one uninterrupted validation.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.validation import ProjectSource, Validator
from tests.daemon_harness import Daemon, wait_until, write_config


def simulator(home: Path, groups: int, *, rate: float, seed: int = 1,
              crop_delay: float = 0.5) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.demo.simulator", "--decisions", str(decisions(home)),
         "--images", str(home / "photos"), "--project", "mojo3", "--groups", str(groups),
         "--rate", str(rate), "--seed", str(seed), "--crop-delay-seconds", str(crop_delay),
         "--commit-log", str(home / "commits.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


def state(home: Path) -> StateStore:
    return StateStore(home / "data" / "daemon" / "state.db", read_only=True)


def figures(home: Path) -> dict[str, int]:
    try:
        store = state(home)
    except Exception:  # not created yet
        return {"validated": -1, "pending_crops": -1}
    try:
        return store.row_figures("mojo3")
    except sqlite3.OperationalError:
        return {"validated": -1, "pending_crops": -1}
    finally:
        store.close()


def snapshot(store: StateStore) -> tuple[Any, ...]:
    rows = sorted(store.conn.execute(
        "SELECT row_key, digest, errors, warnings, pending_crop FROM row_state "
        "WHERE project = 'mojo3'").fetchall())
    issues = sorted((i.group_id or "", i.code, i.field or "", i.value_repr)
                    for i in store.issues("mojo3") if i.rowid is not None)
    return rows, issues


@pytest.fixture
def home(tmp_path: Path) -> Path:
    decisions(tmp_path).mkdir(parents=True)
    (tmp_path / "photos").mkdir()
    write_config(tmp_path / "config.toml", '[logging]\nlevel = "debug"\n',
                 image_roots={"mojo3": [tmp_path / "photos"]})
    return tmp_path


class TestEndToEnd:
    """One daemon, one busy upstream."""

    def test_rows_crops_sidecars_and_triggers(self, home: Path) -> None:
        daemon = Daemon(home / "config.toml")
        try:
            daemon.wait_event("service.started")
            sim = simulator(home, 30, rate=15)
            # faults dropped while it runs: a malformed sidecar and an orphan
            crop = home / "photos" / "__crop"
            wait_until(crop.exists, what="simulator's crop folder")
            (crop / "20250101_000000_stage2_upscaled.decision").write_text("{not json")
            (crop / "20250101_000001_stage2_upscaled.decision").write_text(json.dumps(
                {"group_id": "mojo3_group_nope", "project_id": "mojo3", "needs_crop": True}))
            (home / "data" / "triggers" / "inspect").write_text("")
            assert sim.wait(120) == 0, sim.stderr.read() if sim.stderr else ""
            wait_until(lambda: figures(home) == {**figures(home), "validated": 30,
                                                 "pending_crops": 0},
                       timeout=60, what="30 rows validated and every crop joined")
            wait_until(lambda: (home / "data" / "triggers" / "done" / "inspect").exists(),
                       what="inspect trigger done")
            crops = sum(1 for line in (home / "commits.jsonl").read_text().splitlines()
                        if json.loads(line)["event"] == "crop_update")

            def cropped_sidecars() -> int:
                store = state(home)
                try:
                    return sum(1 for r in store.conn.execute(
                        "SELECT folder_role FROM sidecars WHERE gone_at IS NULL AND kind = 'A'")
                        if r[0] == "cropped")
                finally:
                    store.close()

            # sidecar events settle before they are recorded: wait for them, not a fixed time
            wait_until(lambda: cropped_sidecars() == crops, timeout=30,
                       what=f"{crops} cropped sidecars recorded")
            store = state(home)
            codes = store.issue_codes("mojo3")
            sidecar_roles = Counter(r[0] for r in store.conn.execute(
                "SELECT folder_role FROM sidecars WHERE gone_at IS NULL AND kind = 'A'"))
            final = snapshot(store)
            store.close()
        finally:
            assert daemon.stop() == 0
        assert codes.get("sidecar_json_malformed") == 1 and codes.get("sidecar_orphan") == 1
        assert not [c for c in codes if c.startswith(("crop_", "image", "index"))], codes
        crops = sum(1 for line in (home / "commits.jsonl").read_text().splitlines()
                    if json.loads(line)["event"] == "crop_update")
        assert crops > 0 and sidecar_roles["cropped"] == crops
        # exactly once per content: no (row, digest) was checked twice
        checked = Counter((r["group_id"], r["digest"]) for r in daemon.records()
                          if r.get("event") == "validation.row_checked")
        assert checked and max(checked.values()) == 1, checked.most_common(3)
        assert len({g for g, _ in checked}) == 30
        fresh = StateStore(":memory:")
        settings = Settings().with_data_root(home / "data")
        Validator(fresh, settings).validate_project(
            ProjectSource("mojo3", decisions(home) / "mojo3.db"), full=True)
        assert snapshot(fresh) == final


class TestCrashSafety:
    """kill -9 at random moments of a busy run, 20 times; then compare with one clean run."""

    def test_twenty_kills(self, home: Path) -> None:
        rng = random.Random(20251125)
        sim = simulator(home, 160, rate=8, crop_delay=0.3)
        kills = 0
        try:
            while kills < 20:
                daemon = Daemon(home / "config.toml")
                daemon.wait_event("service.started", timeout=60)
                time.sleep(rng.uniform(0.05, 0.6))  # a random moment: that is the point
                daemon.kill()
                kills += 1
                beat = home / "data" / "daemon" / "heartbeat.json"
                if beat.exists():  # written atomically: never half a document
                    json.loads(beat.read_text())
            assert sim.wait(120) == 0
        finally:
            if sim.poll() is None:
                sim.kill()
        total = sqlite3.connect(decisions(home) / "mojo3.db").execute(
            "SELECT count(*) FROM ai_decisions").fetchone()[0]
        final = Daemon(home / "config.toml")
        try:
            # its SIGTERM handler exists from here: a stop sent while the interpreter still
            # imports would end it by the signal's default action (-15), whatever the data
            final.wait_event("service.started", timeout=60)
            wait_until(lambda: figures(home).get("validated") == total
                       and figures(home).get("pending_crops") == 0, timeout=60,
                       what=f"all {total} rows validated after {kills} kills")
            store = state(home)
            after_crashes = snapshot(store)
            cp = store.checkpoint("mojo3")
            store.close()
        finally:
            assert final.stop() == 0
        fresh = StateStore(":memory:")
        Validator(fresh, Settings().with_data_root(home / "data")).validate_project(
            ProjectSource("mojo3", decisions(home) / "mojo3.db"), full=True)
        assert after_crashes == snapshot(fresh)
        assert cp is not None and cp.row_count == total
        leftovers = [p for p in (home / "data").rglob("*") if p.is_file()
                     and p.name.endswith(".tmp") and not p.name.startswith(".")]
        assert leftovers == []
