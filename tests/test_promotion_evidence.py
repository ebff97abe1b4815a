"""Issue 12, item 2: promotion on evidence, paired tests checked against textbook values."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from daemon.training.evidence import (
    binomial_cdf_half,
    compare_iou,
    compare_top1,
    mcnemar_exact_p,
    z_value,
)
from daemon.training.registry import ChampionEvidence, decide_promotion
from daemon.training.split import SplitSettings
from daemon.training.units import key_digest

SPLIT = SplitSettings(seed=0, test_fraction=0.2, validation_fraction=0.15)


def _hits(n: int, right: int) -> np.ndarray:
    return np.r_[np.ones(right), np.zeros(n - right)]


class TestPairedTests:
    def test_mcnemar_textbook_values(self) -> None:
        """Exact McNemar: b=1, c=9 gives 22/1024; b=0, c=6 gives 2/64; b=c gives 1."""
        assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
        assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
        assert mcnemar_exact_p(5, 5) == 1.0
        assert binomial_cdf_half(2, 10) == pytest.approx(56 / 1024)
        assert z_value(0.05) == pytest.approx(1.959964, abs=1e-6)
        assert z_value(0.2) == pytest.approx(1.281552, abs=1e-5)

    def test_paired_wald_interval(self) -> None:
        """The CI of the accuracy difference is Agresti's paired Wald interval."""
        x = np.r_[np.ones(30), np.zeros(70)]
        y = np.r_[np.zeros(20), np.ones(20), np.zeros(60)]  # b = 20, c = 10 on n = 100
        r = compare_top1(x, y, against="baseline", alpha=0.05)
        se = math.sqrt(30 - 10**2 / 100) / 100
        assert r.discordant == (20, 10) and r.difference == pytest.approx(0.1)
        assert r.ci_low == pytest.approx(0.1 - 1.959964 * se, abs=1e-6)
        assert r.p == pytest.approx(mcnemar_exact_p(20, 10))

    def test_bootstrap_of_a_constant_difference(self) -> None:
        """A constant IoU gain has a zero-width CI and the smallest p the resamples allow."""
        rng = np.random.default_rng(0)
        base = rng.uniform(0.3, 0.8, 200)
        r = compare_iou(base + 0.05, base, against="baseline", alpha=0.05, resamples=1000)
        assert r.ci_low == pytest.approx(0.05) and r.ci_high == pytest.approx(0.05)
        assert r.p == pytest.approx(1 / 1000) and r.passed

    def test_bootstrap_noise_is_not_evidence(self) -> None:
        """Pure noise around 0 is not significant; its CI covers 0."""
        rng = np.random.default_rng(1)
        a = rng.uniform(0.3, 0.8, 46)
        r = compare_iou(a + rng.normal(0, 0.05, 46), a, against="b", alpha=0.05)
        assert r.ci_low is not None and r.ci_high is not None
        assert r.ci_low < 0 < r.ci_high and not r.passed


KEYS = [f"p/g{i}" for i in range(117)]


class TestPromotion:

    def test_refuses_a_one_to_three_group_difference_at_117(self) -> None:
        """The issue's seed flips (1-3 groups of 117) never promote."""
        for extra in (1, 2, 3):
            base = _hits(117, 80)
            challenger = base.copy()
            challenger[80:80 + extra] = 1
            d = decide_promotion("ranker", challenger, KEYS, {"highest_stage": base}, None,
                                 alpha=0.05, min_test=100, split=SPLIT)
            assert not d.promoted
            c = d.comparisons[0]
            assert c["n"] == 117 and c["p"] >= 0.25 and c["ci_low"] < 0
            assert "not shown better" in d.reason

    def test_clear_win_promotes_and_records_the_evidence(self) -> None:
        """A 20-group win over the best baseline promotes; n, figures, CI and p recorded."""
        base = _hits(117, 70)
        challenger = _hits(117, 90)
        d = decide_promotion("ranker", challenger, KEYS,
                             {"highest_stage": base, "random": _hits(117, 30)}, None,
                             alpha=0.05, min_test=100, split=SPLIT)
        assert d.promoted and d.best_baseline == "highest_stage"
        c = d.comparisons[0]
        assert {"n", "challenger", "other", "difference", "ci_low", "ci_high", "p"} <= set(c)
        assert c["p"] < 0.05 and c["ci_low"] > 0

    def test_minimum_test_size(self) -> None:
        """Fewer test groups than the minimum never promote, whatever the figures."""
        d = decide_promotion("ranker", _hits(99, 99), KEYS[:99],
                             {"highest_stage": _hits(99, 0)}, None, alpha=0.05, min_test=100,
                             split=SPLIT)
        assert not d.promoted and "99 test groups < minimum 100" in d.reason

    def test_champion_compared_only_on_groups_it_never_saw(self) -> None:
        """Test groups the champion trained on (a changed split) are left out, and flagged."""
        n = 300
        keys = [f"p/g{i}" for i in range(n)]
        challenger = _hits(n, 240)
        champ = np.ones(n)
        champ[150:] = _hits(150, 60)  # perfect on the 150 it trained on, weak elsewhere
        seen = frozenset(key_digest(k) for k in keys[:150])
        evidence = ChampionEvidence(3, champ, seen, replace(SPLIT, seed=7))
        d = decide_promotion("ranker", challenger, keys, {"highest_stage": _hits(n, 100)},
                             evidence, alpha=0.05, min_test=100, split=SPLIT)
        assert d.champion_excluded_seen == 150 and d.champion_compared_on == 150
        assert d.split_changed and any("split changed" in f for f in d.flags)
        assert d.promoted

    def test_crop_iou_is_paired_by_bootstrap(self) -> None:
        """Crop promotion uses the paired bootstrap and refuses a 0.004 IoU edge on 46."""
        rng = np.random.default_rng(2)
        base = rng.uniform(0.3, 0.8, 60)
        model = base + rng.normal(0.004, 0.05, 60)
        d = decide_promotion("crop", model, [f"p/c{i}" for i in range(60)],
                             {"median_box": base, "full_frame": base - 0.3}, None,
                             alpha=0.05, min_test=50, split=SPLIT)
        assert not d.promoted and d.comparisons[0]["test"] == "paired_bootstrap"
