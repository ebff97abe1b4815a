"""Training tested where the truth is known: planted signal must be learnt and promoted, its null
twin (the same data with the signal shuffled away) must never be promoted.

Every image gets a fresh synthetic vector (no vector is reused, so none crosses sides): a higher
stage is "sharper" (a direction in vector space) and a planted flaw direction on the top stage
makes the person pick the next one in ~7% of groups.  Crops: the box's centre and size are
directions of the vector; their null twin draws boxes independent of the image.  The in-memory
cases call the same training, evaluation and promotion code a run calls (``core._ranker``,
``core._crop``); the end-to-end cases go through real decision DBs and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from daemon.decisions.schema import INSERT_SQL
from daemon.demo.sample import STAGE_NAMES, row_tuple
from daemon.settings import Settings
from daemon.training import core, registry
from daemon.training.dataset import CropData, RankerData
from daemon.training.runner import train_model
from daemon.validation import Validator
from tests.test_training_helpers import MemorySource

SEEDS = range(20)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny networks on a shared 2-core box: one intra-op thread avoids spinning workers (the
    same figures, several times faster); the previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tuned(settings: Settings, **changes: Any) -> Settings:
    """Hyperparameters sized for a few hundred groups (the defaults are sized for thousands)."""
    base = {"epochs": 30, "crop_epochs": 40, "batch_size": 64} | changes
    new = settings.model_copy(update={"training": settings.training.model_copy(update=base)})
    new._base_dir = settings.base_dir
    return new


def _unit(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    return q[:, 0], q[:, 1]


def planted_groups(groups: int, dim: int, seed: int, *, flaw_share: float = 0.07,
                   sharp: float = 1.5, flaw: float = 1.0, null: bool = False
                   ) -> list[dict[str, Any]]:
    """Groups of 2-4 stages (lowest first), one fresh vector per image, and the person's pick."""
    rng = np.random.default_rng(seed)
    u_sharp, u_flaw = _unit(rng, dim)
    out = []
    for _ in range(groups):
        count = int(rng.choice([2, 3, 4]))
        stages = np.sort(rng.choice(4, size=count, replace=False))
        flawed = rng.random() < flaw_share
        vecs = rng.standard_normal((count, dim)) / np.sqrt(dim)
        vecs += sharp * (stages[:, None] / 3.0) * u_sharp
        if flawed:
            vecs[-1] += flaw * u_flaw
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        pick = count - 2 if flawed else count - 1
        if null:  # the null twin: the pick shuffled within its group
            pick = int(rng.integers(count))
        out.append({"stages": stages.tolist(), "vectors": vecs.astype(np.float32),
                    "pick": pick})
    return out


