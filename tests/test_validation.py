"""The incremental engine: only new and changed rows are checked, and the state stays equal to
a fresh full validation through inserts, in-place updates, deletes, VACUUM, replaced files,
crashes mid-run, locked and corrupt sources."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.decisions import checks as checks_module
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.validation import ProjectSource, Validator, discover_projects
from tests.conftest import NOW, codes_for


def state_snapshot(store: StateStore, project: str = "mojo3") -> tuple[Any, ...]:
    rows = sorted(store.conn.execute(
        "SELECT row_key, group_id, src_rowid, digest, errors, warnings, pending_crop "
        "FROM row_state WHERE project = ?", (project,)).fetchall())
    issues = sorted((i.group_id or "", i.rowid or 0, i.code, i.field or "", i.value_repr)
                    for i in store.issues(project))
    return rows, issues


def fresh_state(settings: Settings, project: str = "mojo3") -> tuple[Any, ...]:
    """What a brand-new state DB would hold after one full validation."""
    store = StateStore(":memory:")
    Validator(store, settings, clock=lambda: NOW).validate_project(
        ProjectSource(project, settings.project_db(project)), full=True)
    snap = state_snapshot(store, project)
    store.close()
    return snap


class TestIncremental:
    """New rows cost only themselves; in-place updates of pending crops are seen."""

    def test_second_run_checks_nothing(self, make_db: Any, validator: Validator) -> None:
        """Validating twice gives the same result and the second run checks 0 rows."""
        db = make_db()
        db.insert_many(300)
        first = validator.validate_all()[0]
        second = validator.validate_all()[0]
        assert first.rows_checked == 300 and second.rows_checked == 0
        assert second.mode == "incremental"
        assert (first.errors, first.warnings) == (second.errors, second.warnings)

    def test_only_new_rows_are_checked(self, make_db: Any, validator: Validator) -> None:
        """Rows appended after a run are the only ones read and checked next time."""
        db = make_db()
        db.insert_many(200)
        validator.validate_all()
        db.insert_many(7)
        result = validator.validate_all()[0]
        assert result.mode == "incremental"
        assert result.rows_checked == 7 and result.rows_total == 207

    def test_crop_finished_in_place_is_rechecked(
        self, make_db: Any, validator: Validator, store: StateStore, settings: Settings
    ) -> None:
        """The crop tool UPDATEs a pending row: it leaves the pending set, with its new box
        checked (a bad box is reported), without a full reconcile."""
        db = make_db(checks=False)
        db.insert_many(50)
        ok = db.insert(user_action="crop", final_crop_coords=None, crop_timestamp=None)
        bad = db.insert(user_action="crop", final_crop_coords=None, crop_timestamp=None)
        validator.validate_all()
        assert codes_for(store, ok["group_id"]) == {"crop_incomplete"}
        assert store.row_figures("mojo3")["pending_crops"] == 2

        db.update(ok["group_id"], final_crop_coords="[0.1, 0.2, 0.6, 0.7]",
                  crop_timestamp="2025-10-24T10:00:00Z")
        db.update(bad["group_id"], final_crop_coords="[0.0, 66.0, 1787.0, 1853.0]",
                  crop_timestamp="2025-10-24T10:00:00Z")
        result = validator.validate_all()[0]
        assert result.mode == "incremental" and result.rows_checked == 2
        assert codes_for(store, ok["group_id"]) == set()
        assert codes_for(store, bad["group_id"]) == {"crop_coords_pixels"}
        assert store.row_figures("mojo3")["pending_crops"] == 0
        assert state_snapshot(store) == fresh_state(settings)

    def test_hinted_group_is_rechecked(self, make_db: Any, validator: Validator,
                                       store: StateStore, settings: Settings) -> None:
        """A hint (a sidecar event names the group) re-reads exactly that row."""
        db = make_db(checks=False)
        rows = db.insert_many(20)
        validator.validate_all()
        db.update(rows[3]["group_id"], user_action="Crop")
        source = ProjectSource("mojo3", settings.project_db("mojo3"))
        result = validator.validate_project(source, hints=[rows[3]["group_id"]])
        assert result.rows_checked == 1
        assert codes_for(store, rows[3]["group_id"]) == {"user_action_invalid"}

    def test_other_in_place_update_is_caught_by_the_scheduled_reconcile(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """An UPDATE of a finished row is invisible to the rowid shortcut; the reconcile that
        runs once ``full_reconcile_minutes`` have passed catches it."""
        clock = [NOW]
        validator = Validator(store, settings, clock=lambda: clock[0])
        db = make_db(checks=False)
        rows = db.insert_many(30)
        validator.validate_all()
        db.update(rows[5]["group_id"], image_width=0)
        assert validator.validate_all()[0].rows_checked == 0
        clock[0] = NOW + timedelta(minutes=61)
        result = validator.validate_all()[0]
        assert result.mode == "full" and result.rows_checked == 1
        assert codes_for(store, rows[5]["group_id"]) == {"image_dimension_invalid"}

    def test_image_names_of_checked_rows_are_collected_once(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """The daemon learns which images just arrived from the run that checked their rows,
        without reading the DB a second time; unchanged rows add nothing."""
        validator = Validator(store, settings, clock=lambda: NOW, collect_images=True)
        db = make_db()
        db.insert_many(5)
        validator.validate_all()
        validator.take_checked_images("mojo3")
        new = db.insert_many(2)
        validator.validate_all()
        expected = {n for row in new for n in json.loads(row["images"])}
        assert validator.take_checked_images("mojo3") == expected
        validator.validate_all()
        assert validator.take_checked_images("mojo3") == set()

    def test_full_flag_rechecks_every_row(self, make_db: Any, validator: Validator) -> None:
        """``--full`` re-checks all rows even when nothing changed."""
        make_db().insert_many(40)
        validator.validate_all()
        assert validator.validate_all(full=True)[0].rows_checked == 40


class TestReconcile:
    """Whatever happens to the source, the state ends equal to a fresh full validation."""

    def test_deleted_rows_leave_the_state(self, make_db: Any, validator: Validator,
                                          store: StateStore, settings: Settings) -> None:
        """Deleting rows changes the count: a reconcile drops their state and issues."""
        db = make_db(checks=False)
        rows = db.insert_many(60)
        bad = db.insert(image_width=0)
        validator.validate_all()
        db.execute("DELETE FROM ai_decisions WHERE group_id IN (?, ?)",
                   (rows[10]["group_id"], bad["group_id"]))
        result = validator.validate_all()[0]
        assert result.mode == "full" and result.rows_deleted == 2
        assert codes_for(store, bad["group_id"]) == set()
        assert state_snapshot(store) == fresh_state(settings)

    def test_vacuum_renumbering_is_detected(self, make_db: Any, validator: Validator,
                                            store: StateStore, settings: Settings) -> None:
        """Delete one row and insert one, then VACUUM: the count is unchanged and the new row's
        rowid may be below the watermark, yet nothing is lost or double-counted."""
        db = make_db()
        rows = db.insert_many(80)
        validator.validate_all()
        db.execute("DELETE FROM ai_decisions WHERE group_id = ?", (rows[2]["group_id"],))
        new = db.insert()
        db.execute("VACUUM")
        result = validator.validate_all()[0]
        assert result.mode == "full"
        assert store.row_figures("mojo3")["validated"] == 80
        assert state_snapshot(store) == fresh_state(settings)
        assert new["group_id"] in {r[1] for r in state_snapshot(store)[0]}

    def test_insert_or_replace_is_not_double_counted(
        self, make_db: Any, validator: Validator, store: StateStore, settings: Settings
    ) -> None:
        """INSERT OR REPLACE gives a known group a new rowid: one row, checked again."""
        db = make_db()
        rows = db.insert_many(10)
        validator.validate_all()
        data = dict(rows[4], image_width=2048)
        cols = list(data)
        db.execute(f"INSERT OR REPLACE INTO ai_decisions ({', '.join(cols)}) "
                   f"VALUES ({', '.join('?' * len(cols))})", tuple(data.values()))
        result = validator.validate_all()[0]
        assert result.mode == "incremental" and result.rows_checked == 1
        assert store.row_figures("mojo3")["validated"] == 10
        assert state_snapshot(store) == fresh_state(settings)

    def test_replaced_file_triggers_reconcile(self, make_db: Any, validator: Validator,
                                              store: StateStore, settings: Settings) -> None:
        """A DB restored from another file (new inode) is reconciled, not trusted."""
        db = make_db()
        db.insert_many(20)
        validator.validate_all()
        db.close()
        other = settings.decisions_dir / "other.tmp"
        shutil.copy(db.path, other)
        Path(str(db.path) + "-wal").unlink(missing_ok=True)
        Path(str(db.path) + "-shm").unlink(missing_ok=True)
        other.replace(db.path)
        result = validator.validate_all()[0]
        assert result.mode == "full" and "inode" in (result.reason or "")
        assert state_snapshot(store) == fresh_state(settings)

    def test_rules_version_change_rechecks_everything(
        self, make_db: Any, validator: Validator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After an upgrade that changes a rule, every row is checked again."""
        make_db().insert_many(25)
        validator.validate_all()
        monkeypatch.setattr("daemon.validation.RULES_VERSION", 999)
        assert validator.validate_all()[0].rows_checked == 25

    def test_crash_mid_run_replays_to_the_same_state(
        self, make_db: Any, store: StateStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A failure in the third chunk keeps the two committed chunks (results and checkpoint
        together); the next run finishes and the state equals an uninterrupted run."""
        small = settings.model_copy(update={"validation": settings.validation.model_copy(
            update={"chunk_rows": 100})})
        small._base_dir = settings.base_dir
        db = make_db(checks=False)
        db.insert_many(350)
        real = checks_module.check_row
        calls = {"n": 0}

        class PowerCut(BaseException):
            """Not an Exception: the per-row guard turns those into issues, a crash is not."""

        def failing(row: Any, ctx: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 250:
                raise PowerCut("power cut")
            return real(row, ctx)

        monkeypatch.setattr("daemon.row_pass.check_row", failing)
        validator = Validator(store, small, clock=lambda: NOW)
        with pytest.raises(PowerCut):
            validator.validate_all()
        cp = store.checkpoint("mojo3")
        assert cp is not None and cp.row_count == 200 and cp.max_rowid == 200
        assert store.row_figures("mojo3")["validated"] == 200
        monkeypatch.setattr("daemon.row_pass.check_row", real)
        result = validator.validate_all()[0]
        assert result.rows_checked == 150
        assert state_snapshot(store) == fresh_state(settings)


class TestSources:
    """Locked, corrupt, foreign and drifted DBs: reported, retried, never fatal to others."""

    def test_locked_db_is_retried_until_the_writer_lets_go(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """A rollback-journal DB held by an EXCLUSIVE writer is retried, then read."""
        db = make_db(wal=False)
        db.insert_many(10)
        # the writer's connection is released from a timer thread while the reader waits
        db.conn.close()
        db.conn = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        db.insert()
        timer = threading.Timer(0.5, lambda: db.execute("COMMIT"))
        validator = Validator(store, settings, clock=lambda: NOW)
        timer.start()
        result = validator.validate_all()[0]
        timer.join()
        assert result.mode == "incremental" and result.rows_total == 11

    def test_db_locked_past_the_budget_is_skipped_not_failed(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """Past ``busy_retry_seconds`` the project is skipped for this round; others go on."""
        locked = make_db("locked", wal=False)
        locked.insert_many(5)
        make_db("free").insert_many(5)
        quick = settings.model_copy(update={"sources": settings.sources.model_copy(
            update={"busy_timeout_ms": 50, "busy_retry_seconds": 0.3})})
        quick._base_dir = settings.base_dir
        locked.execute("BEGIN EXCLUSIVE")
        results = {r.project: r for r in Validator(store, quick, clock=lambda: NOW).validate_all()}
        locked.execute("COMMIT")
        assert results["locked"].mode == "skipped" and results["locked"].schema_kind == "busy"
        assert results["free"].rows_checked == 5
        assert store.checkpoint("locked") is None

    def test_corrupt_db_is_reported_and_others_go_on(
        self, make_db: Any, validator: Validator, store: StateStore, settings: Settings
    ) -> None:
        """A file that is not SQLite becomes one db_unreadable issue for its project."""
        make_db("good").insert_many(5)
        (settings.decisions_dir / "broken.db").write_bytes(b"not a database" * 100)
        results = {r.project: r for r in validator.validate_all()}
        assert results["broken"].mode == "skipped"
        assert store.issue_codes("broken") == {"db_unreadable": 1}
        assert results["good"].rows_checked == 5

    def test_foreign_db_is_reported(self, validator: Validator, store: StateStore,
                                    settings: Settings) -> None:
        """A SQLite file without ai_decisions is named as not a decision DB."""
        conn = sqlite3.connect(settings.decisions_dir / "notes.db")
        conn.execute("CREATE TABLE notes (x)")
        conn.close()
        (result,) = validator.validate_all()
        assert result.schema_kind == "foreign"
        assert store.issue_codes("notes") == {"db_not_decision_db": 1}

    def test_legacy_17_column_db_validates(self, make_db: Any, validator: Validator,
                                           store: StateStore) -> None:
        """Older DBs lack ai_crop_accepted: one schema warning, rows validated normally."""
        from daemon.decisions.schema import COLUMNS

        db = make_db(checks=False, columns=COLUMNS[:-1])
        for _ in range(5):
            db.insert()
        (result,) = validator.validate_all()
        assert result.schema_kind == "v3_17" and result.rows_checked == 5
        codes = store.issue_codes("mojo3")
        assert codes.get("schema_missing_optional_column") == 1
        assert not [i for i in store.issues("mojo3", severity="error")]

    def test_partial_temp_db_named_explicitly(self, settings: Settings) -> None:
        """A temp DB with a few columns: required columns reported, rows still checked for
        what they have, nothing raised."""
        path = settings.decisions_dir / "mojo3_temp.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE ai_decisions (group_id TEXT PRIMARY KEY, images TEXT, "
                     "user_action TEXT, extra_note TEXT)")
        conn.execute("INSERT INTO ai_decisions VALUES ('g1', '[\"a.png\"]', 'maybe', 'x')")
        conn.commit()
        conn.close()
        store = StateStore(":memory:")
        result = Validator(store, settings, clock=lambda: NOW).validate_project(
            ProjectSource("mojo3", path), full=True)
        codes = store.issue_codes("mojo3")
        assert result.schema_kind == "partial" and result.rows_checked == 1
        assert codes["schema_missing_column"] == 5  # timestamp, project_id, index, w, h
        assert codes["schema_extra_column"] == 1
        assert codes["user_action_invalid"] == 1

    def test_discovery_ignores_temp_backup_and_side_files(
        self, make_db: Any, settings: Settings
    ) -> None:
        """Only live project DBs are processed without being named."""
        make_db("mojo3").insert_many(2)
        for name in ("mojo3_temp.db", "mojo3.db.backup-20251024_101500", "old_backup.db"):
            shutil.copy(settings.decisions_dir / "mojo3.db", settings.decisions_dir / name)
        assert [s.project for s in discover_projects(settings)] == ["mojo3"]


def test_json_written_by_json_dumps_is_what_the_checks_read() -> None:
    """Guard for the fixtures: the reviewer writes JSON with json.dumps defaults."""
    assert json.dumps([0.2, 0.0, 0.7, 0.6]) == "[0.2, 0.0, 0.7, 0.6]"


class TestProgress:
    """A long pass tells the daemon's health tick that work is moving."""

    def test_progress_is_reported_once_per_chunk(self, make_db: Any, store: StateStore,
                                                 settings: Settings) -> None:
        """A full pass over 1,000 rows in chunks of 100 reports progress at least 10 times."""
        db = make_db()
        db.insert_many(1000)
        settings = settings.model_copy(update={"validation": settings.validation.model_copy(
            update={"chunk_rows": 100})})
        beats: list[int] = []
        result = Validator(store, settings, clock=lambda: NOW,
                           progress=lambda: beats.append(1)).validate_all(full=True)[0]
        assert result.rows_checked == 1000
        assert len(beats) >= 10
