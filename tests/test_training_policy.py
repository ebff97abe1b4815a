"""The retrain policy: a pure rule over durable counters kept in the state DB."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.settings import ProjectSettings, Settings, TrainingSettings
from daemon.store import StateStore
from daemon.training.policy import count_new_labels, decide, retrain_decision
from daemon.training.runner import train_model
from daemon.validation import Validator
from tests.conftest import NOW
from tests.test_training_helpers import HashSource

CFG = TrainingSettings(min_new_labels=100, min_interval_hours=6, max_staleness_hours=48)


def approve_rows(db: Any, count: int, **changes: Any) -> None:
    for _ in range(count):
        row = db.row(user_action="approve", final_crop_coords=None, crop_timestamp=None,
                      crop_match=None, **changes)
        if "group_id" in changes:
            row["group_id"] = f"{changes['group_id']}_{db.n:04d}"
        db.conn.execute(
            f"INSERT INTO ai_decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()))


class TestRule:
    def test_table(self) -> None:
        """Threshold, minimum interval and staleness decide as documented."""
        h = timedelta(hours=1)
        assert decide(0, None, None, NOW, CFG).due is False
        assert decide(100, None, None, NOW, CFG).due is True
        assert decide(99, None, None, NOW, CFG).due is False
        assert decide(500, NOW - 5 * h, NOW - 5 * h, NOW, CFG).due is False
        assert decide(500, NOW - 7 * h, NOW - 7 * h, NOW, CFG).due is True
        assert decide(1, NOW - 49 * h, NOW - 49 * h, NOW, CFG).due is True
        assert decide(1, NOW - 47 * h, NOW - 47 * h, NOW, CFG).due is False

    @given(st.integers(0, 10_000), st.floats(0, 1000), st.floats(0, 1000))
    @hsettings(max_examples=200, deadline=None)
    def test_never_without_labels_nor_inside_the_interval(
            self, labels: int, attempt_hours: float, trained_hours: float) -> None:
        """No new label or a too-recent attempt always means not due."""
        d = decide(labels, NOW - timedelta(hours=attempt_hours),
                   NOW - timedelta(hours=trained_hours), NOW, CFG)
        if labels == 0 or attempt_hours < CFG.min_interval_hours:
            assert d.due is False
        assert d.new_labels == labels


class TestCounters:
    def test_fires_once_on_a_jump(self, settings: Settings, make_db: Any,
                                  validator: Validator, store: StateStore) -> None:
        """300 labels at once trigger one training; without new labels it never fires again."""
        s = settings.model_copy(update={"training": settings.training.model_copy(
            update={"min_new_labels": 200, "epochs": 2, "crop_epochs": 2})})
        s._base_dir = settings.base_dir
        db = make_db("mojo3")
        approve_rows(db, 300)
        validator.validate_all()
        first = retrain_decision(store, s, "ranker", NOW)
        assert first.due is True and first.new_labels == 300
        out = train_model(s, "ranker", vectors=HashSource(), now=lambda: NOW)
        assert out.status in ("promoted", "not_promoted")
        for hours in (1, 7, 100, 1000):
            d = retrain_decision(store, s, "ranker", NOW + timedelta(hours=hours))
            assert d.due is False and d.new_labels == 0
        approve_rows(db, 10)
        validator.validate_all()
        assert retrain_decision(store, s, "ranker", NOW + timedelta(hours=7)).due is False
        late = retrain_decision(store, s, "ranker", NOW + timedelta(days=8))
        assert late.due is True and late.new_labels == 10
        assert count_new_labels(store, s, "crop") == 0  # approves are no crop labels

    def test_backfilled_rows_count_only_when_allowed(
            self, settings: Settings, make_db: Any, validator: Validator,
            store: StateStore) -> None:
        """Backfilled rows teach but do not trigger, unless the project says they should."""
        db = make_db("mojo3")
        approve_rows(db, 5)
        approve_rows(db, 7, group_id="mojo3_legacy", directory=None)
        validator.validate_all()
        assert count_new_labels(store, settings, "ranker") == 5
        allowed = settings.model_copy(update={"projects": {
            "mojo3": ProjectSettings(backfill_counts_toward_retrain=True)}})
        assert count_new_labels(store, allowed, "ranker") == 12
        assert json.dumps(store.conn.execute(
            "SELECT count(*) FROM training_marks").fetchall()) == "[[0]]"



class TestAbandonedRuns:
    """A run killed before it recorded its end does not stay ``running`` for ever."""

    def test_old_running_rows_are_closed_as_abandoned(self, store: StateStore) -> None:
        """At a new start, a same-kind run older than the timeout becomes ``abandoned``; a
        recent one (it may still be alive) and the other kind's are left alone."""
        from daemon.training.policy import record_run_start

        killed = record_run_start(store, "ranker", NOW - timedelta(hours=3), 10)
        recent = record_run_start(store, "ranker", NOW - timedelta(minutes=5), 10)
        other = record_run_start(store, "crop", NOW - timedelta(hours=3), 10)
        new = record_run_start(store, "ranker", NOW, 10, abandon_after=timedelta(minutes=60))
        status = dict(store.conn.execute("SELECT id, status FROM training_runs").fetchall())
        assert status == {killed: "abandoned", recent: "running", other: "running",
                          new: "running"}