def ranker_data(groups: list[dict[str, Any]], project: str = "planted") -> RankerData:
    sizes = [len(g["stages"]) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return RankerData(
        vectors=np.concatenate([g["vectors"] for g in groups]).astype(np.float32),
        offsets=offsets, picks=np.asarray([g["pick"] for g in groups], dtype=np.int64),
        stages=np.concatenate([np.asarray(g["stages"], np.float32) for g in groups]),
        ai_picks=np.asarray([s - 1 for s in sizes], dtype=np.int64),
        holdout=np.zeros(len(groups), dtype=bool), projects=[project] * len(groups),
        group_ids=[f"g{i:05d}" for i in range(len(groups))])


def planted_crops(n: int, dim: int, seed: int, *, null: bool = False) -> CropData:
    """Square-in-normalized-units boxes whose size and centre are directions of the vector."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, 3)))
    z = rng.uniform(-1, 1, (n, 3))
    side = 0.5 + 0.3 * z[:, 0]
    cx = 0.5 + (1 - side) / 2 * z[:, 1]
    cy = 0.5 + (1 - side) / 2 * z[:, 2]
    boxes = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)
    seen = rng.uniform(-1, 1, (n, 3)) if null else z  # null: the image says nothing of the box
    vecs = 0.5 * seen @ basis.T + rng.standard_normal((n, dim)) / np.sqrt(dim)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return CropData(vectors=vecs.astype(np.float32),
                    dims=np.tile(np.asarray([[1024.0, 1024.0]], np.float32), (n, 1)),
                    stages=np.full(n, 2.0, np.float32), boxes=boxes.astype(np.float32),
                    holdout=np.zeros(n, dtype=bool), projects=["planted"] * n,
                    group_ids=[f"c{i:05d}" for i in range(n)])


def best_constant_iou(train: np.ndarray, test: np.ndarray) -> float:
    """The test IoU of the best aspect-keeping constant box fitted on train (grid search)."""
    from daemon.training.metrics import aspect_box, box_iou

    best, best_box = -1.0, None
    for s in np.linspace(0.2, 1.0, 33):
        for cx in np.linspace(s / 2, 1 - s / 2, 9):
            for cy in np.linspace(s / 2, 1 - s / 2, 9):
                box = aspect_box(np.asarray([cx]), np.asarray([cy]), np.asarray([s]))
                iou = float(box_iou(np.repeat(box, len(train), 0), train).mean())
                if iou > best:
                    best, best_box = iou, box
    assert best_box is not None
    return float(box_iou(np.repeat(best_box, len(test), 0), test).mean())


def write_planted(db: Any, source: MemorySource, groups: list[dict[str, Any]]) -> None:
    """One approve row per group, in one transaction; vectors keyed by the image names."""
    rows = []
    for g, group in enumerate(groups):
        names = [f"2025{g:05d}_{k:06d}_{STAGE_NAMES[s]}.png"
                 for k, s in enumerate(group["stages"])]
        for name, vec in zip(names, group["vectors"], strict=True):
            source.vectors[(db.project, name)] = vec
        count = len(names)
        rows.append(row_tuple(db.row(
            images=json.dumps(names), user_selected_index=group["pick"],
            ai_selected_index=count - 1, selection_match=int(group["pick"] == count - 1),
            user_action="approve", final_crop_coords=None, crop_timestamp=None,
            crop_match=None)))
    db.execute("BEGIN")
    db.conn.executemany(INSERT_SQL, rows)
    db.execute("COMMIT")


def reviewer_files(settings: Settings) -> dict[str, bytes]:
    folder = settings.models_dir / registry.REVIEWER_DIR
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*"))} if folder.is_dir() else {}


def never(**_: Any) -> bool:
    return False


class TestRankerPlanted:
    def test_keeps_the_rule_and_wins_the_anomalies(self, settings: Settings, make_db: Any,
                                                   validator: Validator) -> None:
        """Top-1 >= 0.90, normal >= 0.95, anomalies >= 0.70, promoted, and the 512-input scorer
        (argmax over the group's vectors, as the reviewer uses it) is exported with its
        embedder named."""
        source = MemorySource("planted-synthetic-512")
        write_planted(make_db("planted"), source, planted_groups(650, 512, seed=1))
        validator.validate_all()
        out = train_model(tuned(settings), "ranker", force=True, vectors=source)
        model = out.metrics["model"]
        assert out.status == "promoted", out.reason
        assert model["groups"] >= 100 and model["anomaly_groups"] >= 8
        assert model["top1"] >= 0.90 and model["top1_normal"] >= 0.95
        assert model["top1_anomaly"] >= 0.70
        assert out.metrics["baseline_highest_stage"]["top1_anomaly"] == 0.0
        assert out.reviewer_export["exported"] is True, out.reviewer_export
        meta = json.loads((settings.models_dir / "reviewer" / "ranker_metadata.json")
                          .read_text())
        assert meta["embedder_id"] == "planted-synthetic-512"
        assert meta["embedder_random"] is False
        assert meta["architecture"]["class"] == "Scorer"
        assert meta["metrics"]["top1"] >= 0.90
        state = registry.load_state(settings.models_dir / "reviewer" / "ranker.pt")
        assert set(state) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias",
                              "net.5.weight", "net.5.bias"}

    def test_scorer_that_fails_alone_leaves_the_reviewer_file(
            self, settings: Settings, make_db: Any, validator: Validator) -> None:
        """Stage invisible in the vectors: the residual ranker is promoted, the embedding-only
        scorer cannot beat the rule, so the reviewer's file stays byte for byte and the
        outcome says why."""
        folder = settings.models_dir / registry.REVIEWER_DIR
        folder.mkdir(parents=True)
        (folder / "ranker.pt").write_bytes(b"the reviewer's own model")
        (folder / "ranker_metadata.json").write_text('{"embedder_id": "openai"}')
        before = reviewer_files(settings)
        source = MemorySource("planted-synthetic-512")
        write_planted(make_db("planted"), source,
                      planted_groups(650, 512, seed=2, sharp=0.0, flaw_share=0.15))
        validator.validate_all()
        out = train_model(tuned(settings), "ranker", force=True, vectors=source)
        assert out.status == "promoted", out.reason
        assert out.reviewer_export["exported"] is False
        assert "does not pass the promotion test itself" in out.reviewer_export["note"]
        assert reviewer_files(settings) == before
        meta = registry.read_metadata(settings.models_dir, "ranker", 1)
        assert meta is not None and meta["architecture"]["design"] == "residual"

    def test_design_is_chosen_on_validation_and_recorded(self, settings: Settings) -> None:
        """Both candidates' validation top-1 and best epoch are recorded; the chosen one has
        the better validation figure."""
        res = core._ranker(tuned(settings), ranker_data(planted_groups(700, 32, seed=3)),
                           never, None, "planted-synthetic-32")
        cands = res["candidates"]
        assert set(cands) == {"residual", "scorer"}
        assert cands[res["design"]]["validation_top1"] == max(
            c["validation_top1"] for c in cands.values())
        assert 1 <= res["history"].best_epoch <= 30
        assert res["history"].selected_by == "validation top-1"


class TestRankerNull:
    @pytest.mark.slow
    def test_null_twin_never_promoted(self, settings: Settings) -> None:
        """The same planted data with the picks shuffled within groups: 0 promotions in 20
        seeds."""
        s = tuned(settings, epochs=15, batch_size=128)
        promoted = []
        for seed in SEEDS:
            res = core._ranker(s, ranker_data(planted_groups(700, 32, seed=seed, null=True)),
                               never, None, "planted-synthetic-32")
            assert res["decision"].n_test >= s.training.min_test_groups
            if res["decision"].promoted:
                promoted.append((seed, res["decision"].reason))
        assert promoted == []


class TestCropPlanted:
    def test_signal_beats_the_best_constant_box(self, settings: Settings) -> None:
        """Boxes that are directions of the vector: the proposer beats the best constant box
        fitted on train (projected and raw output), is promoted, and its raw output keeps the
        aspect within tolerance almost always."""
        s = tuned(settings)
        data = planted_crops(700, 32, seed=1)
        res = core._crop(s, data, never, None, "planted-synthetic-32")
        tr, _, te, _ = core._sides(s, data.projects, data.group_ids)
        constant = best_constant_iou(data.boxes[tr], data.boxes[te])
        report = res["report"]
        assert res["decision"].promoted, res["decision"].reason
        assert report["model"]["mean_iou"] > constant + 0.05
        assert report["model_raw"]["mean_iou"] > constant + 0.05
        raw = report["raw_output"]
        assert raw["n"] == report["model"]["n"]
        assert raw["raw_valid"] >= 0.99
        assert raw["raw_aspect_kept"] >= 0.85
        assert raw["raw_differs_from_projected"] <= 0.15

    @pytest.mark.slow
    def test_boxes_without_signal_never_promoted(self, settings: Settings) -> None:
        """Boxes independent of the image: 0 promotions in 20 seeds."""
        s = tuned(settings, crop_epochs=20, batch_size=128)
        promoted = []
        for seed in SEEDS:
            res = core._crop(s, planted_crops(500, 32, seed=seed, null=True), never, None,
                             "planted-synthetic-32")
            assert res["decision"].n_test >= s.training.min_test_crops
            if res["decision"].promoted:
                promoted.append((seed, res["decision"].reason))
        assert promoted == []


class TestRandomWeights:
    def test_random_embedder_never_reaches_the_reviewer(
            self, settings: Settings, make_db: Any, validator: Validator,
            capsys: pytest.CaptureFixture[str]) -> None:
        """A promoted ranker on a random-init embedder: no reviewer file, embedder_random in
        the metadata, and the CLI lines name the random weights."""
        from daemon.training.cli import embedder_lines

        source = MemorySource("tiny-test-vit:random-init-seed0:pp1")
        write_planted(make_db("planted"), source, planted_groups(700, 512, seed=4))
        validator.validate_all()
        out = train_model(tuned(settings), "ranker", force=True, vectors=source)
        assert out.status == "promoted", out.reason
        assert out.embedder_random is True
        assert reviewer_files(settings) == {}
        meta = registry.read_metadata(settings.models_dir, "ranker", 1)
        assert meta is not None and meta["embedder_random"] is True
        assert meta["reviewer_export"]["exported"] is False
        assert "random-init embedder weights" in meta["reviewer_export"]["note"]
        text = "\n".join(embedder_lines(out.embedder_id, out.embedder_random,
                                        out.reviewer_export))
        assert "RANDOM WEIGHTS" in text and "reviewer: not exported" in text

    def test_registry_refuses_a_random_export(self, settings: Settings) -> None:
        """The last guard: promote() with reviewer files from a random embedder raises and
        writes nothing."""
        from datetime import UTC, datetime

        with pytest.raises(ValueError, match="random"):
            registry.promote(settings.models_dir, "ranker", 1, {}, {}, datetime.now(UTC),
                             reviewer=({}, {"embedder_id": "x:random-init", "embedder_random":
                                            True}))
        assert reviewer_files(settings) == {}
        assert not (settings.models_dir / "champions.json").exists()

