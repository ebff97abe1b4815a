"""Training end to end on real decision DBs, a real tiny open_clip model and real images."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.training import registry
from daemon.training.dataset import load_crop_data, load_ranker_data
from daemon.training.metrics import baseline_copy_reason, ranker_report
from daemon.training.runner import train_model
from daemon.training.split import group_fraction, in_holdout
from daemon.validation import Validator
from tests.test_training_helpers import HashSource, MemorySource, TinyClip, plant_groups

REPO = Path(__file__).resolve().parents[1]


def small_test(settings: Settings) -> Settings:
    """The planted projects hold ~60 test groups: below the production minimum of 100."""
    return with_training(settings, min_test_groups=40, min_test_crops=20)


def with_training(settings: Settings, **changes: Any) -> Settings:
    new = settings.model_copy(update={"training": settings.training.model_copy(update=changes)})
    new._base_dir = settings.base_dir
    return new


@pytest.fixture(scope="module")
def clip() -> TinyClip:
    return TinyClip()


@pytest.fixture
def planted(settings: Settings, make_db: Any, validator: Validator, clip: TinyClip
            ) -> MemorySource:
    source = MemorySource()
    plant_groups(make_db("mojo3"), source, clip, 240)
    plant_groups(make_db("mojo4"), source, clip, 60, seed=5)
    validator.validate_all()
    return source


def model_files(settings: Settings) -> set[str]:
    root = settings.models_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class TestHoldout:
    @given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=40),
           st.lists(st.text(min_size=1, max_size=12), max_size=40),
           st.floats(0.05, 0.95), st.integers(0, 3))
    @hsettings(max_examples=60, deadline=None)
    def test_group_never_moves_as_data_grows(self, first: list[str], later: list[str],
                                             fraction: float, seed: int) -> None:
        """A group's side is the same whether or not more groups arrived after it."""
        before = {g: in_holdout("p", g, fraction=fraction, seed=seed) for g in first}
        grown = {g: in_holdout("p", g, fraction=fraction, seed=seed) for g in first + later}
        assert all(grown[g] == side for g, side in before.items())

    def test_share_close_to_fraction(self) -> None:
        """About holdout_fraction of many groups land in the holdout."""
        share = np.mean([group_fraction("mojo3", f"g{i}") < 0.2 for i in range(10_000)])
        assert 0.18 < share < 0.22

    def test_held_out_project_is_whole(self) -> None:
        """Every group of a listed project is holdout, whatever its hash."""
        assert all(in_holdout("mojo9", f"g{i}", fraction=0.01, holdout_projects=["mojo9"])
                   for i in range(200))

    def test_dataset_sides_follow_the_rule(self, settings: Settings, planted: MemorySource,
                                           store: StateStore) -> None:
        """Every loaded group sits on the test side its unit hashes to (issue 12: units)."""
        from daemon.training.units import side_of

        data, info = load_ranker_data(settings, store, planted)
        assert data.groups == 300
        assert info.units is not None
        for key, side in zip(data.keys, data.holdout, strict=True):
            unit = info.units.unit_of[key]
            assert side == (side_of(unit, seed=0, test_fraction=0.2,
                                    validation_fraction=0.15) == "test")
        assert info.split["unit"].startswith("union of groups")
        assert sum(v["holdout"] for v in info.sizes.values()) == int(data.holdout.sum())


class TestDataset:
    def test_every_exclusion_counted(self, settings: Settings, make_db: Any,
                                     validator: Validator, clip: TinyClip,
                                     store: StateStore) -> None:
        """Invalid, pending, placeholder and unembedded rows are left out, each under a reason."""
        source = MemorySource()
        db = make_db("mojo3", checks=False)
        plant_groups(db, source, clip, 10, action="approve")
        db.insert(image_width=0, user_action="approve", final_crop_coords=None,
                  crop_timestamp=None, crop_match=None)  # an error row
        db.insert(user_action="crop", final_crop_coords=None, crop_timestamp=None,
                  crop_match=None)  # pending
        db.insert(user_action="crop", final_crop_coords="[0.0, 0.0, 1.0, 1.0]",
                  crop_timestamp="2025-10-24T10:00:00Z")  # placeholder
        db.insert(user_action="approve", final_crop_coords=None, crop_timestamp=None,
                  crop_match=None)  # images never embedded
        validator.validate_all()
        data, info = load_ranker_data(settings, store, source)
        assert data.groups == 10
        assert dict(info.exclusions) == {"invalid_row": 1, "pending_crop": 1,
                                         "missing_embedding": 2}
        crops, cinfo = load_crop_data(settings, store, source)
        assert crops.size == 0
        assert dict(cinfo.exclusions) == {"pending_crop": 1, "placeholder_crop": 1}

    def test_row_changed_since_validation_is_left_out(
            self, settings: Settings, make_db: Any, validator: Validator, clip: TinyClip,
            store: StateStore) -> None:
        """A row edited after validation waits for the next validation."""
        source = MemorySource()
        db = make_db("mojo3")
        rows = plant_groups(db, source, clip, 5, action="approve")
        validator.validate_all()
        db.update(rows[0]["group_id"], batch_number=99)
        data, info = load_ranker_data(settings, store, source)
        assert data.groups == 4
        assert dict(info.exclusions) == {"changed_since_validation": 1}


