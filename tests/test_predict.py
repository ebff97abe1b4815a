"""Predictions for new groups (issue 13 item 2): real image files in an image root, the real
image index and embedding stage (the tiny open_clip model), champions written through the real
registry, and trainingd's own predictions DB read back with sqlite3."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.embedding.stage import EmbeddingStage
from daemon.images import ImageIndex
from daemon.predict.run import MISSING_CODE, predict_project
from daemon.predict.store import predictions_db
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.training import registry
from tests.conftest import NOW
from tests.embedding_helpers import CountingEmbedder, photo, save, tiny_embedder, with_embedding

STAGES = ("stage1_generated", "stage1.5_face_swapped", "stage2_upscaled", "stage3_enhanced")


def plant_champions(models_dir: Path, embedder_id: str, version: int, *, dim: int = 32,
                    seed: int = 0, crop: bool = True, design: str = "residual") -> None:
    """A promoted ranker (and crop proposer) with random weights, through the registry."""
    import torch

    from daemon.training.models import architecture, build

    torch.manual_seed(seed)
    kinds = [("ranker", dim), ("crop", dim + 2)] if crop else [("ranker", dim)]
    for kind, features in kinds:
        model = build(kind, features, 0.0, design)
        if kind == "ranker" and design == "residual":
            last = model.net[5]
            torch.nn.init.normal_(last.weight, std=2.0)  # a correction that can beat the prior
        meta = {"kind": kind, "version": version, "embedder_id": embedder_id,
                "embedder_random": True, "architecture": architecture(kind, features, 0.0,
                                                                      design),
                "hyperparameters": {"crop_use_stage": False},
                "metrics": {"model": {"top1": 0.9, "mean_iou": 0.7}}}
        registry.save_model(models_dir, kind, version, model.state_dict(), meta)
        registry.promote(models_dir, kind, version, model.state_dict(), meta, NOW)


def make_group(folder: Path, stamp: str, stages: tuple[int, ...], seed: int) -> list[Path]:
    """Image files of one group: ``YYYYMMDD_HHMMSS_<stage>.png``, one stamp second apart."""
    hh, mm, ss = int(stamp[9:11]), int(stamp[11:13]), int(stamp[13:15])
    out = []
    for i, s in enumerate(stages):
        t = f"{stamp[:8]}_{hh:02d}{mm:02d}{ss + i:02d}"
        out.append(save(photo(48 + 8 * i, 64, seed * 10 + i), folder / f"{t}_{STAGES[s]}.png"))
    return out


@pytest.fixture
def world(settings: Settings, store: StateStore, tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "images" / "mojo3"
    s = with_embedding(settings, {"mojo3": [root]})
    groups = [make_group(root / "batch 1", f"20250705_1{i:01d}0000", (0, 2, 3), i)
              for i in range(5)]
    groups.append(make_group(root / "batch 1", "20250705_180000", (0, 1), 9))
    emb = tiny_embedder(s)
    ImageIndex(store).scan("mojo3", [root], NOW)
    stage = EmbeddingStage(s, store, embedder=emb, png_decoder=None)
    return {"settings": s, "root": root, "groups": groups, "emb": emb, "stage": stage}


def rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ai_decisions ORDER BY group_id")]
    finally:
        conn.close()


def run(world: dict[str, Any], store: StateStore, **kw: Any) -> Any:
    return predict_project(world["settings"], store, "mojo3", kw.pop("now", NOW),
                           stage=lambda: world["stage"], **kw)


class TestPredictions:
    """New groups get the champion's pick and crop in the Phase 1A shape."""

    def test_groups_predicted_in_phase_1a_shape(self, world: dict[str, Any],
                                                store: StateStore) -> None:
        """Every group of the root is written with the upstream's six columns and ours."""
        emb: CountingEmbedder = world["emb"]
        plant_champions(world["settings"].models_dir, emb.embedder_id, 1)
        result = run(world, store)
        assert result.status == "predicted" and result.predicted == 6 and result.groups == 6
        db = predictions_db(world["settings"].data_root, "mojo3")
        got = rows(db)
        assert len(got) == 6
        names = {tuple(json.loads(r["images"])) for r in got}
        assert names == {tuple(p.name for p in g) for g in world["groups"]}
        for r in got:
            images = json.loads(r["images"])
            assert r["project_id"] == "mojo3" and r["group_id"].startswith("mojo3_group_2025")
            assert isinstance(r["ai_selected_index"], int)
            assert 0 <= r["ai_selected_index"] < len(images)
            assert 0.0 <= r["ai_confidence"] <= 1.0
            box = json.loads(r["ai_crop_coords"])
            assert len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            assert (r["ranker_version"], r["crop_version"]) == (1, 1)
            assert r["embedder_id"] == emb.embedder_id
            assert r["predicted_at"] == "2025-11-01T12:00:00Z"
            assert len(r["content_key"]) == 64 and r["missing_images"] is None
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            cols = {c[1]: c[2] for c in conn.execute("PRAGMA table_info(ai_decisions)")}
        finally:
            conn.close()
        assert {k: cols[k] for k in ("group_id", "project_id", "images", "ai_selected_index",
                                     "ai_crop_coords", "ai_confidence")} == {
            "group_id": "TEXT", "project_id": "TEXT", "images": "TEXT",
            "ai_selected_index": "INTEGER", "ai_crop_coords": "TEXT", "ai_confidence": "REAL"}

    def test_picks_equal_the_champion_on_the_same_vectors(self, world: dict[str, Any],
                                                          store: StateStore) -> None:
        """The written pick is the residual ranker's argmax over the cached vectors."""
        import torch

        from daemon.embedding.cache import VectorCache
        from daemon.embedding.ledger import Ledger
        from daemon.training.models import build

        emb = world["emb"]
        s = world["settings"]
        plant_champions(s.models_dir, emb.embedder_id, 1, crop=False)
        run(world, store)
        model = build("ranker", 32, 0.0, "residual")
        model.load_state_dict(registry.load_state(registry.model_path(s.models_dir, "ranker", 1)))
        model.eval()
        cache = VectorCache(s.cache_dir, emb.embedder_id)
        for r in rows(predictions_db(s.data_root, "mojo3")):
            images = json.loads(r["images"])
            shas = Ledger(store).shas_for("mojo3", images)
            x = torch.from_numpy(np.stack([cache.load(shas[n]) for n in images]))
            rank = torch.arange(len(images), dtype=torch.float32) - (len(images) - 1)
            with torch.no_grad():
                assert int(model(x, rank).argmax()) == r["ai_selected_index"]
            assert r["ai_crop_coords"] is None and r["crop_version"] is None

    def test_rerun_is_idempotent_and_costs_no_model_call(self, world: dict[str, Any],
                                                         store: StateStore) -> None:
        """A second pass writes nothing new and embeds nothing: vectors are cached."""
        emb: CountingEmbedder = world["emb"]
        plant_champions(world["settings"].models_dir, emb.embedder_id, 1)
        first = run(world, store)
        calls = emb.images
        before = rows(predictions_db(world["settings"].data_root, "mojo3"))
        again = run(world, store, now=NOW + timedelta(hours=1))
        assert first.embedded == 17 and again.embedded == 0 and emb.images == calls
        assert (again.predicted, again.unchanged) == (0, 6)
        assert rows(predictions_db(world["settings"].data_root, "mojo3")) == before

    def test_new_champion_repredicts_unreviewed_groups(self, world: dict[str, Any],
                                                       store: StateStore) -> None:
        """After a promotion every unreviewed group carries the new versions."""
        emb = world["emb"]
        s = world["settings"]
        plant_champions(s.models_dir, emb.embedder_id, 1)
        run(world, store)
        plant_champions(s.models_dir, emb.embedder_id, 2, seed=5)
        result = run(world, store, now=NOW + timedelta(hours=1))
        assert result.predicted == 6 and result.embedded == 0
        got = rows(predictions_db(s.data_root, "mojo3"))
        assert {(r["ranker_version"], r["crop_version"]) for r in got} == {(2, 2)}

    def test_reviewed_folders_are_not_predicted_unless_bulk(self, world: dict[str, Any],
                                                           store: StateStore) -> None:
        """Images the reviewer moved to __selected/ are no new group; --bulk takes them."""
        emb = world["emb"]
        s = world["settings"]
        reviewed = make_group(world["root"] / "__selected", "20250706_100000", (0, 3), 40)
        ImageIndex(store).scan("mojo3", [world["root"]], NOW)
        plant_champions(s.models_dir, emb.embedder_id, 1)
        assert run(world, store).groups == 6
        bulk = run(world, store, bulk=True)
        assert bulk.groups == 7
        names = {tuple(json.loads(r["images"])) for r in rows(predictions_db(s.data_root,
                                                                             "mojo3"))}
        assert tuple(p.name for p in reviewed) in names


