"""The daily summary: JSON, Markdown and plots from the state DB and the registry."""

from __future__ import annotations

import json
from typing import Any

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.summary import write_daily_summary
from daemon.training.runner import train_model
from daemon.validation import Validator
from tests.conftest import NOW
from tests.test_training_helpers import HashSource

PLOTS = {"decisions", "issues", "embedding_coverage", "model_metrics", "crop_iou_by_stage"}


class TestSummary:
    def test_exact_files_and_sections(self, settings: Settings, make_db: Any,
                                      validator: Validator, store: StateStore) -> None:
        """One JSON, one Markdown page and five PNGs, with every section filled."""
        db = make_db("mojo3", checks=False)
        db.insert_many(120)
        db.insert(image_width=0)
        validator.validate_all()
        s = settings.model_copy(update={"training": settings.training.model_copy(
            update={"epochs": 2, "crop_epochs": 2})})
        s._base_dir = settings.base_dir
        train_model(s, "ranker", force=True, vectors=HashSource(), now=lambda: NOW)
        json_path, md_path = write_daily_summary(s, store, NOW)
        day = "2025-11-01"
        assert {p.name for p in s.summaries_dir.iterdir()} == {
            f"daily_summary_{day}.json", f"daily_summary_{day}.md",
            *(f"daily_summary_{day}_{name}.png" for name in PLOTS)}
        data = json.loads(json_path.read_text())
        assert sum(data["new_decisions"]["mojo3"].values()) == 121
        assert data["issues_by_code"]["image_dimension_invalid"] == 1
        assert data["embedding_coverage"]["available"] is True
        assert [m["version"] for m in data["models"]["ranker"]] == [1]
        assert [e["kind"] for e in data["retrain_events"]] == ["ranker"]
        assert data["audit"]["soft_limit"] == 10_000
        md = md_path.read_text()
        for name in PLOTS:
            assert f"daily_summary_{day}_{name}.png" in md
        assert (s.summaries_dir / f"daily_summary_{day}_model_metrics.png").read_bytes()[:4] \
            == b"\x89PNG"

    def test_without_embedding_tables(self, settings: Settings, store: StateStore) -> None:
        """A state DB without the embedding tables still gets a summary that says so."""
        store.conn.execute("DROP TABLE embed_files")
        json_path, _ = write_daily_summary(settings, store, NOW)
        data = json.loads(json_path.read_text())
        assert data["embedding_coverage"]["available"] is False
        assert data["models"] == {"ranker": [], "crop": []}
