"""The command line as a user meets it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], settings: Settings, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    environ.update(TRAININGD_PATHS__DATA_ROOT=str(settings.data_root), **env)
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True,
                          text=True, timeout=120, env=environ, cwd=settings.base_dir)


class TestValidate:
    """Exit codes and the JSON document."""

    def test_clean_db_exits_0(self, make_db: Any, settings: Settings) -> None:
        make_db().insert_many(20)
        proc = run(["validate"], settings)
        assert proc.returncode == 0, proc.stderr
        assert "mojo3: incremental; 20 rows, 20 checked, 0 error(s)" in proc.stdout

    def test_errors_exit_1_and_json_lists_them(self, make_db: Any, settings: Settings) -> None:
        db = make_db(checks=False)
        db.insert_many(10)
        bad = db.insert(final_crop_coords="[0.0, 66.0, 1787.0, 1853.0]", user_action="crop",
                        crop_timestamp="2025-10-24T10:00:00Z")
        proc = run(["validate", "--json"], settings)
        assert proc.returncode == 1, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["totals"]["rows"] == 11 and doc["totals"]["errors"] == 1
        (err,) = [i for i in doc["issues"] if i["severity"] == "error"]
        assert err["code"] == "crop_coords_pixels" and err["group_id"] == bad["group_id"]
        assert err["value_repr"] == repr("[0.0, 66.0, 1787.0, 1853.0]") and err["rowid"] == 11
        # logs went to stderr as JSON lines, so stdout stays one document
        events = [json.loads(line)["event"] for line in proc.stderr.splitlines()]
        assert "validation.project_checked" in events

    def test_explicit_backup_db_is_checked_without_touching_state(
        self, make_db: Any, settings: Settings
    ) -> None:
        """``--db`` validates a non-live file (backup) ad hoc; the state DB is not created."""
        db = make_db("mojo3", checks=False)
        db.insert(image_height=0)
        db.close()
        backup = settings.decisions_dir / "mojo3.db.backup-20251024_101500"
        backup.write_bytes(db.path.read_bytes())
        proc = run(["validate", "--db", str(backup)], settings)
        assert proc.returncode == 1 and "image_dimension_invalid" in proc.stdout
        assert not settings.state_db.exists()

    def test_unknown_project_is_a_usage_error(self, make_db: Any, settings: Settings) -> None:
        make_db().insert_many(1)
        proc = run(["validate", "--project", "nope"], settings)
        assert proc.returncode == 78 and "unknown project(s) nope" in proc.stderr


class TestInspectAndStatus:
    """The playbook's inspection report and the per-project status table."""

    def test_inspection_report_files(self, make_db: Any, settings: Settings) -> None:
        db = make_db(checks=False)
        db.insert_many(60)
        db.insert(user_action="Approve")
        proc = run(["inspect"], settings)
        assert proc.returncode == 0, proc.stderr
        json_path, md_path = (Path(p) for p in proc.stdout.split())
        assert json_path.parent == settings.summaries_dir
        assert json_path.name.startswith("ai_training_inspection_") and md_path.suffix == ".md"
        report = json.loads(json_path.read_text())
        (project,) = report["projects"]
        assert len(project["first_rows"]) == 50
        first = project["first_rows"][0]
        assert first["rowid"] == "1" and first["group_id"].startswith("'mojo3_group_")
        assert report["counts_by_project"] == {"mojo3": 61}
        assert sum(report["counts_by_user_action"].values()) == 61
        assert report["counts_by_user_action"]["Approve"] == 1
        assert [r["codes"] for r in report["invalid_rows"]] == [["user_action_invalid"]]
        assert project["schema"]["kind"] == "canonical"
        assert "schema_missing_check" in {i["code"] for i in report["issues"]}
        md = md_path.read_text()
        assert "user_action_invalid" in md and "First 50 rows of mojo3" in md

    def test_status_shows_per_project_figures(self, make_db: Any, settings: Settings) -> None:
        db = make_db(checks=False)
        db.insert_many(12)
        db.insert(user_action="crop", final_crop_coords=None, crop_timestamp=None)
        make_db("mojo4").insert_many(3)
        assert run(["validate", "--project", "mojo3"], settings).returncode == 0
        proc = run(["status", "--json"], settings)
        doc = {p["project"]: p for p in json.loads(proc.stdout)["projects"]}
        assert doc["mojo3"]["rows"] == 13 and doc["mojo3"]["validated"] == 13
        assert doc["mojo3"]["pending_crops"] == 1 and doc["mojo3"]["errors"] == 0
        assert doc["mojo4"]["validated"] == 0 and doc["mojo4"]["last_check"] is None
        table = run(["status"], settings).stdout
        assert "pending crops" in table and "mojo4" in table


@pytest.mark.parametrize("command", [["validate"], ["status"], ["inspect"]])
def test_commands_do_not_import_torch(command: list[str], make_db: Any,
                                      settings: Settings) -> None:
    """validate, status and inspect start fast and never touch torch or a GPU."""
    make_db().insert_many(3)
    code = (f"import sys; from daemon.cli import main; rc = main({command!r}); "
            "sys.exit(99 if 'torch' in sys.modules else rc)")
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    environ["TRAININGD_PATHS__DATA_ROOT"] = str(settings.data_root)
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=60)
    # status without a daemon: 3, LSB "not running"
    assert proc.returncode == (3 if command == ["status"] else 0), proc.stderr

