"""The summary's plots, inspected as matplotlib Figures before anything is saved: integer version
ticks, baselines visible with one version, legends only for series with data, numbers on bars,
issues split by severity, real crop panels; and the intervals beside every model figure."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.summary import build_summary
from daemon.summary.plots import (
    plot_coverage,
    plot_crop_panels,
    plot_issues,
    plot_model_metrics,
)
from daemon.summary.stats import mean_interval, wilson
from daemon.training import registry
from tests.conftest import NOW
from tests.summary_helpers import scene


def _ranker_meta(version: int, *, with_ai: bool = True) -> dict[str, Any]:
    def fig(top1: float, anomaly: float) -> dict[str, Any]:
        return {"groups": 200, "anomaly_groups": 20, "top1": top1, "top1_anomaly": anomaly}

    metrics = {"model": fig(0.9 + version / 100, 0.4 + version / 20),
               "baseline_highest_stage": fig(0.9, 0.0)}
    if with_ai:
        metrics["recorded_ai_pick"] = fig(0.88, 0.05)
    return {"kind": "ranker", "version": version, "created_at": "2025-10-01T00:00:00Z",
            "promoted": True, "promotion_reason": "better", "holdout_size": 200,
            "train_size": 800, "metrics": metrics}


def _crop_meta(version: int) -> dict[str, Any]:
    def fig(mean: float | None, n: int = 60) -> dict[str, Any]:
        return {"n": n, "mean_iou": mean, "std_iou": 0.2,
                "by_stage": {"2": {"n": n, "mean_iou": mean, "std_iou": 0.2}}}

    # the mean-box baseline has no figures (an older run): it must not reach the legend
    return {"kind": "crop", "version": version, "created_at": "2025-10-01T00:00:00Z",
            "promoted": True, "promotion_reason": "better", "holdout_size": 60,
            "train_size": 240, "metrics": {"model": fig(0.71), "baseline_full_frame": fig(0.5),
                                           "baseline_mean_box": fig(None, 0)}}


def _register(settings: Settings, kind: str, metas: list[dict[str, Any]]) -> None:
    for meta in metas:
        registry.save_model(settings.models_dir, kind, meta["version"], {}, meta)


def _legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def _line(ax: Any, label_start: str) -> Any:
    return next(ln for ln in ax.get_lines() if ln.get_label().startswith(label_start))


class TestModelPlot:
    def test_version_ticks_are_integers(self, settings: Settings, store: StateStore) -> None:
        """Three versions give the ticks v1, v2, v3 and nothing fractional in between."""
        _register(settings, "ranker", [_ranker_meta(v) for v in (1, 2, 3)])
        fig = plot_model_metrics(build_summary(settings, store, NOW))
        ranker_ax = fig.axes[0]
        assert [t.get_text() for t in ranker_ax.get_xticklabels()] == ["v1", "v2", "v3"]
        assert all(float(x).is_integer() for x in ranker_ax.get_xticks())

    def test_many_versions_still_get_integer_ticks(self, settings: Settings,
                                                   store: StateStore) -> None:
        """Beyond a dozen versions the locator is told to use integers only."""
        _register(settings, "ranker", [_ranker_meta(v) for v in range(1, 21)])
        fig = plot_model_metrics(build_summary(settings, store, NOW))
        fig.canvas.draw()
        ticks = [x for x in fig.axes[0].get_xticks() if 0.4 <= x <= 20.6]
        assert ticks and all(float(x).is_integer() for x in ticks)

    def test_baselines_are_visible_with_one_version(self, settings: Settings,
                                                    store: StateStore) -> None:
        """With a single model version each baseline is a horizontal segment of real width
        inside the axis, not a zero-length line that draws nothing."""
        _register(settings, "ranker", [_ranker_meta(1)])
        _register(settings, "crop", [_crop_meta(1)])
        fig = plot_model_metrics(build_summary(settings, store, NOW))
        for ax, label in ((fig.axes[0], "highest stage top-1"), (fig.axes[1], "full frame")):
            xs = [x for x in _line(ax, label).get_xdata() if not math.isnan(x)]
            lo, hi = ax.get_xlim()
            assert max(xs) - min(xs) >= 0.5
            assert lo <= min(xs) and max(xs) <= hi
            assert [t.get_text() for t in ax.get_xticklabels()] == ["v1"]

    def test_legend_lists_only_series_with_data(self, settings: Settings,
                                                store: StateStore) -> None:
        """A baseline with no figures (no recorded AI pick, no mean box) has no legend entry;
        every entry names its n."""
        _register(settings, "ranker", [_ranker_meta(1, with_ai=False)])
        _register(settings, "crop", [_crop_meta(1)])
        fig = plot_model_metrics(build_summary(settings, store, NOW))
        ranker, crop = (_legend_texts(ax) for ax in fig.axes[:2])
        assert not any(t.startswith("recorded AI") for t in ranker)
        assert [t.split(" (")[0] for t in crop] == ["full frame", "model"]
        assert all("(n=" in t for t in ranker + crop)

    def test_every_model_figure_has_n_and_an_interval(self, settings: Settings,
                                                      store: StateStore) -> None:
        """Top-1 carries a Wilson interval, mean IoU a t-interval, each with its n."""
        _register(settings, "ranker", [_ranker_meta(1)])
        _register(settings, "crop", [_crop_meta(1)])
        models = build_summary(settings, store, NOW)["models"]
        top1 = models["ranker"][0]["model_top1"]
        iou = models["crop"][0]["model_mean_iou"]
        assert (top1["n"], top1["method"]) == (200, "wilson")
        assert top1["low"] < top1["value"] < top1["high"]
        assert (iou["n"], iou["method"]) == (60, "t")
        assert iou["low"] < iou["value"] < iou["high"]
        assert models["ranker"][0]["holdout_size"] == 200


class TestIntervals:
    def test_wilson_matches_the_textbook_values(self) -> None:
        """Wilson 95% of 50/100 is [0.404, 0.596]; 0/20 keeps a positive upper bound."""
        iv = wilson(0.5, 100)
        assert (round(iv.low or 0, 3), round(iv.high or 0, 3)) == (0.404, 0.596)
        zero = wilson(0.0, 20)
        assert zero.low == 0.0 and 0.15 < (zero.high or 0) < 0.17

    def test_t_interval_and_its_conservative_bound(self) -> None:
        """mean 0.6, sd 0.2, n 25: +-0.0826 (t 2.064); without sd the widest possible spread."""
        iv = mean_interval(0.6, 25, 0.2)
        assert iv.method == "t" and iv.high is not None
        assert abs((iv.high - 0.6) - 2.064 * 0.2 / 5) < 0.002
        bound = mean_interval(0.6, 25)
        assert bound.method == "t-bound" and bound.high is not None
        assert bound.high - 0.6 > iv.high - 0.6


class TestDataPlots:
    def test_issue_bars_split_by_severity_with_numbers(self, settings: Settings, make_db: Any,
                                                       store: StateStore) -> None:
        """Errors and warnings are separate coloured series, each bar carries its count, and
        coverage bars carry theirs (lost images included)."""
        scene(settings, store, make_db, NOW, old=30, recent=12, bad=8, embedded=5, lost=4)
        summary = build_summary(settings, store, NOW)
        fig = plot_issues(summary)
        ax = fig.axes[0]
        totals = summary["issues"]["totals"]
        assert _legend_texts(ax) == [f"error ({totals['error']})",
                                     f"warning ({totals['warning']})"]
        labels = {t.get_text() for t in ax.texts}
        for sev in ("error", "warning"):
            for n in summary["issues"]["by_severity"][sev].values():
                assert str(n) in labels
        cov = plot_coverage(summary).axes[0]
        assert {"5", "4"} <= {t.get_text() for t in cov.texts}
        assert any(t.startswith("lost (4)") for t in _legend_texts(cov))

    @pytest.mark.slow
    def test_crop_panels_draw_images_with_both_boxes(self, settings: Settings, make_db: Any,
                                                     store: StateStore) -> None:
        """Recent crop decisions whose image is on disk are drawn with the person's box; the
        recorded model box is drawn too; a deleted image becomes a note, not an error."""
        planted = scene(settings, store, make_db, NOW, old=10, recent=0, bad=0, embedded=0,
                        lost=0)
        db = planted["db"]
        rows = [db.insert(timestamp=(NOW - timedelta(hours=h)).isoformat(),
                          user_action="crop", final_crop_coords="[0.1, 0.1, 0.6, 0.6]",
                          crop_timestamp=(NOW - timedelta(hours=h)).isoformat(),
                          ai_crop_coords="[0.2, 0.2, 0.7, 0.7]") for h in (1, 2, 3)]
        from tests.summary_helpers import images_for

        images_for(settings, store, "mojo3", rows, planted["root"], NOW, embedded=0, lost=1)
        summary = build_summary(settings, store, NOW)
        panels = summary["crop_panels"]
        # the newest crop's image was deleted: the next two are drawn, it becomes a note
        assert [p["group_id"] for p in panels[:3]] == [rows[1]["group_id"],
                                                       rows[2]["group_id"], rows[0]["group_id"]]
        assert [p["image_path"] is not None for p in panels[:3]] == [True, True, False]
        assert panels[2]["note"] == "image no longer on disk (deleted after review)"
        assert panels[0]["model_box_from"] == "ai_crop_coords in the row"
        fig = plot_crop_panels(summary)
        drawn = [ax for ax in fig.axes if ax.images]
        assert len(drawn) == 2
        assert all(len(ax.patches) == 2 for ax in drawn)
        assert any("no longer on disk" in t.get_text() for ax in fig.axes for t in ax.texts)