class TestBadInput:
    """Missing champions and bad images are outcomes, never exceptions."""

    def test_no_champion_writes_nothing(self, world: dict[str, Any], store: StateStore) -> None:
        """Without a ranker champion the result says so and no DB file appears."""
        result = run(world, store)
        assert result.status == "no_champion" and "no ranker champion" in result.reason
        assert not predictions_db(world["settings"].data_root, "mojo3").exists()
        assert world["emb"].images == 0

    def test_champion_of_another_embedder_writes_nothing(self, world: dict[str, Any],
                                                          store: StateStore) -> None:
        """A champion trained on other vectors cannot predict from these."""
        plant_champions(world["settings"].models_dir, "ViT-B-32/openai", 1)
        result = run(world, store)
        assert result.status == "no_champion"
        assert not predictions_db(world["settings"].data_root, "mojo3").exists()

    def test_broken_image_gives_partial_prediction_and_issue(self, world: dict[str, Any],
                                                             store: StateStore) -> None:
        """A zero-byte image: the group is predicted over the rest, with an issue record."""
        emb = world["emb"]
        s = world["settings"]
        broken = world["groups"][0][1]
        broken.write_bytes(b"")
        ImageIndex(store).scan("mojo3", [world["root"]], NOW)
        plant_champions(s.models_dir, emb.embedder_id, 1)
        result = run(world, store)
        assert (result.predicted, result.partial) == (6, 1)
        row = next(r for r in rows(predictions_db(s.data_root, "mojo3"))
                   if broken.name in r["images"])
        assert json.loads(row["missing_images"]) == [broken.name]
        assert row["ai_selected_index"] != 1
        issues = [i for i in store.issues() if i.code == MISSING_CODE]
        assert len(issues) == 1 and issues[0].group_id == row["group_id"]
        assert issues[0].value_repr == repr([broken.name]) and "image_empty" in issues[0].message

    def test_group_with_no_vector_is_not_written(self, world: dict[str, Any],
                                                 store: StateStore) -> None:
        """A group whose every image is broken gets an issue and no row."""
        s = world["settings"]
        for p in world["groups"][5]:
            p.write_bytes(b"not an image")
        ImageIndex(store).scan("mojo3", [world["root"]], NOW)
        plant_champions(s.models_dir, world["emb"].embedder_id, 1)
        result = run(world, store)
        assert (result.predicted, result.unpredictable) == (5, 1)
        assert [i.code for i in store.issues() if i.code == MISSING_CODE] == [MISSING_CODE]
