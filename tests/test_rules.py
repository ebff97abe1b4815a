"""Every integrity rule and every known fault, through a real DB written like the reviewer's.

Each case writes clean rows plus one faulty row into a WAL-mode DB (without the canonical CHECKs,
as the older scripts created them: that is how such rows reach real DBs), keeps the writer open,
validates, and asserts the exact codes of the faulty row, that no clean row was flagged or lost,
and that the source files are byte-for-byte unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.validation import Validator
from tests.conftest import NOW, codes_for

S1, S2, S3 = ("20250708_060416_stage1_generated.png", "20250708_060530_stage2_upscaled.png",
              "20250708_060611_stage3_enhanced.png")
BASE: dict[str, Any] = {
    "timestamp": "2025-10-23T20:44:56.880505Z", "images": json.dumps([S1, S2]),
    "ai_selected_index": 1, "user_selected_index": 1, "selection_match": 1,
    "user_action": "approve", "final_crop_coords": None, "crop_timestamp": None,
    "ai_crop_coords": None, "ai_confidence": 0.9, "image_width": 1024, "image_height": 1024,
    "crop_match": None, "ai_crop_accepted": None, "batch_number": 1,
}
CROP = {"user_action": "crop", "crop_timestamp": "2025-10-24T10:00:00Z"}

# (id, changes, expected codes of the faulty row, field of the first code)
CASES: list[tuple[str, dict[str, Any], set[str], str | None]] = [
    ("group_id empty", {"group_id": ""}, {"group_id_empty"}, "group_id"),
    ("group_id blank", {"group_id": "   "}, {"group_id_empty"}, "group_id"),
    ("project_id empty", {"project_id": ""}, {"project_id_empty"}, "project_id"),
    ("project_id other project", {"project_id": "mojo9"}, {"project_id_mismatch"}, "project_id"),
    ("timestamp empty", {"timestamp": ""}, {"timestamp_missing"}, "timestamp"),
    ("timestamp words", {"timestamp": "yesterday"}, {"timestamp_unparseable"}, "timestamp"),
    ("timestamp date only", {"timestamp": "2025-10-21"}, {"timestamp_unparseable"}, "timestamp"),
    ("timestamp impossible", {"timestamp": "2025-13-45T25:00:00Z"}, {"timestamp_unparseable"},
     "timestamp"),
    ("timestamp day-first", {"timestamp": "23/10/2025 20:44"}, {"timestamp_unparseable"},
     "timestamp"),
    ("timestamp far future", {"timestamp": "2031-01-01T00:00:00Z"}, {"timestamp_in_future"},
     "timestamp"),
    ("action capitalised", {"user_action": "Approve"}, {"user_action_invalid"}, "user_action"),
    ("action unknown", {"user_action": "skip"}, {"user_action_invalid"}, "user_action"),
    ("width zero (displayed size bug)", {"image_width": 0}, {"image_dimension_invalid"},
     "image_width"),
    ("height negative", {"image_height": -5}, {"image_dimension_invalid"}, "image_height"),
    ("width text", {"image_width": "wide"}, {"image_dimension_invalid"}, "image_width"),
    ("width fractional", {"image_width": 1024.5}, {"image_dimension_invalid"}, "image_width"),
    ("batch zero", {"batch_number": 0}, {"batch_number_invalid"}, "batch_number"),
    ("images not json", {"images": "a.png,b.png"}, {"images_not_json"}, "images"),
    ("images object", {"images": '{"a": 1}'}, {"images_not_list"}, "images"),
    ("images empty", {"images": "[]"}, {"images_count_out_of_range"}, "images"),
    ("images five", {"images": json.dumps([f"{i}.png" for i in range(5)])},
     {"images_count_out_of_range"}, "images"),
    ("image name number", {"images": json.dumps([1, S2])}, {"image_name_invalid"}, "images"),
    ("image in folder", {"images": json.dumps(["mojo3/" + S1, S2])}, {"image_path_not_bare"},
     "images"),
    ("image PROJECT_ROOT", {"images": json.dumps(["PROJECT_ROOT/mojo3/" + S1, S2])},
     {"image_path_not_bare"}, "images"),
    ("image absolute", {"images": json.dumps(["/Users/me/training data/" + S1, S2])},
     {"image_path_not_bare"}, "images"),
    ("image drive", {"images": json.dumps(["C:" + S1, S2])}, {"image_path_not_bare"}, "images"),
    ("image backslash", {"images": json.dumps(["crop\\" + S1, S2])}, {"image_path_not_bare"},
     "images"),
    ("images duplicate", {"images": json.dumps([S2, S2])}, {"images_duplicate"}, "images"),
    ("images stage order", {"images": json.dumps([S2, S1])}, {"images_stage_order"}, "images"),
    ("user index beyond group", {"user_selected_index": 2, "selection_match": 0},
     {"index_out_of_range"}, "user_selected_index"),
    ("user index text", {"user_selected_index": "one", "selection_match": None},
     {"index_invalid"}, "user_selected_index"),
    ("ai index negative", {"ai_selected_index": -1, "selection_match": 0},
     {"index_out_of_range"}, "ai_selected_index"),
    ("confidence above 1", {"ai_confidence": 1.5}, {"ai_confidence_invalid"}, "ai_confidence"),
    ("confidence text", {"ai_confidence": "high"}, {"ai_confidence_invalid"}, "ai_confidence"),
    ("flag 2", {"selection_match": 2}, {"flag_invalid"}, "selection_match"),
    ("selection_match disagrees", {"selection_match": 0}, {"selection_match_inconsistent"},
     "selection_match"),
    ("crop not json", {**CROP, "final_crop_coords": "0.1,0.2,0.3,0.4"}, {"crop_coords_not_json"},
     "final_crop_coords"),
    ("crop empty text", {**CROP, "final_crop_coords": ""}, {"crop_coords_not_json"},
     "final_crop_coords"),
    ("crop three values", {**CROP, "final_crop_coords": "[0.1, 0.2, 0.3]"},
     {"crop_coords_wrong_shape"}, "final_crop_coords"),
    ("crop string value", {**CROP, "final_crop_coords": '["0.1", 0.2, 0.6, 0.7]'},
     {"crop_coords_not_finite"}, "final_crop_coords"),
    ("crop NaN", {**CROP, "final_crop_coords": "[NaN, 0.2, 0.6, 0.7]"},
     {"crop_coords_not_finite"}, "final_crop_coords"),
    ("crop Infinity", {**CROP, "final_crop_coords": "[0.1, 0.2, Infinity, 0.7]"},
     {"crop_coords_not_finite"}, "final_crop_coords"),
    ("crop pixels", {**CROP, "final_crop_coords": "[0.0, 66.0, 1787.0, 1853.0]"},
     {"crop_coords_pixels"}, "final_crop_coords"),
    ("crop negative", {**CROP, "final_crop_coords": "[-0.1, 0.1, 0.5, 0.7]"},
     {"crop_coords_out_of_range"}, "final_crop_coords"),
    ("crop inverted", {**CROP, "final_crop_coords": "[0.8, 0.1, 0.2, 0.7]"},
     {"crop_box_inverted"}, "final_crop_coords"),
    ("crop zero width", {**CROP, "final_crop_coords": "[0.2, 0.2, 0.2, 0.6]"},
     {"crop_box_empty"}, "final_crop_coords"),
    ("crop aspect differs", {**CROP, "final_crop_coords": "[0.1, 0.1, 0.9, 0.5]"},
     {"crop_aspect_mismatch"}, "final_crop_coords"),
    ("crop placeholder full frame", {**CROP, "final_crop_coords": "[0.0, 0.0, 1.0, 1.0]"},
     {"crop_full_frame_placeholder"}, "final_crop_coords"),
    ("crop incomplete", {**CROP, "crop_timestamp": None}, {"crop_incomplete"},
     "final_crop_coords"),
    ("ai crop in pixels", {"ai_crop_coords": "[10, 10, 500, 500]"}, {"crop_coords_pixels"},
     "ai_crop_coords"),
    ("crop timestamp unparseable", {**CROP, "final_crop_coords": "[0.1, 0.1, 0.6, 0.6]",
                                    "crop_timestamp": "later"},
     {"crop_timestamp_unparseable"}, "crop_timestamp"),
    ("crop timestamp missing", {**CROP, "final_crop_coords": "[0.1, 0.1, 0.6, 0.6]",
                                "crop_timestamp": None},
     {"crop_timestamp_missing"}, "crop_timestamp"),
]


class TestEveryRule:
    """One faulty row among clean ones; the writer keeps its connection open throughout."""

    @pytest.mark.parametrize(("changes", "expected", "field"),
                             [pytest.param(c, e, f, id=i) for i, c, e, f in CASES])
    def test_fault_reported_with_exact_code(
        self, make_db: Any, validator: Validator, store: Any, changes: dict[str, Any],
        expected: set[str], field: str | None,
    ) -> None:
        """The faulty row gets exactly the expected codes; clean rows none; source untouched."""
        db = make_db(checks=False)
        db.insert_many(5)
        bad = db.insert(**{**BASE, **changes})
        db.insert_many(3)
        before = db.digest()

        (result,) = validator.validate_all()

        issues = [i for i in store.issues() if i.rowid is not None]
        flagged = {i.rowid for i in issues}
        assert len(flagged) == 1, f"clean rows were flagged: {issues}"
        assert {i.code for i in issues} == expected
        first = next(i for i in issues if i.code == sorted(expected)[0])
        assert first.field == field
        if field in changes:
            value = changes[field]
            allowed = {repr(value)}
            if first.code in ("image_name_invalid", "image_path_not_bare"):
                allowed = {repr(v) for v in json.loads(value)}  # the offending entry itself
            assert first.value_repr in allowed
        assert first.project == "mojo3" and first.db_file == str(db.path)
        assert first.message
        assert first.group_id == (bad["group_id"] if isinstance(bad["group_id"], str) else None)
        assert result.rows_total == 9 and result.rows_checked == 9
        assert store.row_figures("mojo3")["validated"] == 9
        assert db.digest() == before

    @pytest.mark.parametrize("stamp", [
        "2025-10-23T20:44:56.880505Z", "2025-10-21T00:00:00Z", "2025-07-28T04:06:06+00:00",
        "20250728_040606", "2025-10-08 14:46:56", "2025-10-08T14:46:56",
        "2025-10-08T14:46:56.1-05:00",
    ])
    def test_every_contract_timestamp_format_parses(
        self, make_db: Any, validator: Validator, store: Any, stamp: str
    ) -> None:
        """Each timestamp shape seen in real data is accepted, in both timestamp columns."""
        db = make_db(checks=False)
        row = db.insert(**{**BASE, **CROP, "final_crop_coords": "[0.1, 0.1, 0.6, 0.6]",
                           "timestamp": stamp, "crop_timestamp": stamp})
        validator.validate_all()
        assert codes_for(store, row["group_id"]) == set()

    def test_project_id_case_difference_is_accepted(
        self, make_db: Any, validator: Validator, store: Any
    ) -> None:
        """The contract says case may differ between project_id and the DB name."""
        db = make_db(checks=False)
        row = db.insert(**{**BASE, "project_id": "MOJO3"})
        validator.validate_all()
        assert codes_for(store, row["group_id"]) == set()

    def test_approve_with_refined_crop_is_accepted(
        self, make_db: Any, validator: Validator, store: Any
    ) -> None:
        """An approve row may carry a non-full-frame final box (AI crop accepted, refined)."""
        db = make_db(checks=False)
        row = db.insert(**{**BASE, "final_crop_coords": "[0.05, 0.05, 0.85, 0.85]",
                           "crop_timestamp": "2025-10-24T10:00:00Z"})
        validator.validate_all()
        assert codes_for(store, row["group_id"]) == set()

    def test_duplicate_group_id_within_db_without_primary_key(
        self, make_db: Any, validator: Validator, store: Any
    ) -> None:
        """A DB without the PK can hold a group twice: the later copy is flagged, both kept."""
        db = make_db(checks=False, primary_key=False)
        first = db.insert(**BASE)
        db.insert(**{**BASE, "group_id": first["group_id"]})
        (result,) = validator.validate_all()
        dup = [i for i in store.issues() if i.code == "group_id_duplicate"]
        assert len(dup) == 1 and dup[0].rowid == 2
        assert "schema_group_id_not_unique" in store.issue_codes("mojo3")
        assert result.rows_total == 2 and store.row_figures("mojo3")["validated"] == 2

    def test_duplicate_group_id_across_projects(
        self, make_db: Any, validator: Validator, store: Any
    ) -> None:
        """The same group in two projects' DBs is reported on both rows, and cleared when one
        of them goes away."""
        a, b = make_db("mojo3"), make_db("mojo4")
        row = a.insert(**BASE)
        b.insert(**{**BASE, "group_id": row["group_id"], "project_id": "mojo4"})
        b.insert_many(2)
        validator.validate_all()
        dups = [i for i in store.issues() if i.code == "group_id_duplicate_across_projects"]
        assert sorted(i.project for i in dups) == ["mojo3", "mojo4"]
        assert all(i.value_repr == repr(row["group_id"]) for i in dups)
        b.execute("DELETE FROM ai_decisions WHERE group_id = ?", (row["group_id"],))
        validator.validate_all()
        assert not [i for i in store.issues() if i.code == "group_id_duplicate_across_projects"]


def test_now_is_fixed_for_future_check() -> None:
    """Guard: the future-timestamp case above depends on the fixed test clock."""
    assert NOW.year == 2025
