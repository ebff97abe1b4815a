"""Backfill of the legacy CSV logs: the real files (tests/fixtures/legacy: the two selection logs
whole, a subset of the crop log), and one hand-made CSV per known fault, each asserting the exact
reason code and that no other line was lost."""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemon.backfill import (
    BackfillError,
    BackfillOptions,
    TargetExistsError,
    parse_window,
    run_backfill,
    write_report,
)
from daemon.backfill.convert import bare_name, project_from_path
from daemon.backfill_cli import (
    EXIT_CANTCREAT,
    add_backfill_parser,
    cmd_backfill,
    default_out_dir,
)
from daemon.codes import CODES
from daemon.decisions.schema import COLUMNS
from daemon.images import parse_stage
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.validation import ProjectSource, Validator
from tests.conftest import fixture_path

LEGACY = fixture_path("legacy")
#: 376 of the crop log's 7,194 lines (lines 2-4 and every repeated image among them); the
#: counts asserted below are the subset's (tests/fixtures/README.md says how it is cut).
CROP_LOG = LEGACY / "select_crop_log_subset.csv"
CROP_LINES = 376
ANOMALY = LEGACY / "anomaly_cases.csv"
HISTORICAL = LEGACY / "historical_selection_log.csv"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

CROP_HEADER = ("session_id,set_id,directory,image_count,chosen_index,chosen_path,crop_x1,crop_y1,"
               "crop_x2,crop_y2,timestamp,image_0_path,image_0_stage,width_0,height_0,"
               "image_1_path,image_1_stage,width_1,height_1")
S1 = "20250705_230600_stage1_generated.png"


def crop_line(name: str = "mojo1/20250705_230713_stage3_enhanced.png",
              box: str = "0.0,66.0,1787.0,1853.0", ts: str = "2025-10-08T18:47:32.429632Z",
              width: str = "3072", height: str = "3072", extra: str = ",,,,") -> str:
    """One crop-log line with one image (the chosen one) and an empty second block."""
    return (f"2025-10-08 14:46:56,s1,mojo1,1,0,{name},{box},{ts},{name},stage3_enhanced,"
            f"{width},{height}{extra}")