class TestRanker:
    def test_planted_signal_beats_the_highest_stage_rule(
            self, settings: Settings, planted: MemorySource) -> None:
        """The ranker learns the visible property and gets anomaly groups right."""
        out = train_model(small_test(settings), "ranker", force=True, vectors=planted)
        model, base = out.metrics["model"], out.metrics["baseline_highest_stage"]
        assert out.status == "promoted", out.reason
        assert model["anomaly_groups"] >= 10
        assert base["top1_anomaly"] == 0.0
        assert model["top1_anomaly"] >= 0.8
        assert model["top1"] > base["top1"]
        assert set(model["per_project"]) == {"mojo3", "mojo4"}

    def test_exact_files_and_reviewer_layout(self, settings: Settings,
                                             planted: MemorySource) -> None:
        """A promoted run on random embedder weights writes the version, its metadata and
        units and the pointer, and no reviewer copy (tests/test_training_truth.py covers the
        export from real weights)."""
        train_model(small_test(settings), "ranker", force=True, vectors=planted)
        assert model_files(settings) == {
            "ranker_v1.pt", "ranker_v1_metadata.json", "ranker_v1_units.json",
            "champions.json"}
        meta = json.loads((settings.models_dir / "ranker_v1_metadata.json").read_text())
        assert meta["embedder_id"] == planted.embedder_id and meta["embedder_random"] is True
        assert meta["dataset"]["split"]["seed"] == 0
        assert meta["dataset"]["sizes"]["mojo4"]["train"] > 0
        assert set(meta["metrics"]) == {"model", "baseline_highest_stage", "recorded_ai_pick",
                                        "agreement_with_baseline", "baseline_top1"}
        assert meta["promoted"] is True and meta["baseline_copy"] is None
        assert {"hyperparameters", "code_version", "training", "created_at"} <= set(meta)

    def test_worse_model_is_kept_but_not_promoted(self, settings: Settings,
                                                  planted: MemorySource) -> None:
        """A weaker challenger is registered with its reason; the pointer stays on v1."""
        train_model(small_test(settings), "ranker", force=True, vectors=planted)
        pointer = (settings.models_dir / "champions.json").read_bytes()
        weak = with_training(small_test(settings), epochs=1, lr=1e-6)
        out = train_model(weak, "ranker", force=True, vectors=planted)
        assert out.status == "not_promoted" and out.version == 2
        assert (settings.models_dir / "champions.json").read_bytes() == pointer
        meta = registry.read_metadata(settings.models_dir, "ranker", 2)
        assert meta is not None and meta["promoted"] is False
        assert meta["promotion_reason"] == out.reason
        assert meta["champion_on_holdout"]["model"]["top1"] is not None
        assert model_files(settings) == {
            "ranker_v1.pt", "ranker_v1_metadata.json", "ranker_v1_units.json", "ranker_v2.pt",
            "ranker_v2_metadata.json", "ranker_v2_units.json", "champions.json"}

    def test_baseline_copy_is_flagged(self) -> None:
        """A model that always picks the last image is called a copy of the baseline."""
        offsets = np.array([0, 2, 5, 7, 9])
        picks = np.array([1, 0, 1, 1])
        pred = np.array([1, 2, 1, 1])
        report = ranker_report(pred, picks, offsets, np.full(4, -1), ["a"] * 4)
        assert baseline_copy_reason(report, 0.99) is not None
        assert report["recorded_ai_pick"]["groups"] == 0
        ok = ranker_report(picks, picks, offsets, np.full(4, -1), ["a"] * 4)
        assert baseline_copy_reason(ok, 0.99) is None


