"""Issue 9, item 1 for rows and sidecars: one bad row, sidecar or project never stops anything.

Hostile values sit in real WAL decision DBs whose writer is still open; ``trainingd validate``
runs as a real subprocess (exit codes: 0 clean, 1 errors found, 70 internal failure, 78
config), and the daemon pipeline's reconcile runs in process on the same files.  Each test
uses a second, clean project that sorts after the bad one to prove the rest went on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.decisions.checks import CheckContext, check_box, check_images, check_row
from daemon.pipeline import Pipeline
from daemon.records import Issue
from daemon.settings import ProjectSettings, Settings
from daemon.sidecar_record import SIDECAR_KEY
from daemon.sidecars import parse_sidecar
from daemon.store import StateStore
from daemon.validation import Validator
from daemon.workqueue import Task
from tests.conftest import NOW

DEEP = "[" * 100_000
HUGE = "[" + "7" * 5_000 + ", 0, 1, 1]"
EXIT_INTERNAL = 70


def run_cli(args: list[str], settings: Settings, *, inject: str = "",
            **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m daemon ARGS`` in a real process; ``inject`` runs first (a fault at a seam)."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    environ.update(TRAININGD_PATHS__DATA_ROOT=str(settings.data_root), HF_HUB_OFFLINE="1",
                   **env)
    if inject:
        code = f"import sys\n{inject}\nfrom daemon.cli import main\nsys.exit(main({args!r}))\n"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", "daemon", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environ,
                          cwd=settings.base_dir)


def log_records(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every stderr line is one JSON log record or the one-line ``trainingd: ...`` message
    for a person: never a bare traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith(("{", "trainingd: ")) for line in lines), proc.stderr[-2000:]
    return [json.loads(line) for line in lines if line.startswith("{")]


def hostile_project(make_db: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Project ``aaa``: clean rows around a deep ``images``, a deep crop and a huge number."""
    db = make_db("aaa", checks=False)
    db.insert_many(3)
    bad = {
        "deep_images": db.insert(images=DEEP),
        "deep_crop": db.insert(final_crop_coords=DEEP),
        "huge_crop": db.insert(ai_crop_coords=HUGE),
        "huge_images": db.insert(images='["a.png", ' + "9" * 5_000 + "]"),
    }
    db.insert_many(2)
    return db, bad