def write_csv(folder: Path, lines: list[str], header: str = CROP_HEADER,
              name: str = "log.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def settings_for(tmp: Path) -> Settings:
    return Settings().with_data_root(tmp / "data")


def backfill(tmp: Path, csvs: list[Path], **kw: Any) -> dict[str, Any]:
    """Run a backfill with the API and return its inspection report (parsed JSON)."""
    s = settings_for(tmp)
    opts = BackfillOptions(csv_paths=tuple(csvs), out_dir=default_out_dir(s),
                           data_root=s.data_root, forbidden_dirs=(s.decisions_dir,), **kw)
    with run_backfill(opts) as outcome:
        json_path, md_path = write_report(opts, outcome, s.summaries_dir, NOW)
    assert md_path.is_file()
    report: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
    report["_json_path"] = str(json_path)
    return report


def codes(report: dict[str, Any]) -> list[str]:
    return [r["code"] for r in report["rejected_lines"]]


def note_codes(report: dict[str, Any]) -> list[str]:
    return [r["code"] for r in report["conversion_notes"]]


def db_rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM ai_decisions ORDER BY group_id")
        return [dict(zip(COLUMNS, r, strict=True)) for r in cur]
    finally:
        conn.close()


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def validate(db: Path, project: str) -> tuple[int, Counter[str]]:
    """Errors and issue codes the real validator reports for ``db``."""
    store = StateStore(":memory:")
    try:
        result = Validator(store, Settings()).validate_project(ProjectSource(project, db),
                                                               full=True)
        return result.errors, Counter(i.code for i in store.issues(project))
    finally:
        store.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(root: Path, name: str, size: tuple[int, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(root / name)


# -- the real files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("crop")
    before = sha256(CROP_LOG)
    report = backfill(tmp, [CROP_LOG], project="mojo1", project_from="fixed", execute=True)
    report["_sha_before"] = before
    report["_db"] = default_out_dir(settings_for(tmp)) / "mojo1.db"
    yield report


@pytest.fixture(scope="module")
def crop_rows(crop_run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["group_id"]: r for r in db_rows(crop_run["_db"])}


def real_crop_lines() -> list[tuple[int, list[str]]]:
    with CROP_LOG.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [(n, row) for n, row in enumerate(reader, start=2)]


class TestRealCropLog:
    def test_every_line_is_converted_or_rejected(self, crop_run: dict[str, Any]) -> None:
        """All 376 lines are accounted for, and the per-code counts add up to the rejections."""
        t = crop_run["totals"]
        assert t["lines"] == CROP_LINES == len(real_crop_lines())
        assert t["converted"] + t["rejected"] == CROP_LINES
        assert len(crop_run["rejected_lines"]) == t["rejected"]
        errors = {c: n for c, n in crop_run["counts_by_code"].items()
                  if CODES[c].severity == "error"}
        assert sum(errors.values()) == t["rejected"]
        assert Counter(codes(crop_run)) == Counter(errors)
        assert sum(crop_run["counts_by_user_action"].values()) == t["converted"]
        assert crop_run["counts_by_project"] == {"mojo1": t["converted"]}
        assert len(db_rows(crop_run["_db"])) == t["converted"]
        assert len({(r["file"], r["line"]) for r in crop_run["rejected_lines"]}) == t["rejected"]

    def test_duplicates_are_exactly_the_repeated_images(self, crop_run: dict[str, Any]) -> None:
        """The only rejections are images logged again, and a direct count agrees."""
        seen: set[str] = set()
        repeats = []
        for n, row in real_crop_lines():
            name = bare_name(row[5])
            if name in seen:
                repeats.append(n)
            seen.add(name)
        assert codes(crop_run) == ["backfill_duplicate_image"] * len(repeats)
        assert [r["line"] for r in crop_run["rejected_lines"]] == repeats

    def test_pixel_boxes_are_normalized(self, crop_rows: dict[str, dict[str, Any]]) -> None:
        """Line 3 (0,66,1787,1853 on 3072x3072) and two others match hand-computed boxes."""
        row = crop_rows["mojo1_legacy_20250705_230713"]
        assert json.loads(row["final_crop_coords"]) == [0.0, 66 / 3072, 1787 / 3072, 1853 / 3072]
        assert row["user_action"] == "crop"
        assert row["crop_timestamp"] == row["timestamp"] == "2025-10-08T18:47:32.429632Z"
        assert (row["image_width"], row["image_height"]) == (3072, 3072)
        assert json.loads(row["images"]) == ["20250705_230713_stage3_enhanced.png"]
        row = crop_rows["mojo1_legacy_20250705_234620"]  # line 4: 0,335,1651,1986
        assert json.loads(row["final_crop_coords"]) == [0.0, 335 / 3072, 1651 / 3072, 1986 / 3072]
        # line 2 is the one normalized row (two images): kept as logged, stage order kept
        row = crop_rows["mojo1_legacy_20250708_060530"]
        assert json.loads(row["final_crop_coords"]) == [0.0, 0.0673828125, 0.54736328125,
                                                        0.61474609375]
        assert json.loads(row["images"]) == ["20250708_060416_stage1_generated.png",
                                             "20250708_060530_stage2_upscaled.png"]
        assert row["user_selected_index"] == 1
        assert (row["image_width"], row["image_height"]) == (2048, 2048)

    def test_full_frame_rows_become_approve(self, crop_run: dict[str, Any],
                                            crop_rows: dict[str, dict[str, Any]]) -> None:
        """58 lines are full-frame (553 in the whole log); those not repeated are approves with
        [0, 0, 1, 1]."""
        full, full_kept, seen = 0, 0, set()
        for _, row in real_crop_lines():
            x1, y1, x2, y2 = map(float, row[6:10])
            w, h = float(row[13]), float(row[14])
            if max(x1, y1, x2, y2) > 1:
                x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
            is_full = all(abs(v - f) <= 0.001 for v, f in zip((x1, y1, x2, y2), (0, 0, 1, 1),
                                                               strict=True))
            name = bare_name(row[5])
            full += is_full
            full_kept += is_full and name not in seen
            seen.add(name)
        assert full == 58
        approves = [r for r in crop_rows.values() if r["user_action"] == "approve"]
        assert len(approves) == full_kept == crop_run["counts_by_user_action"]["approve"]
        assert {r["final_crop_coords"] for r in approves} == {"[0.0, 0.0, 1.0, 1.0]"}
        assert note_codes(crop_run).count("backfill_full_frame_as_approve") == full_kept

    def test_original_bytes_unchanged(self, crop_run: dict[str, Any]) -> None:
        """The input CSV's sha256 is the same after the run, and the report records it."""
        assert sha256(CROP_LOG) == crop_run["_sha_before"]
        assert crop_run["inputs"][0]["sha256"] == crop_run["_sha_before"]

    def test_db_passes_the_validator(self, crop_run: dict[str, Any]) -> None:
        """The produced DB has zero validation errors; warnings are only aspect mismatches."""
        errors, found = validate(crop_run["_db"], "mojo1")
        assert errors == 0
        assert set(found) <= {"crop_aspect_mismatch"}


@pytest.fixture(scope="module")
def anomaly_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image files for every chosen image of the anomaly and historical logs."""
    root = tmp_path_factory.mktemp("images")
    for path, col in ((ANOMALY, "chosen_path"), (HISTORICAL, "chosen_path")):
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                make_image(root / "sub folder", bare_name(row[col]), (16, 24))
    return root


class TestRealSelectionLogs:
    def test_anomaly_cases_pick_below_highest_stage(self, tmp_path: Path,
                                                    anomaly_root: Path) -> None:
        """Every anomaly case becomes an approve whose pick is below the group's highest stage."""
        report = backfill(tmp_path, [ANOMALY], image_roots=(anomaly_root,), execute=True)
        assert report["totals"] == {"lines": 518, "converted": 518, "rejected": 0,
                                    "warnings": 518}
        assert set(note_codes(report)) == {"backfill_size_from_image_file"}
        total = 0
        for target in report["targets"]:
            db = Path(target["db_file"])
            rows = db_rows(db)
            total += len(rows)
            for row in rows:
                images = json.loads(row["images"])
                stages = [parse_stage(n) for n in images]
                assert stages == sorted(stages)  # type: ignore[type-var]
                picked = stages[row["user_selected_index"]]
                assert picked is not None and picked < max(s for s in stages if s is not None)
                assert row["user_action"] == "approve" and row["final_crop_coords"] is None
            assert validate(db, target["project"])[0] == 0
        assert total == 518
        assert report["counts_by_project"]["tattersail-0918"] == 187

    def test_anomaly_without_image_root_is_rejected(self, tmp_path: Path) -> None:
        """Selection logs carry no size: without an image root every line says so."""
        report = backfill(tmp_path, [ANOMALY])
        assert Counter(codes(report)) == {"backfill_image_size_missing": 518}

    def test_historical_selection_log_converts(self, tmp_path: Path,
                                               anomaly_root: Path) -> None:
        """JSON negatives and file-name timestamps convert; mojo1_final/_x/ is project mojo1."""
        sha = sha256(HISTORICAL)
        report = backfill(tmp_path, [HISTORICAL], image_roots=(anomaly_root,), execute=True)
        assert report["totals"]["converted"] == 23 and report["totals"]["rejected"] == 0
        assert report["counts_by_project"] == {"mojo1": 23}
        rows = db_rows(Path(report["created"][0]))
        first = next(r for r in rows if r["group_id"] == "mojo1_legacy_20250727_224840")
        assert json.loads(first["images"]) == ["20250727_224840_stage1_generated.png",
                                               "20250727_224840_stage1.5_face_swapped.png"]
        assert first["user_selected_index"] == 0
        assert first["timestamp"] == "2025-07-27T22:48:40Z"
        assert validate(Path(report["created"][0]), "mojo1")[0] == 0
        assert sha256(HISTORICAL) == sha


# -- one hand-made CSV per fault ------------------------------------------------------------------


class TestFaults:
    def test_zero_dimensions_without_image_is_rejected(self, tmp_path: Path) -> None:
        """Width 0 and no image under a root: backfill_image_size_missing, the other line kept."""
        csv_path = write_csv(tmp_path, [crop_line(width="0"),
                                        crop_line(name="mojo1/20250705_230800_stage3_enhanced"
                                                  ".png")])
        report = backfill(tmp_path, [csv_path])
        assert codes(report) == ["backfill_image_size_missing"]
        assert report["rejected_lines"][0]["line"] == 2
        assert report["totals"]["converted"] == 1

    def test_zero_dimensions_read_from_image_file(self, tmp_path: Path) -> None:
        """Width 0 with the image under --image-root: the size comes from the file."""
        make_image(tmp_path / "root" / "a b", "20250705_230713_stage3_enhanced.png", (2000, 1000))
        csv_path = write_csv(tmp_path, [crop_line(box="100,100,1100,600", width="0",
                                                  height="")])
        report = backfill(tmp_path, [csv_path], image_roots=(tmp_path / "root",), execute=True)
        assert codes(report) == []
        assert note_codes(report) == ["backfill_size_from_image_file"]
        row = db_rows(Path(report["created"][0]))[0]
        assert (row["image_width"], row["image_height"]) == (2000, 1000)
        assert json.loads(row["final_crop_coords"]) == [0.05, 0.1, 0.55, 0.6]

    def test_column_shifted_row(self, tmp_path: Path) -> None:
        """A 9-field line under the 19-field header (timestamp in crop_x2) is a shifted row."""
        shifted = ("2025-10-08 14:46:56,s1,mojo1,mojo1/20250705_230900_stage3_enhanced.png,"
                   "0,0,2025-10-08T18:47:32Z,10,20")
        csv_path = write_csv(tmp_path, [crop_line(), shifted, "sid,s2,mojo1,1,0,mojo1/x.png,"
                                        "0,0,2025-10-08T18:47:32Z,10,20,mojo1/x.png,s,5,5,,,,"])
        report = backfill(tmp_path, [csv_path])
        assert codes(report) == ["backfill_row_shifted", "backfill_row_shifted"]
        assert report["rejected_lines"][1]["field"] == "crop_x2"
        assert report["totals"]["converted"] == 1

    def test_placeholder_crop_becomes_approve(self, tmp_path: Path) -> None:
        """A (0,0,1,1) placeholder and a pixel full frame are approves with [0, 0, 1, 1]."""
        csv_path = write_csv(tmp_path, [crop_line(box="0,0,1,1"), crop_line(
            name="mojo1/20250705_231000_stage3_enhanced.png", box="0,0,3072,3072")])
        report = backfill(tmp_path, [csv_path], execute=True)
        assert codes(report) == []
        assert note_codes(report) == ["backfill_full_frame_as_approve"] * 2
        rows = db_rows(Path(report["created"][0]))
        assert [(r["user_action"], r["final_crop_coords"]) for r in rows] == [
            ("approve", "[0.0, 0.0, 1.0, 1.0]")] * 2
        assert validate(Path(report["created"][0]), "mojo1")[0] == 0

    @pytest.mark.parametrize(("box", "code"), [
        ("500,500,100,900", "backfill_box_inverted"),
        ("0.2,0.9,0.8,0.1", "backfill_box_inverted"),
        ("0,0,4000,3000", "backfill_box_out_of_range"),
        ("-5,0,100,100", "backfill_box_out_of_range"),
        ("100,100,100,900", "backfill_box_empty"),
        ("0,abc,100,100", "backfill_box_unparseable"),
        ("0,,100,100", "backfill_box_unparseable"),
    ])
    def test_bad_boxes(self, tmp_path: Path, box: str, code: str) -> None:
        """Each bad box gets its code; the clean line beside it is converted."""
        csv_path = write_csv(tmp_path, [crop_line(box=box), crop_line(
            name="mojo1/20250705_231000_stage3_enhanced.png")])
        report = backfill(tmp_path, [csv_path])
        assert codes(report) == [code]
        assert report["totals"]["converted"] == 1

    @pytest.mark.parametrize(("ts", "code"), [
        ("", "backfill_timestamp_missing"),
        ("yesterday", "backfill_timestamp_unparseable"),
        ("2025-13-45T10:00:00Z", "backfill_timestamp_unparseable"),
    ])
    def test_bad_timestamps(self, tmp_path: Path, ts: str, code: str) -> None:
        """Empty and unparseable timestamps are rejected with their own codes."""
        csv_path = write_csv(tmp_path, [crop_line(ts=ts), crop_line(
            name="mojo1/20250705_231000_stage3_enhanced.png")])
        report = backfill(tmp_path, [csv_path])
        assert codes(report) == [code]
        assert report["totals"]["converted"] == 1

    def test_duplicate_image_keeps_first(self, tmp_path: Path) -> None:
        """The same image logged twice keeps the first line and rejects the second."""
        csv_path = write_csv(tmp_path, [crop_line(box="0,0,1536,1536"), crop_line(
            name="PROJECT_ROOT/mojo1/20250705_230713_stage3_enhanced.png", box="0,0,1000,1000")])
        report = backfill(tmp_path, [csv_path], execute=True)
        assert codes(report) == ["backfill_duplicate_image"]
        assert report["rejected_lines"][0]["line"] == 3
        rows = db_rows(Path(report["created"][0]))
        assert [json.loads(r["final_crop_coords"]) for r in rows] == [[0.0, 0.0, 0.5, 0.5]]

    def test_spaces_and_unicode_in_paths(self, tmp_path: Path) -> None:
        """Folders and names with spaces and unicode reduce to bare names, kept as they are."""
        names = ["/Users/eric/training data/mojo1/sub dir/20250705_230713_stage3 é 写.png",
                 "PROJECT_ROOT/training data/mojo1_final/_young brunette curly/20250705_230800 "
                 "x_stage3_enhanced.png"]
        csv_path = write_csv(tmp_path, [crop_line(name=n) for n in names])
        report = backfill(tmp_path, [csv_path], execute=True)
        assert codes(report) == []
        rows = db_rows(Path(report["created"][0]))
        assert sorted(json.loads(r["images"])[0] for r in rows) == sorted(
            n.rsplit("/", 1)[1] for n in names)
        assert {r["project_id"] for r in rows} == {"mojo1"}
        assert validate(Path(report["created"][0]), "mojo1")[0] == 0

    def test_rows_longer_than_header(self, tmp_path: Path) -> None:
        """Extra image blocks beyond the header are read; images end up lowest stage first."""
        line = ("sid,s1,mojo1,3,0,mojo1/20250705_230900_stage3_enhanced.png,0,0,1024,1024,"
                "2025-10-08T18:47:32Z,mojo1/20250705_230900_stage3_enhanced.png,stage3,2048,2048,"
                f"mojo1/{S1},stage1,1024,1024,mojo1/20250705_230700_stage2_upscaled.png,stage2,"
                "2048,2048")
        report = backfill(tmp_path, [write_csv(tmp_path, [line])], execute=True)
        row = db_rows(Path(report["created"][0]))[0]
        assert json.loads(row["images"]) == [S1, "20250705_230700_stage2_upscaled.png",
                                             "20250705_230900_stage3_enhanced.png"]
        assert row["user_selected_index"] == 2
        assert json.loads(row["final_crop_coords"]) == [0.0, 0.0, 0.5, 0.5]

    def test_anomaly_list_is_not_evaluated(self, tmp_path: Path) -> None:
        """A rejected_paths value that is code, not a list literal, is backfill_list_unparseable."""
        header = ("session_id,set_id,project,chosen_stage,max_rejected_stage,chosen_path,"
                  "rejected_paths,timestamp")
        evil = ("s,g,mojo1,1,2,mojo1/a_stage1_generated.png,\"__import__('os').getcwd()\","
                "2025-10-05T03:25:40Z")
        good = ("s,g,mojo1,1,2,mojo1/b_stage1_generated.png,\"['mojo1/b_stage2_upscaled.png']\","
                "2025-10-05T03:25:41Z")
        make_image(tmp_path / "img", "b_stage1_generated.png", (10, 10))
        report = backfill(tmp_path, [write_csv(tmp_path, [evil, good], header)],
                          image_roots=(tmp_path / "img",))
        assert codes(report) == ["backfill_list_unparseable"]
        assert report["totals"]["converted"] == 1

    def test_crop_log_without_coordinates(self, tmp_path: Path) -> None:
        """A historical crop log without a box becomes a crop with no final box, noted."""
        header = "session_id,directory,chosen_path,width,height,timestamp"
        lines = ["s,mojo1,mojo1/20250705_230713_stage3_enhanced.png,1024,1024,20250705_230713",
                 "s,mojo1,mojo1/20250705_230800_stage3_enhanced.png,0,0,20250705_230800"]
        report = backfill(tmp_path, [write_csv(tmp_path, lines, header)], execute=True)
        assert codes(report) == ["backfill_image_size_missing"]
        assert note_codes(report) == ["backfill_crop_without_coords"]
        db = Path(report["created"][0])
        row = db_rows(db)[0]
        assert (row["user_action"], row["final_crop_coords"]) == ("crop", None)
        errors, found = validate(db, "mojo1")
        assert errors == 0 and set(found) == {"crop_incomplete"}

    def test_unknown_header(self, tmp_path: Path) -> None:
        """A CSV in no legacy format is reported once and skipped."""
        report = backfill(tmp_path, [write_csv(tmp_path, ["1,2"], "a,b")])
        assert codes(report) == ["backfill_format_unknown"]
        assert report["inputs"][0]["format"] is None

    def test_project_unknown_from_workflow_folder(self, tmp_path: Path) -> None:
        """crop/... names no project: backfill_project_unknown unless --project is given."""
        csv_path = write_csv(tmp_path, [crop_line(name="crop/hannah/20250705_230713_stage3_"
                                                  "enhanced.png"), crop_line()])
        assert codes(backfill(tmp_path, [csv_path])) == ["backfill_project_unknown"]
        report = backfill(tmp_path, [csv_path], project="mojo9", project_from="fixed")
        assert report["counts_by_project"] == {"mojo9": 1}
        assert codes(report) == ["backfill_duplicate_image"]

    def test_project_from_windows(self, tmp_path: Path) -> None:
        """Date windows pick the project by the log timestamp; outside every window is rejected."""
        csv_path = write_csv(tmp_path, [
            crop_line(ts="2025-10-08T10:00:00Z"),
            crop_line(name="crop/20250705_231000_stage3_enhanced.png", ts="2025-10-09T23:59:59Z"),
            crop_line(name="crop/20250705_231100_stage3_enhanced.png", ts="2025-10-10T00:00:00Z")])
        windows = (parse_window("alpha=2025-10-01..2025-10-08"),
                   parse_window("beta=2025-10-09..2025-10-09"))
        report = backfill(tmp_path, [csv_path], project_from="window", windows=windows)
        assert report["counts_by_project"] == {"alpha": 1, "beta": 1}
        assert codes(report) == ["backfill_project_unknown"]


class TestPathRules:
    @pytest.mark.parametrize(("path", "project"), [
        ("PROJECT_ROOT/mojo1/20250708_064118_stage1_generated.png", "mojo1"),
        ("mojo1/20250708_060530_stage2_upscaled.png", "mojo1"),
        ("PROJECT_ROOT/mojo2/faces/x.png", "mojo2"),
        ("PROJECT_ROOT/training data/mojo1_final/_young brunette curly/x.png", "mojo1"),
        ("PROJECT_ROOT/training data/tattersail-0918/tara/x.png", "tattersail-0918"),
        ("/Users/eric/training data/Aiko_raw/x.png", "Aiko_raw"),
        ("crop/x.png", None),
        ("crop/hannah/x.png", None),
        ("/Users/eric/mojo1/x.png", None),
        ("x.png", None),
        ("_young/x.png", None),
    ])
    def test_project_from_path(self, path: str, project: str | None) -> None:
        """The folder rule of Documents/BACKFILL.md, one case per shape seen in the logs."""
        assert project_from_path(path) == project

    def test_bare_name(self) -> None:
        """Folders, PROJECT_ROOT and Windows separators go; spaces and unicode stay."""
        assert bare_name("PROJECT_ROOT/a b/ü x.png") == "ü x.png"
        assert bare_name("C:\\Users\\e\\x y.png") == "x y.png"

    def test_bad_window(self) -> None:
        """A window without PROJECT= or with END before START is a ValueError."""
        with pytest.raises(ValueError):
            parse_window("2025-10-01..2025-10-02")
        with pytest.raises(ValueError):
            parse_window("p=2025-10-03..2025-10-02")


# -- safety ---------------------------------------------------------------------------------------


class TestSafety:
    def test_two_runs_give_identical_rows(self, tmp_path: Path) -> None:
        """Same input, same group_ids and rows, and an identical SQL dump."""
        lines = [crop_line(), crop_line(name="mojo1/20250705_230713_stage2_upscaled.png"),
                 crop_line(name="mojo1/x y.png", ts="2025-10-08T18:50:00Z")]
        csv_path = write_csv(tmp_path, lines)
        a = backfill(tmp_path / "a", [csv_path], execute=True)
        b = backfill(tmp_path / "b", [csv_path], execute=True)
        da, db = Path(a["created"][0]), Path(b["created"][0])
        assert dump(da) == dump(db)
        assert da.read_bytes() == db.read_bytes()
        assert [r["group_id"] for r in db_rows(da)] == [
            "mojo1_legacy_20250705_230713", "mojo1_legacy_20250705_230713_2",
            "mojo1_legacy_20251008_185000"]

    def test_refuses_to_overwrite(self, tmp_path: Path) -> None:
        """An existing target makes --execute refuse; the file and folder are unchanged."""
        csv_path = write_csv(tmp_path, [crop_line()])
        target = default_out_dir(settings_for(tmp_path)) / "mojo1.db"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"precious")
        with pytest.raises(TargetExistsError) as exc:
            backfill(tmp_path, [csv_path], execute=True)
        assert str(target) in str(exc.value)
        assert target.read_bytes() == b"precious"
        assert sorted(p.name for p in target.parent.iterdir()) == ["mojo1.db"]
        out = tmp_path / "data" / "given.db"
        out.write_bytes(b"x")
        with pytest.raises(TargetExistsError):
            backfill(tmp_path, [csv_path], execute=True, out=out)
        assert out.read_bytes() == b"x"

    def test_out_with_two_projects_leaves_nothing(self, tmp_path: Path) -> None:
        """--out with lines of two projects stops, and no partial DB or temp file remains."""
        csv_path = write_csv(tmp_path, [crop_line(), crop_line(name="mojo2/y_stage3_enhanced.png")])
        out_dir = tmp_path / "data" / "out"
        out_dir.mkdir(parents=True)
        with pytest.raises(BackfillError):
            backfill(tmp_path, [csv_path], execute=True, out=out_dir / "one.db")
        assert list(out_dir.iterdir()) == []

    def test_dry_run_writes_report_only(self, tmp_path: Path) -> None:
        """Without --execute no DB appears; the report names what --execute would create."""
        csv_path = write_csv(tmp_path, [crop_line(), crop_line(box="1,1,0,0")])
        report = backfill(tmp_path, [csv_path])
        folder = default_out_dir(settings_for(tmp_path))
        assert not folder.exists()
        assert report["would_create"] == [str(folder / "mojo1.db")]
        assert report["mode"] == "dry-run" and report["created"] == []
        assert report["first_rows"][0]["group_id"] == repr("mojo1_legacy_20250705_230713")
        assert report["first_rows"][0]["image_width"] == "3072"
        assert set(report["rejected_lines"][0]) >= {"file", "line", "code", "value_repr",
                                                    "message"}
        assert Path(report["_json_path"]).name == "ai_training_inspection_20260102T030405Z.json"


class TestCli:
    def _run(self, tmp_path: Path, *argv: str) -> int:
        common = argparse.ArgumentParser(add_help=False)
        parser = argparse.ArgumentParser(prog="trainingd")
        add_backfill_parser(parser.add_subparsers(dest="command"), common)
        return cmd_backfill(parser.parse_args(["backfill", *argv]), settings_for(tmp_path))

    def test_dry_run_then_execute_then_refuse(self, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """The command prints report paths, creates the DB once, then exits 73 on a re-run."""
        csv_path = str(write_csv(tmp_path, [crop_line()]))
        assert self._run(tmp_path, csv_path) == 0
        out = capsys.readouterr().out
        assert "would create" in out and "ai_training_inspection_" in out
        assert self._run(tmp_path, csv_path, "--execute") == 0
        assert "created " in capsys.readouterr().out
        assert self._run(tmp_path, csv_path, "--execute") == EXIT_CANTCREAT
        assert "refusing to overwrite" in capsys.readouterr().err

    def test_overlapping_windows_are_refused(self, tmp_path: Path) -> None:
        """Two windows that overlap make the command exit 2 before reading anything."""
        csv_path = str(write_csv(tmp_path, [crop_line()]))
        assert self._run(tmp_path, csv_path, "--window", "a=2025-10-01..2025-10-05",
                         "--window", "b=2025-10-05..2025-10-06") == 2

    def test_every_backfill_code_is_registered(self) -> None:
        """Every code the converter can emit is in daemon/codes.py, room backfill."""
        source = (Path(__file__).resolve().parents[1] / "daemon" / "backfill").glob("*.py")
        used = set()
        for path in source:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and node.value.startswith("backfill_"):
                    used.add(node.value)
        assert used
        assert used <= {c for c, v in CODES.items() if v.room == "backfill"}