class TestCrop:
    def test_boxes_valid_and_reviewer_format(self, settings: Settings,
                                             planted: MemorySource, store: StateStore) -> None:
        """Crop proposals are valid aspect-keeping boxes; random embedder weights are never
        exported, and the metadata says so."""
        from daemon.training.fit import fit_crop, predict_crop

        out = train_model(settings, "crop", force=True, vectors=planted)
        assert out.status in ("promoted", "not_promoted")
        assert {"model", "model_raw", "raw_output", "baseline_full_frame", "baseline_mean_box",
                "mean_box", "baseline_mean_iou"} == set(out.metrics)
        assert out.metrics["model"]["by_stage"]
        data, _ = load_crop_data(settings, store, planted)
        model, _ = fit_crop(data, with_training(settings, crop_epochs=2).training,
                            use_stage=False)
        boxes = predict_crop(model, data, use_stage=False)
        assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
        assert boxes.min() >= 0 and boxes.max() <= 1
        np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                                   atol=1e-5)
        meta = registry.read_metadata(settings.models_dir, "crop", 1)
        assert meta is not None and meta["reviewer_export"]["possible"] is False
        assert "random-init" in meta["reviewer_export"]["note"]
        assert not (settings.models_dir / "reviewer").exists()

    def test_stage_input_means_no_reviewer_export(self, settings: Settings,
                                                  planted: MemorySource) -> None:
        """With the stage as input the model is kept in trainingd's format only, and says so."""
        out = train_model(with_training(settings, crop_use_stage=True, crop_epochs=5), "crop",
                          force=True, vectors=planted)
        meta = registry.read_metadata(settings.models_dir, "crop", 1)
        assert meta is not None and meta["reviewer_export"]["possible"] is False
        assert "515" in meta["reviewer_export"]["note"]
        assert not (settings.models_dir / "reviewer" / "crop_proposer.pt").exists()
        assert out.version == 1

    @given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
    @hsettings(max_examples=200, deadline=None)
    def test_projection_always_valid(self, raw: list[float]) -> None:
        """Any raw network output becomes a valid box with equal normalized sides."""
        import torch

        from daemon.training.models import project_box

        box = project_box(torch.tensor([raw], dtype=torch.float32))[0].tolist()
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        assert abs((box[2] - box[0]) - (box[3] - box[1])) < 1e-6


class TestIsolation:
    @pytest.fixture
    def child_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PYTHONPATH", str(REPO))

    def test_killed_training_leaves_the_champion(self, settings: Settings,
                                                 planted: MemorySource, store: StateStore,
                                                 child_env: None) -> None:
        """SIGKILL mid-training: no new version, pointer and champion files byte-identical."""
        train_model(small_test(settings), "ranker", force=True, vectors=planted)
        before = {p: (settings.models_dir / p).read_bytes() for p in model_files(settings)}

        def kill(event: dict[str, Any]) -> None:
            os.kill(event["pid"], signal.SIGKILL)

        out = train_model(with_training(settings, epochs=10_000), "ranker", force=True,
                          vectors_factory="tests.test_training_helpers:hash_source",
                          progress=kill)
        assert out.status == "crashed" and "signal 9" in out.reason
        assert {p: (settings.models_dir / p).read_bytes() for p in model_files(settings)} == \
            before
        runs = store.conn.execute("SELECT status FROM training_runs ORDER BY id").fetchall()
        assert runs == [("promoted",), ("crashed",)]

    def test_stop_request_ends_the_child_cleanly(self, settings: Settings,
                                                  planted: MemorySource,
                                                  child_env: None) -> None:
        """A shutdown request stops the child within a batch, without a model."""
        seen: list[dict[str, Any]] = []
        out = train_model(with_training(settings, epochs=10_000), "ranker", force=True,
                          vectors_factory="tests.test_training_helpers:hash_source",
                          progress=seen.append, should_stop=lambda: bool(seen))
        assert out.status == "stopped"
        assert model_files(settings) == set()

    def test_missing_embedding_source_fails_softly(self, settings: Settings,
                                                   planted: MemorySource,
                                                   child_env: None) -> None:
        """No embedding source: the attempt is recorded as failed; nothing is written."""
        out = train_model(settings, "ranker", force=True, vectors_factory="tests.nowhere:none")
        assert out.status == "failed" and "no embedding source" in out.reason
        assert model_files(settings) == set()
        assert HashSource().embedder_id == "hash-512"