def codes_by_group(issues: list[dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for i in issues:
        if i["group_id"] is not None:
            out.setdefault(i["group_id"], set()).add(i["code"])
    return out


def with_projects(settings: Settings, **projects: ProjectSettings) -> Settings:
    new = settings.model_copy(update={"projects": {**settings.projects, **projects}})
    new._base_dir = settings.base_dir
    return new


class TestPureChecks:
    """The row checks return findings for any value; they never raise."""

    @pytest.mark.parametrize(("raw", "code"), [
        (DEEP, "value_too_deep"),
        ("{" + '"a":{' * 50_000, "value_too_deep"),
        ('["a.png", ' + "1" * 4_301 + "]", "number_too_large"),
    ])
    def test_images_column(self, raw: str, code: str) -> None:
        """A deep or huge-number ``images`` value is one finding with its own code."""
        findings, names = check_images(raw)
        assert [(f.code, f.field) for f in findings] == [(code, "images")] and names is None
        assert len(findings[0].value_repr) < 300 and "characters" in findings[0].value_repr

    @pytest.mark.parametrize(("raw", "code"), [(DEEP, "value_too_deep"),
                                               (HUGE, "number_too_large")])
    def test_crop_column(self, raw: str, code: str) -> None:
        """A deep or huge-number crop value is one finding on that column."""
        findings, box = check_box("final_crop_coords", raw)
        assert [(f.code, f.field) for f in findings] == [(code, "final_crop_coords")]
        assert box is None

    def test_nesting_just_under_the_parser_limit(self) -> None:
        """A value the parser still accepts but ``repr`` might not is reported, not raised."""
        for depth in (900, 990, 999):
            raw = "[" + "[" * depth + "]" * depth + "]"
            findings, _ = check_images(raw)
            assert {f.code for f in findings} <= {"image_name_invalid", "value_too_deep"}
            assert findings

    def test_check_row_on_a_row_made_of_hostile_values(self, make_db: Any) -> None:
        """Every text column holding a hostile value still gives findings, not an exception."""
        db = make_db(checks=False)
        row = db.row()
        ctx = CheckContext(project="mojo3", now=NOW, columns=frozenset(row))
        for value in (DEEP, HUGE, "\x00" * 10, "\udcff"):
            hostile = {k: (value if isinstance(v, str) else v) for k, v in row.items()}
            values = (1, *(hostile[c] for c in row))
            assert check_row(values, ctx)


class TestValidatorGuards:
    """In process: rows and projects are isolated; checkpoints advance past bad rows."""

    def test_bad_rows_become_issues_and_the_checkpoint_passes_them(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """Deep and huge values get their codes; the checkpoint reaches the last row."""
        _, bad = hostile_project(make_db)
        make_db("bbb").insert_many(4)
        results = {r.project: r for r in Validator(store, settings,
                                                   clock=lambda: NOW).validate_all()}
        assert results["aaa"].rows_checked == 9 and results["bbb"].rows_checked == 4
        cp = store.checkpoint("aaa")
        assert cp is not None and (cp.max_rowid, cp.row_count) == (9, 9)
        by_gid = codes_by_group([i.to_dict() for i in store.issues("aaa")])
        assert by_gid[bad["deep_images"]["group_id"]] == {"value_too_deep"}
        assert "value_too_deep" in by_gid[bad["deep_crop"]["group_id"]]
        assert "number_too_large" in by_gid[bad["huge_crop"]["group_id"]]
        assert by_gid[bad["huge_images"]["group_id"]] == {"number_too_large"}
        assert store.row_figures("aaa")["validated"] == 9

    def test_an_unforeseen_exception_is_a_row_issue(
        self, make_db: Any, store: StateStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A check that raises for one row records row_check_failed with type and message."""
        db = make_db("aaa", checks=False)
        db.insert_many(2)
        victim = db.insert(user_action="approve")
        db.insert_many(2)
        make_db("bbb").insert_many(3)
        import daemon.row_pass as validation

        real = validation.check_row

        def flaky(row: Any, ctx: Any) -> Any:
            if row[1] == victim["group_id"]:
                raise KeyError("surprise")
            return real(row, ctx)

        monkeypatch.setattr(validation, "check_row", flaky)
        with capture_logs() as logs:
            Validator(store, settings, clock=lambda: NOW).validate_all()
        (issue,) = [i for i in store.issues("aaa") if i.group_id == victim["group_id"]]
        assert (issue.code, issue.severity) == ("row_check_failed", "error")
        assert "KeyError" in issue.value_repr and "surprise" in issue.value_repr
        cp = store.checkpoint("aaa")
        assert cp is not None and cp.max_rowid == 5
        assert store.row_figures("bbb")["validated"] == 3
        (event,) = [e for e in logs if e["event"] == "validation.row_check_failed"]
        assert isinstance(event["exc_info"], KeyError) and event["rowid"] == 3

    def test_a_failing_project_is_isolated_and_heals(
        self, make_db: Any, store: StateStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An unexpected error in one project is its issue; the next one is validated; the
        issue leaves once a pass succeeds."""
        make_db("aaa").insert_many(3)
        make_db("bbb").insert_many(3)
        validator = Validator(store, settings, clock=lambda: NOW)
        real = validator._validate_open

        def broken(reader: Any, project: str, *args: Any, **kwargs: Any) -> Any:
            if project == "aaa":
                raise ZeroDivisionError("bug")
            return real(reader, project, *args, **kwargs)

        monkeypatch.setattr(validator, "_validate_open", broken)
        with capture_logs() as logs:
            results = {r.project: r for r in validator.validate_all()}
        assert (results["aaa"].mode, results["aaa"].schema_kind) == ("skipped", "failed")
        assert results["aaa"].errors == 1 and results["bbb"].rows_checked == 3
        assert store.issue_codes("aaa") == {"project_check_failed": 1}
        (event,) = [e for e in logs if e["event"] == "validation.project_failed"]
        assert isinstance(event["exc_info"], ZeroDivisionError)
        monkeypatch.setattr(validator, "_validate_open", real)
        assert validator.validate_all()[0].rows_checked == 3
        assert "project_check_failed" not in store.issue_codes("aaa")

    def test_a_configured_project_without_a_db_is_reported_once(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """No DB yet: one db_missing warning and one log line, never db_unreadable; the
        record leaves when the reviewer's first save creates the DB."""
        make_db("bbb").insert_many(2)
        s = with_projects(settings, aaa=ProjectSettings())
        validator = Validator(store, s, clock=lambda: NOW)
        with capture_logs() as logs:
            first = {r.project: r for r in validator.validate_all()}
            second = {r.project: r for r in Validator(store, s,
                                                      clock=lambda: NOW).validate_all()}
        for results in (first, second):
            assert (results["aaa"].schema_kind, results["aaa"].errors) == ("missing", 0)
            assert results["aaa"].warnings == 1 and results["bbb"].rows_checked in (0, 2)
        assert store.issue_codes("aaa") == {"db_missing": 1}
        (issue,) = store.issues("aaa")
        assert "paths.decisions_dir" in issue.message and "first saves" in issue.message
        assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == [
            "validation.db_missing"]
        make_db("aaa").insert_many(2)
        assert validator.validate_all()[0].rows_checked == 2
        assert "db_missing" not in store.issue_codes("aaa")

    def test_a_db_that_vanishes_after_validation_is_an_error(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """A DB that was there and is gone is not 'not created yet': db_unreadable says so."""
        db = make_db("aaa")
        db.insert_many(2)
        s = with_projects(settings, aaa=ProjectSettings())
        validator = Validator(store, s, clock=lambda: NOW)
        validator.validate_all()
        db.close()
        db.path.unlink()
        Path(str(db.path) + "-wal").unlink(missing_ok=True)
        Path(str(db.path) + "-shm").unlink(missing_ok=True)
        (result,) = validator.validate_all()
        assert result.schema_kind == "unreadable"
        (issue,) = [i for i in store.issues("aaa") if i.code == "db_unreadable"]
        assert "is gone now" in issue.message


@pytest.mark.slow
class TestValidateCommand:
    """``trainingd validate`` and ``inspect`` as real processes: exit codes and records."""

    def test_hostile_rows_exit_1_and_the_next_project_is_validated(
        self, make_db: Any, settings: Settings
    ) -> None:
        """Exit 1 (errors found), the specific codes, bbb validated, logs only as JSON."""
        _, bad = hostile_project(make_db)
        make_db("bbb").insert_many(4)
        proc = run_cli(["validate", "--json"], settings)
        assert proc.returncode == 1, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        projects = {p["project"]: p for p in doc["projects"]}
        assert projects["aaa"]["rows_checked"] == 9 and projects["bbb"]["rows_checked"] == 4
        assert projects["bbb"]["errors"] == 0
        by_gid = codes_by_group(doc["issues"])
        assert by_gid[bad["deep_images"]["group_id"]] == {"value_too_deep"}
        assert by_gid[bad["huge_images"]["group_id"]] == {"number_too_large"}
        assert "Traceback" not in proc.stderr
        events = [r["event"] for r in log_records(proc)]
        assert events.count("validation.project_checked") == 2
        # the next run starts after the bad rows: the checkpoint moved past them
        again = run_cli(["validate", "--json"], settings)
        assert again.returncode == 1
        assert {p["project"]: p["rows_checked"] for p in json.loads(again.stdout)["projects"]} \
            == {"aaa": 0, "bbb": 0}

    def test_a_project_failure_exits_70_after_the_others(
        self, make_db: Any, settings: Settings
    ) -> None:
        """An unexpected error in aaa: bbb is still validated, the record and the structured
        traceback are there, and the exit code says internal failure."""
        make_db("aaa").insert_many(2)
        make_db("bbb").insert_many(3)
        inject = (
            "from daemon.validation import Validator\n"
            "real = Validator._validate_open\n"
            "def broken(self, reader, project, *a, **k):\n"
            "    if project == 'aaa':\n"
            "        raise ZeroDivisionError('planted bug')\n"
            "    return real(self, reader, project, *a, **k)\n"
            "Validator._validate_open = broken\n"
        )
        proc = run_cli(["validate", "--json"], settings, inject=inject)
        assert proc.returncode == EXIT_INTERNAL, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        projects = {p["project"]: p for p in doc["projects"]}
        assert projects["aaa"]["schema_kind"] == "failed"
        assert projects["bbb"]["rows_checked"] == 3
        assert {i["code"] for i in doc["issues"] if i["project"] == "aaa"} == {
            "project_check_failed"}
        (failed,) = [r for r in log_records(proc) if r["event"] == "validation.project_failed"]
        assert failed["level"] == "error" and failed["error_type"] == "ZeroDivisionError"
        assert "planted bug" in json.dumps(failed["exception"])

    def test_an_unexpected_exception_exits_70_with_a_structured_record(
        self, make_db: Any, settings: Settings
    ) -> None:
        """A bug outside the guards is one JSON error record with the traceback, exit 70."""
        make_db("aaa").insert_many(2)
        inject = ("import daemon.cli\n"
                  "def boom(*a, **k):\n"
                  "    raise RuntimeError('planted bug')\n"
                  "daemon.cli._run_validation = boom\n")
        proc = run_cli(["validate"], settings, inject=inject)
        assert proc.returncode == EXIT_INTERNAL
        (record,) = [r for r in log_records(proc) if r.get("event") == "cli.internal_failure"]
        assert record["error_type"] == "RuntimeError" and record["command"] == "validate"
        assert "planted bug" in json.dumps(record["exception"])
        assert "Traceback (most recent call last)" not in proc.stderr

    def test_an_unusable_state_db_is_not_errors_found(
        self, make_db: Any, settings: Settings
    ) -> None:
        """Our own state DB failing is an internal failure (70), never exit 1."""
        make_db("aaa").insert_many(2)
        settings.state_db.parent.mkdir(parents=True, exist_ok=True)
        settings.state_db.mkdir()  # a folder where the state DB belongs
        proc = run_cli(["validate"], settings)
        assert proc.returncode == EXIT_INTERNAL, (proc.returncode, proc.stderr[-2000:])
        assert "Traceback (most recent call last)" not in proc.stderr

    def test_a_configured_project_without_a_db_exits_0(
        self, make_db: Any, settings: Settings
    ) -> None:
        """A project listed in config.toml with no DB yet is a warning, not an error."""
        make_db("bbb").insert_many(2)
        (settings.base_dir / "config.toml").write_text("[projects.aaa]\n")
        proc = run_cli(["validate", "--json"], settings)
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        (issue,) = [i for i in doc["issues"] if i["project"] == "aaa"]
        assert (issue["code"], issue["severity"]) == ("db_missing", "warning")
        text = run_cli(["validate"], settings)
        assert text.returncode == 0 and "restore it from a backup" not in text.stdout
        assert "aaa: skipped (no DB file yet)" in text.stdout

    def test_inspect_writes_its_report_despite_hostile_rows(
        self, make_db: Any, settings: Settings
    ) -> None:
        """inspect reports hostile rows (exit 0: errors in the data are its result)."""
        hostile_project(make_db)
        make_db("bbb").insert_many(2)
        proc = run_cli(["inspect"], settings)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(Path(proc.stdout.split()[0]).read_text())
        codes = {i["code"] for i in report["issues"]}
        assert {"value_too_deep", "number_too_large"} <= codes

    def test_inspect_exits_70_when_a_project_failed(
        self, make_db: Any, settings: Settings
    ) -> None:
        """inspect still writes the report, but a failed project makes it exit 70."""
        make_db("aaa").insert_many(2)
        make_db("bbb").insert_many(2)
        inject = (
            "from daemon.validation import Validator\n"
            "real = Validator._validate_open\n"
            "def broken(self, reader, project, *a, **k):\n"
            "    if project == 'aaa':\n"
            "        raise ZeroDivisionError('planted bug')\n"
            "    return real(self, reader, project, *a, **k)\n"
            "Validator._validate_open = broken\n"
        )
        proc = run_cli(["inspect"], settings, inject=inject)
        assert proc.returncode == EXIT_INTERNAL, proc.stderr[-2000:]
        assert Path(proc.stdout.split()[0]).is_file()


class TestDaemonReconcile:
    """The daemon's startup reconcile gets through hostile rows and hostile sidecars."""

    def test_reconcile_validates_every_project_and_advances_the_checkpoint(
        self, make_db: Any, store: StateStore, settings: Settings
    ) -> None:
        """Bad rows in aaa: its checkpoint reaches the last row, bbb is validated, and the
        reconcile goes on to queue the trigger pass."""
        hostile_project(make_db)
        make_db("bbb").insert_many(4)
        queued: list[Task] = []
        pipe = Pipeline(settings, store, queued.append, clock=lambda: NOW)
        out = pipe.handle(Task("reconcile"), lambda: False)
        validated = {r["project"]: r for r in out["validated"]}
        assert validated["aaa"]["rows_checked"] == 9 and validated["bbb"]["rows_checked"] == 4
        cp = store.checkpoint("aaa")
        assert cp is not None and cp.max_rowid == 9 and not cp.needs_full
        assert "triggers" in {t.kind for t in queued}
        assert {"value_too_deep", "number_too_large"} <= set(store.issue_codes("aaa"))

    def test_hostile_sidecars_are_issue_records(
        self, make_db: Any, store: StateStore, settings: Settings, tmp_path: Path
    ) -> None:
        """A deep, a huge-number, a binary sidecar, a FIFO, a folder and a symlink named
        ``*.decision`` each become an issue record; a good sidecar beside them is recorded."""
        db = make_db("aaa")
        (row,) = db.insert_many(1)
        root = tmp_path / "images"
        crop = root / "__crop"
        crop.mkdir(parents=True)
        good = crop / "good.decision"
        good.write_text(json.dumps({"group_id": row["group_id"], "project_id": "aaa",
                                    "needs_crop": True}))
        (crop / "good.png").write_bytes(b"not really a png")
        (crop / "deep.decision").write_text("[" * 100_000)
        (crop / "huge.decision").write_text('{"group_id": "g", "project_id": "aaa", '
                                            '"needs_crop": ' + "1" * 5_000 + "}")
        (crop / "binary.decision").write_bytes(bytes(range(256)) * 4)
        os.mkfifo(crop / "pipe.decision")
        (crop / "folder.decision").mkdir()
        (crop / "link.decision").symlink_to(good)
        s = with_projects(settings, aaa=ProjectSettings(image_roots=[root]))
        pipe = Pipeline(s, store, lambda task: None, clock=lambda: NOW)
        names = ["deep", "huge", "binary", "pipe", "folder", "link", "good"]
        paths = frozenset(str(crop / f"{n}.decision") for n in names)
        stats = pipe.handle(Task("sidecar", "aaa", paths=paths), lambda: False)
        assert stats["parsed"] == 7 and stats["gone"] == 0
        by_path = {i.db_file: i.code for i in store.issues("aaa") if i.db_file in paths}
        assert by_path == {
            str(crop / "deep.decision"): "sidecar_json_malformed",
            str(crop / "huge.decision"): "sidecar_json_malformed",
            str(crop / "binary.decision"): "sidecar_json_malformed",
            str(crop / "pipe.decision"): "sidecar_unreadable",
            str(crop / "folder.decision"): "sidecar_unreadable",
            str(crop / "link.decision"): "sidecar_unreadable",
        }
        kinds = dict(store.conn.execute("SELECT path, kind FROM sidecars").fetchall())
        assert kinds[str(good)] == "A"
        # the scan of the image root meets the same files and still never raises
        scanned = pipe.handle(Task("scan", "aaa"), lambda: False)
        assert scanned["sidecars"]["parsed"] >= 6
        assert all(k.startswith(SIDECAR_KEY) for k, in store.conn.execute(
            "SELECT row_key FROM issues WHERE code LIKE 'sidecar_%'"))

    def test_huge_number_sidecar_names_the_digit_limit(self, tmp_path: Path) -> None:
        """The message says what is wrong with the file; value_repr shows its head and size."""
        path = tmp_path / "huge.decision"
        raw = '{"group_id": "g", "needs_crop": ' + "1" * 5_000 + "}"
        path.write_text(raw)
        result = parse_sidecar(path, project="aaa", image_root=tmp_path)
        assert isinstance(result, Issue) and result.code == "sidecar_json_malformed"
        assert "more than 4300 digits" in result.message
        assert result.value_repr.endswith(f"... ({len(raw)} bytes)")
