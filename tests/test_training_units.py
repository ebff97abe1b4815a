"""Issue 12, items 1, 3 and 7: leak-proof units, stable sides, hard baselines, the data gate."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.training.gate import data_gate, judge
from daemon.training.metrics import best_constant_box, box_iou, crop_baseline_boxes, median_box
from daemon.training.units import (
    GroupImages,
    build_units,
    content_keys,
    group_key,
    near_duplicate_pairs,
)
from daemon.validation import Validator

SPLIT = {"seed": 0, "test_fraction": 0.2, "validation_fraction": 0.15}


def _fresh(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _group(project: str, gid: str, names: list[str], vecs: np.ndarray,
           shas: dict[str, str] | None = None) -> GroupImages:
    found = dict(zip(names, vecs, strict=True))
    return GroupImages(group_key(project, gid), content_keys(project, names, shas or {}, found),
                       vecs)


class TestUnits:
    def test_shared_hash_across_projects_is_one_unit(self) -> None:
        """A group copied into a second project's DB (same file bytes) joins one unit."""
        rng = np.random.default_rng(0)
        a = _group("mojo3", "g1", ["a.png", "b.png"], _fresh(rng, 2), {"a.png": "s1"})
        b = _group("mojo9", "g1", ["x.png", "y.png"], _fresh(rng, 2), {"x.png": "s1"})
        c = _group("mojo3", "g2", ["c.png", "d.png"], _fresh(rng, 2))
        units = build_units([a, b, c], cosine=0.97, **SPLIT)
        assert units.unit_of["mojo3/g1"] == units.unit_of["mojo9/g1"] == "mojo3/g1"
        assert units.unit_of["mojo3/g2"] == "mojo3/g2"
        assert units.side_of_group("mojo9/g1") == units.side_of_group("mojo3/g1")
        row = units.report_rows()[0]
        assert row["joined_by"] == ["same_content"] and len(row["groups"]) == 2

    def test_re_review_under_new_group_id_is_one_unit(self) -> None:
        """The same files reviewed again under a new group_id join the first review's unit."""
        rng = np.random.default_rng(1)
        vecs = _fresh(rng, 3)
        names = ["p_1.png", "p_2.png", "p_3.png"]
        units = build_units([_group("mojo3", "old", names, vecs),
                             _group("mojo3", "new", names, vecs)], cosine=2.0, **SPLIT)
        assert units.unit_of["mojo3/old"] == units.unit_of["mojo3/new"]

    def test_near_duplicate_embedding_is_one_unit(self) -> None:
        """A re-encoded image (cosine 0.99) in another group joins its unit; 0.9 does not."""
        rng = np.random.default_rng(2)
        base = _fresh(rng, 1)[0]
        noise = _fresh(rng, 2)[0]
        near = base + 0.14 * noise
        near /= np.linalg.norm(near)
        far = base + 0.5 * _fresh(rng, 1)[0]
        far /= np.linalg.norm(far)
        assert float(base @ near) > 0.97 > float(base @ far)
        g1 = _group("a", "g1", ["1.png", "2.png"], np.stack([base, _fresh(rng, 1)[0]]))
        g2 = _group("b", "g2", ["3.png", "4.png"], np.stack([near, _fresh(rng, 1)[0]]))
        g3 = _group("c", "g3", ["5.png", "6.png"], np.stack([far, _fresh(rng, 1)[0]]))
        units = build_units([g1, g2, g3], cosine=0.97, **SPLIT)
        assert units.unit_of["b/g2"] == units.unit_of["a/g1"]
        assert units.unit_of["c/g3"] == "c/g3"
        assert units.report_rows()[0]["joined_by"] == ["near_duplicate"]

    def test_lsh_search_finds_planted_pairs_and_no_false_ones(self) -> None:
        """Above the exact limit the bucketed search still finds planted near duplicates."""
        rng = np.random.default_rng(3)
        x = _fresh(rng, 3000, 128)
        dup = x[:50] + 0.1 * _fresh(rng, 50, 128)
        x = np.concatenate([x, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
        exact = near_duplicate_pairs(x, 0.97, exact_limit=10**9)
        lsh = near_duplicate_pairs(x, 0.97, exact_limit=100)
        assert {tuple(p) for p in exact} == {(i, 3000 + i) for i in range(50)}
        assert {tuple(p) for p in lsh} <= {tuple(p) for p in exact}
        assert len(lsh) >= 48

    def test_lsh_search_over_a_crowded_bucket_matches_exact(self) -> None:
        """A tight cluster (one bucket above the large-bucket size) gives the exact pairs."""
        rng = np.random.default_rng(5)
        x = _fresh(rng, 2000, 64)
        cluster = x[0] + 0.05 * _fresh(rng, 400, 64)
        x = np.concatenate([x, cluster / np.linalg.norm(cluster, axis=1, keepdims=True)])
        exact = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=10**9)}
        lsh = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=100)}
        assert len(exact) > 400 * 399 // 2 and lsh <= exact
        assert len(lsh) >= 0.99 * len(exact)

    @given(st.lists(st.integers(0, 400), unique=True, min_size=1, max_size=40),
           st.lists(st.integers(401, 800), unique=True, max_size=40), st.integers(0, 3))
    @hsettings(max_examples=40, deadline=None)
    def test_sides_stable_as_data_grows(self, first: list[int], later: list[int],
                                        seed: int) -> None:
        """Adding groups never moves an existing unit's side (same seed and fractions)."""
        rng = np.random.default_rng(seed)

        def groups(ids: list[int]) -> list[GroupImages]:
            return [_group("p", f"g{i}", [f"i{i}.png"], _fresh(rng, 1)) for i in ids]

        old = groups(first)
        before = build_units(old, cosine=0.97, seed=seed, test_fraction=0.2,
                             validation_fraction=0.15)
        after = build_units(old + groups(later), cosine=0.97, seed=seed, test_fraction=0.2,
                            validation_fraction=0.15)
        for key in before.unit_of:
            assert before.side_of_group(key) == after.side_of_group(key)

    def test_merge_takes_smallest_key_side_and_is_flagged(self) -> None:
        """Two units that merge take the smaller key's side; moved groups are listed."""
        rng = np.random.default_rng(4)
        groups = [_group("p", f"g{i:03d}", [f"{i}.png"], _fresh(rng, 1), {f"{i}.png": "same"})
                  for i in range(40)]
        units = build_units(groups, cosine=0.97, **SPLIT)
        assert set(units.unit_of.values()) == {"p/g000"}
        assert units.moved_by_merge  # 40 groups hashed alone cannot all share one side
        assert all(units.side_of_group(k) == units.side["p/g000"] for k in units.unit_of)


