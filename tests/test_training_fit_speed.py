"""Issue 12, remaining training items: training stops once the validation side has decided (the
20k-group bench ran every epoch of both designs on a flat curve), and the crop net's raw output
(what the reviewer reads) is moved onto the guarded, aspect-keeping box by a refit of its last
layer, keeping the reviewer's layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from daemon.settings import Settings
from daemon.training import core
from daemon.training.dataset import RankerData
from tests.test_training_truth import planted_crops, ranker_data, tuned


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread on the shared box; the previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def never(**_: Any) -> bool:
    return False


def flat_groups(groups: int, dim: int, seed: int) -> RankerData:
    """Random vectors, the top stage picked almost always: nothing to learn past the rule."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        count = int(rng.choice([2, 3, 4]))
        vecs = rng.standard_normal((count, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out.append({"stages": list(range(count)), "vectors": vecs,
                    "pick": count - 1 if rng.random() < 0.97 else 0})
    return ranker_data(out)



class TestEarlyStopping:
    def test_flat_validation_curve_stops_early(self, settings: Settings) -> None:
        """Nothing to learn: both designs stop well before the configured epochs, record how
        many ran, and keep the epoch that was best on validation."""
        from daemon.training.fit import PATIENCE

        s = tuned(settings, epochs=40, batch_size=128)
        res = core._ranker(s, flat_groups(600, 16, seed=0), never, None, "flat-16")
        for design, cand in res["candidates"].items():
            assert PATIENCE < cand["epochs_run"] < 40, (design, cand)
            assert cand["best_epoch"] <= cand["epochs_run"]
        hist = res["history"].to_dict()  # the metadata's "training" figures
        assert len(hist["validation_top1"]) == hist["epochs_run"]
        assert hist["validation_top1"][hist["best_epoch"] - 1] == max(hist["validation_top1"])


class TestRawCropBox:
    def test_raw_boxes_keep_the_aspect(self, settings: Settings) -> None:
        """Planted crops, three seeds: on average at least 95% of the raw boxes keep the aspect
        within the 1% tolerance (about 90% before the head refit), raw and projected IoU agree,
        and every seed is still promoted."""
        kept, gaps = [], []
        for seed in (1, 2, 3):
            res = core._crop(tuned(settings), planted_crops(700, 32, seed=seed), never, None,
                             "planted-synthetic-32")
            rep = res["report"]
            assert res["decision"].promoted, res["decision"].reason
            kept.append(rep["raw_output"]["raw_aspect_kept"])
            gaps.append(abs(rep["model"]["mean_iou"] - rep["model_raw"]["mean_iou"]))
        assert float(np.mean(kept)) >= 0.95, kept
        assert max(gaps) < 0.01

    def test_refit_keeps_the_reviewer_layout(self, settings: Settings) -> None:
        """After the refit the state dict loads strictly into the reviewer's 514-input crop net
        and gives the same raw boxes."""
        import torch

        from daemon.training.fit import crop_features, fit_crop, refit_head
        from daemon.training.models import CropNet

        data = planted_crops(300, 512, seed=5)
        model, _ = fit_crop(data, tuned(settings, crop_epochs=4).training, use_stage=False)
        x = torch.from_numpy(crop_features(data, False))
        refit_head(model, x)
        reviewer = CropNet(514, 0.2)
        reviewer.load_state_dict(model.state_dict(), strict=True)
        reviewer.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(reviewer(x), model(x))


class TestRawOutputInSummary:
    def test_summary_row_names_the_raw_share(self) -> None:
        """A crop version's metadata with raw-output figures: the summary's crop row says how
        often the raw box differs from the projected one, and over how many test crops."""
        from daemon.summary.gather import _crop_item
        from daemon.summary.markdown import _raw

        meta = {"metrics": {"model": {"mean_iou": 0.5, "n": 143},
                            "raw_output": {"n": 143, "raw_valid": 1.0, "raw_aspect_kept": 0.97,
                                           "raw_differs_from_projected": 0.03,
                                           "aspect_tolerance": 0.01}}}
        item = _crop_item(meta)
        assert item["raw_output"]["raw_differs_from_projected"] == 0.03
        assert "3.0% of 143 test crops" in _raw(item)
        assert _raw(_crop_item({"metrics": {}})) == ""
