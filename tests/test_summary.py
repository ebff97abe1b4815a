"""The daily summary: JSON, Markdown and plots from the state DB and the registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.codes import CODES
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.summary import PLOTS, build_summary, missed_days, write_daily_summary
from daemon.training.runner import train_model
from daemon.validation import Validator
from tests.conftest import NOW, ReviewerDB
from tests.daemon_harness import Daemon, wait_until
from tests.summary_helpers import images_for, picked_name, year_of_rows
from tests.test_training_helpers import HashSource


class TestSummary:
    def test_exact_files_and_sections(self, settings: Settings, make_db: Any,
                                      validator: Validator, store: StateStore) -> None:
        """One JSON, one Markdown page and seven PNGs, with every section filled."""
        db = make_db("mojo3", checks=False)
        db.insert_many(120)
        db.insert(image_width=0, timestamp="2025-11-01T09:00:00Z")
        db.insert_many(4, timestamp="2025-10-31T13:00:00Z")
        validator.validate_all()
        s = settings.model_copy(update={"training": settings.training.model_copy(
            update={"epochs": 2, "crop_epochs": 2})})
        s._base_dir = settings.base_dir
        train_model(s, "ranker", force=True, vectors=HashSource(), now=lambda: NOW)
        json_path, md_path = write_daily_summary(s, store, NOW)
        day = "2025-11-01"
        # the training's data gate writes its inspection report first (issue 12, item 7)
        assert {p.name for p in s.summaries_dir.iterdir()} == {
            f"daily_summary_{day}.json", f"daily_summary_{day}.md",
            *(f"daily_summary_{day}_{name}.png" for name in PLOTS),
            "ai_training_inspection_20251101T120000Z.json",
            "ai_training_inspection_20251101T120000Z.md"}
        data = json.loads(json_path.read_text())
        # by the decisions' own timestamps: the 120 older rows are not new
        assert sum(data["new_decisions"]["mojo3"].values()) == 5
        assert data["issues_by_code"]["image_dimension_invalid"] == 1
        assert data["embedding_coverage"]["available"] is True
        assert [m["version"] for m in data["models"]["ranker"]] == [1]
        assert data["models"]["ranker"][0]["model_top1"]["n"] > 0
        assert [e["kind"] for e in data["retrain_events"]] == ["ranker"]
        assert data["audit"]["soft_limit"] == 10_000
        md = md_path.read_text()
        for name in PLOTS:
            assert f"daily_summary_{day}_{name}.png" in md
        assert (s.summaries_dir / f"daily_summary_{day}_model_metrics.png").read_bytes()[:4] \
            == b"\x89PNG"

    def test_without_embedding_tables(self, settings: Settings, store: StateStore) -> None:
        """A state DB without the embedding tables still gets a summary that says so."""
        store.conn.execute("DROP TABLE embeddings")
        json_path, _ = write_daily_summary(settings, store, NOW)
        data = json.loads(json_path.read_text())
        assert data["embedding_coverage"]["available"] is False
        assert data["models"] == {"ranker": [], "crop": []}


class TestSummaryData:
    def test_first_run_over_a_year_counts_only_rows_timestamped_in_the_window(
            self, settings: Settings, make_db: Any, validator: Validator,
            store: StateStore) -> None:
        """A first run over a year of rows calls only the rows the reviewer made in the last
        24 h new (the decisions' own timestamps), not every row it validated today."""
        db = make_db("mojo3")
        year_of_rows(db, NOW, old=300, recent=12)
        validator.validate_all()
        data = build_summary(settings, store, NOW)
        assert sum(data["new_decisions"]["mojo3"].values()) == 12
        assert data["projects"]["mojo3"]["validated"] == 312

    def test_vanished_images_count_as_lost_not_covered(
            self, settings: Settings, make_db: Any, validator: Validator,
            store: StateStore) -> None:
        """Images deleted before they were embedded are lost: coverage is embedded / all seen."""
        db = make_db("mojo3")
        rows = year_of_rows(db, NOW, old=0, recent=20)
        images_for(settings, store, "mojo3", rows, settings.data_root / "img", NOW,
                   embedded=10, lost=6)
        cov = build_summary(settings, store, NOW)["embedding_coverage"]["projects"]["mojo3"]
        names = {picked_name(r) for r in rows}
        assert cov["lost"] == 6
        assert cov["embedded"] == 10
        assert cov["embedded"] + cov["lost"] + cov["waiting"] + cov["failed"] == len(names)
        assert cov["coverage"] == 10 / len(names)

    def test_trend_is_built_from_earlier_days_json(self, settings: Settings,
                                                    store: StateStore) -> None:
        """The 14-day trend takes each earlier day's figures from its JSON; a damaged file
        leaves a gap and a note instead of failing the summary."""
        folder = settings.summaries_dir
        folder.mkdir(parents=True, exist_ok=True)
        earlier = {"issues": {"totals": {"error": 7, "warning": 3}},
                   "embedding_coverage": {"projects": {"a": {"embedded": 3, "total": 4}}},
                   "models": {"ranker": [{"champion": True, "model_top1": {"value": 0.81}}],
                              "crop": [{"champion": True, "model_mean_iou": {"value": 0.62}}]}}
        (folder / "daily_summary_2025-10-30.json").write_text(json.dumps(earlier))
        (folder / "daily_summary_2025-10-29.json").write_text("[" * 100_000)
        trend = build_summary(settings, store, NOW)["trend"]
        days = {d["day"]: d for d in trend["days"]}
        assert len(trend["days"]) == 14
        assert trend["days"][-1]["day"] == "2025-11-01"
        assert days["2025-10-30"] | {"day": "x"} == {
            "day": "x", "decisions": 0, "errors": 7, "warnings": 3, "coverage": 0.75,
            "ranker_top1": 0.81, "crop_mean_iou": 0.62, "from": "daily_summary_2025-10-30.json"}
        assert days["2025-10-29"]["from"] is None
        assert any("daily_summary_2025-10-29.json" in n for n in trend["notes"])

    def test_top_20_rows_to_fix_with_what_to_do(self, settings: Settings, make_db: Any,
                                                validator: Validator,
                                                store: StateStore) -> None:
        """Twenty rows, errors first, each with its project, group_id, code and the codes
        table's advice."""
        db = make_db("mojo3", checks=False)
        db.insert_many(5)
        warned = [db.insert(ai_confidence=None, batch_number=0) for _ in range(10)]
        broken = [db.insert(image_width=0) for _ in range(15)]
        validator.validate_all()
        fix = build_summary(settings, store, NOW)["rows_to_fix"]
        assert len(fix["rows"]) == 20
        assert fix["rows_with_issues"] == 25
        assert [r["group_id"] for r in fix["rows"][:15]] == [r["group_id"] for r in broken]
        assert {r["group_id"] for r in fix["rows"][15:]} <= {r["group_id"] for r in warned}
        first = fix["rows"][0]
        assert (first["project"], first["code"]) == ("mojo3", "image_dimension_invalid")
        assert first["what_to_do"] == CODES["image_dimension_invalid"].action


class TestMissedDays:
    def test_missed_days_listed_from_the_last_summary(self, settings: Settings) -> None:
        """Days after the last written summary whose hour has passed, oldest first, capped by
        summary.backfill_days; none on a new install."""
        assert missed_days(settings, NOW) == []
        settings.summaries_dir.mkdir(parents=True, exist_ok=True)
        (settings.summaries_dir / "daily_summary_2025-10-28.json").write_text("{}")
        assert [d.isoformat() for d in missed_days(settings, NOW)] == [
            "2025-10-29T06:00:00+00:00", "2025-10-30T06:00:00+00:00",
            "2025-10-31T06:00:00+00:00", "2025-11-01T06:00:00+00:00"]
        capped = settings.model_copy(update={"summary": settings.summary.model_copy(
            update={"backfill_days": 2})})
        assert [d.date().isoformat() for d in missed_days(capped, NOW)] == [
            "2025-10-31", "2025-11-01"]

    @pytest.mark.slow
    def test_missed_days_written_at_startup_by_the_daemon(self, tmp_path: Path) -> None:
        """A daemon started after being down over two summary hours writes those days from
        the source timestamps, marked as written late."""
        today = datetime.now(UTC).date()
        data = tmp_path / "data"
        summaries = data / "daily_summaries"
        summaries.mkdir(parents=True)
        decisions = data / "training" / "ai_training_decisions"
        decisions.mkdir(parents=True)
        (summaries / f"daily_summary_{today - timedelta(days=3)}.json").write_text("{}")
        db = ReviewerDB(decisions / "mojo3.db")
        try:
            # one decision inside the window of the day before yesterday
            db.insert(timestamp=f"{today - timedelta(days=2)}T12:00:00Z")
            config = tmp_path / "config.toml"
            config.write_text('[paths]\ndata_root = "data"\n\n[service]\n'
                              'daily_summary_time = "00:01"\nheartbeat_seconds = 0.5\n'
                              '\n[summary]\nbackfill_days = 2\n')
            daemon = Daemon(config)
            try:
                wanted = [summaries / f"daily_summary_{today - timedelta(days=k)}.json"
                          for k in (1, 0)]
                wait_until(lambda: all(p.exists() for p in wanted), 120,
                           "missed summaries written")
            finally:
                assert daemon.stop() == 0
        finally:
            db.close()
        older = json.loads(wanted[0].read_text())
        assert older["written_late"] is True
        assert older["window_end"] == f"{today - timedelta(days=1)}T00:01:00Z"
        assert sum(older["new_decisions"]["mojo3"].values()) == 1
        # the day before that was capped away by backfill_days = 2
        assert not (summaries / f"daily_summary_{today - timedelta(days=2)}.json").exists()