class TestBaselines:
    def test_best_constant_beats_mean_box_on_skewed_data(self) -> None:
        """On skewed boxes (most small top-left, a few full frames) the fitted box wins."""
        rng = np.random.default_rng(5)
        small = np.column_stack([rng.uniform(0.05, 0.1, 90), rng.uniform(0.05, 0.1, 90)])
        boxes = np.column_stack([small, small + 0.3]).astype(np.float32)
        boxes = np.concatenate([boxes, np.tile([0.0, 0.0, 1.0, 1.0], (10, 1))]).astype(
            np.float32)
        dims = np.tile([1000.0, 1000.0], (100, 1))
        stages = np.full(100, 2.0)
        base = crop_baseline_boxes(boxes, dims, stages, dims, stages)
        score = {k: float(box_iou(v, boxes).mean()) for k, v in base.items()}
        assert score["best_constant_box"] > score["mean_box"]
        assert score["best_constant_box"] >= score["median_box"] - 1e-9
        assert best_constant_box(boxes).shape == (4,) and median_box(boxes).shape == (4,)


class TestGate:
    def test_judge_table(self) -> None:
        """Error share above the limit or coverage below it fails the project, saying which."""
        report = {"counts_by_project": {"a": 100, "b": 100},
                  "invalid_rows": [{"project": "a"}] * 30 + [{"project": "b"}] * 5}
        out = judge(report, {"a": {"rows": 70, "embedded": 70}, "b": {"rows": 95,
                                                                       "embedded": 20}},
                    max_error_share=0.2, min_coverage=0.5)
        assert "30 of 100 rows" in out["a"]["failures"][0]
        assert "only 20 of 95" in out["b"]["failures"][0]

    def test_validation_only_projects_never_fail_the_gate(self) -> None:
        """A project configured ``train = false`` is listed with its figures but not failed."""
        report = {"counts_by_project": {"legacy": 10}, "invalid_rows": [{"project": "legacy"}] * 9}
        out = judge(report, {"legacy": {"rows": 10, "embedded": 0}}, max_error_share=0.2,
                    min_coverage=0.5, untrained=frozenset({"legacy"}))
        assert out["legacy"]["failures"] == [] and out["legacy"]["trained"] is False
        assert out["legacy"]["invalid_rows"] == 9

    def test_gate_refuses_with_a_named_report(self, settings: Settings, store: StateStore,
                                              make_db: Any, validator: Validator) -> None:
        """A project with many invalid rows is refused, and the reason names the report."""
        db = make_db("mojo3", checks=False)  # an older backfill DB without CHECKs
        db.insert_many(6)
        for _ in range(4):
            db.insert(user_action="approve", image_width=0)  # must-pass check fails
        validator.validate_all()
        from datetime import UTC, datetime

        result = data_gate(settings, store, datetime(2026, 1, 2, tzinfo=UTC),
                           coverage={"mojo3": {"rows": 6, "embedded": 6}}, kind="ranker")
        assert not result.passed
        assert result.report is not None and result.report.exists()
        assert str(result.report) in result.reason and "mojo3" in result.reason
        assert result.markdown is not None and "REFUSED" in result.markdown.read_text()
