"""Property tests for the pure rules and for idempotent validation."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.decisions.checks import CheckContext, check_box, check_row
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.timeparse import parse_timestamp
from daemon.validation import Validator
from tests.conftest import NOW, ReviewerDB
from tests.test_rules import BASE, CASES

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


class TestBoxRules:
    """The normalized-box rule and its specific failure codes."""

    @given(unit, unit, unit, unit)
    def test_ordered_unit_boxes_are_valid(self, a: float, b: float, c: float, d: float) -> None:
        """Any box with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 passes and is returned."""
        x1, x2, y1, y2 = min(a, b), max(a, b), min(c, d), max(c, d)
        findings, box = check_box("final_crop_coords", json.dumps([x1, y1, x2, y2]))
        if x1 < x2 and y1 < y2:
            assert findings == [] and box == (x1, y1, x2, y2)
        else:
            assert [f.code for f in findings] == ["crop_box_empty"] and box is None

    @given(st.lists(st.floats(min_value=-5000, max_value=5000, allow_nan=False), min_size=4,
                    max_size=4))
    def test_any_value_above_one_is_reported_as_pixels(self, values: list[float]) -> None:
        """A value > 1 always yields crop_coords_pixels, whatever else is wrong."""
        findings, box = check_box("final_crop_coords", json.dumps(values))
        if any(v > 1 for v in values):
            assert [f.code for f in findings] == ["crop_coords_pixels"]
        elif any(v < 0 for v in values):
            assert [f.code for f in findings] == ["crop_coords_out_of_range"]
        x1, y1, x2, y2 = values
        if box is not None:
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1

    @given(st.one_of(st.text(), st.none(), st.integers(), st.binary(),
                     st.floats(allow_nan=True)))
    def test_box_check_never_raises(self, raw: Any) -> None:
        """Garbage in a crop column is a finding, never an exception."""
        findings, box = check_box("ai_crop_coords", raw)
        assert box is None or all(math.isfinite(v) for v in box)
        assert raw is None or findings or box is not None

    @given(st.text())
    def test_timestamp_parser_never_raises(self, text: str) -> None:
        """Any text either parses to an aware datetime or is rejected."""
        moment = parse_timestamp(text)
        assert moment is None or moment.tzinfo is not None

    @given(st.tuples(*(st.one_of(st.none(), st.text(max_size=8), st.integers(), st.floats())
                       for _ in range(19))))
    def test_row_check_never_raises(self, row: tuple[Any, ...]) -> None:
        """Any combination of values of any type gives findings, never an exception."""
        from daemon.decisions.schema import COLUMNS

        ctx = CheckContext(project="mojo3", now=NOW, columns=frozenset(COLUMNS))
        for finding in check_row(row, ctx):
            assert finding.code and finding.message


class TestIdempotence:
    """Validate twice: same result; the second run checks 0 rows."""

    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.sampled_from(range(len(CASES))), max_size=12),
           st.integers(min_value=0, max_value=30))
    def test_validate_twice(self, faults: list[int], clean: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            settings_ = Settings().with_data_root(Path(tmp))
            settings_.decisions_dir.mkdir(parents=True)
            db = ReviewerDB(settings_.decisions_dir / "mojo3.db", checks=False)
            db.insert_many(clean)
            for k in faults:
                changes = dict(CASES[k][1])
                changes.pop("group_id", None)  # keep keys unique in the PK table
                db.insert(**{**BASE, **changes})
            store = StateStore(settings_.state_db)
            validator = Validator(store, settings_, clock=lambda: NOW)
            first = validator.validate_all()[0]
            issues_first = store.issues()
            second = validator.validate_all()[0]
            assert second.rows_checked == 0
            assert store.issues() == issues_first
            assert (first.errors, first.warnings) == (second.errors, second.warnings)
            assert first.rows_checked == clean + len(faults)
            store.close()
            db.close()
