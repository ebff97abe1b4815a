"""The summary's live-accuracy section: each champion on the groups reviewed after it predicted
them, beside its test-side figures and the highest-stage rule on the same groups.

Holdout figures say how a model did on data it was chosen on; these are the honest numbers: a
prediction trainingd made (``data/ai_data/predictions/<project>.db``) and the reviewer's
decision that came after it (``live_reviews``, written by :mod:`daemon.predict.live`).  A
prediction made by version v exists only while v is the champion, so every review counted for
v came after v's promotion.  Top-1 shares carry a Wilson interval, mean IoU a t-interval, each
with its n.  Reads only (the predictions DBs opened read-only).
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from daemon.settings import Settings
from daemon.summary.stats import fmt, mean_interval, wilson

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _reviews(settings: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    from daemon.predict.store import live_review_rows, predictions_dir

    folder = predictions_dir(settings.data_root)
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    if not folder.is_dir():
        return out, notes
    for db in sorted(folder.glob("*.db")):
        try:
            cols, rows = live_review_rows(db)
            out.extend({"project": db.stem, **dict(zip(cols, r, strict=True))} for r in rows)
        except sqlite3.Error as exc:
            notes.append(f"{db.name}: not readable now ({exc})")
    return out, notes


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gather(settings: Settings) -> dict[str, Any]:
    """Per ranker version: live top-1, the rule's top-1 on the same groups, the test side; per
    crop version: live mean IoU and the test side; each with n and a 95% interval."""
    from daemon.training import registry

    reviews, notes = _reviews(settings)
    by_ranker: dict[int, list[dict[str, Any]]] = defaultdict(list)
    by_crop: dict[int, list[float]] = defaultdict(list)
    pending = 0
    for r in reviews:
        by_ranker[int(r["ranker_version"])].append(r)
        if r["crop_version"] is not None and r["crop_iou"] is not None:
            by_crop[int(r["crop_version"])].append(float(r["crop_iou"]))
        pending += bool(r["crop_pending"])
    champions = {k: registry.champion_version(settings.models_dir, k) for k in ("ranker", "crop")}
    ranker = []
    for v in sorted(by_ranker):
        rows = by_ranker[v]
        n = len(rows)
        meta = registry.read_metadata(settings.models_dir, "ranker", v) or {}
        test = ((meta.get("metrics") or {}).get("model") or {})
        ranker.append({
            "version": v, "champion": champions["ranker"] == v, "n": n,
            "projects": sorted({r["project"] for r in rows}),
            "live_top1": wilson(sum(r["pick_match"] for r in rows) / n, n).to_dict(),
            "rule_top1": wilson(sum(r["rule_match"] for r in rows) / n, n).to_dict(),
            "test_top1": wilson(test.get("top1"), test.get("groups")).to_dict()})
    crop = []
    for v in sorted(by_crop):
        values = by_crop[v]
        mean, std = _mean_std(values)
        meta = registry.read_metadata(settings.models_dir, "crop", v) or {}
        test = ((meta.get("metrics") or {}).get("model") or {})
        crop.append({
            "version": v, "champion": champions["crop"] == v, "n": len(values),
            "live_mean_iou": mean_interval(mean, len(values), std).to_dict(),
            "test_mean_iou": mean_interval(test.get("mean_iou"), test.get("n"),
                                           test.get("std_iou")).to_dict()})
    return {"ranker": ranker, "crop": crop, "reviews": len(reviews),
            "crops_pending": pending, "notes": notes}


def render(live: dict[str, Any], image: str) -> list[str]:
    """The Markdown lines of the section."""
    lines = ["## Live accuracy (groups reviewed after the champion predicted them)", "",
             "Each figure: value [95% interval] n. Live: the reviewer's decisions on groups "
             "trainingd predicted before their review; rule: the highest-stage pick on the same "
             "groups; test: the holdout figure the version was promoted on.", "", image, ""]
    if not live["ranker"]:
        lines.append("No predicted group has been reviewed yet.")
    else:
        lines += ["| ranker | champion now | reviewed groups | live top-1 | highest-stage rule "
                  "(same groups) | test top-1 |", "|---|---|---|---|---|---|"]
        for r in live["ranker"]:
            lines.append(f"| v{r['version']} | {'yes' if r['champion'] else ''} | {r['n']} | "
                         f"{fmt(r['live_top1'])} | {fmt(r['rule_top1'])} | "
                         f"{fmt(r['test_top1'])} |")
    if live["crop"]:
        lines += ["", "| crop | champion now | reviewed crops | live mean IoU | test mean IoU |",
                  "|---|---|---|---|---|"]
        for c in live["crop"]:
            lines.append(f"| v{c['version']} | {'yes' if c['champion'] else ''} | {c['n']} | "
                         f"{fmt(c['live_mean_iou'])} | {fmt(c['test_mean_iou'])} |")
    if live["crops_pending"]:
        lines += ["", f"{live['crops_pending']} reviewed crop(s) wait for the crop tool's final "
                  "box; they count once it arrives."]
    lines += [f"- {n}" for n in live["notes"]]
    return [*lines, ""]


def _bars(ax: Any, items: list[dict[str, Any]], series: list[tuple[str, str, str]],
          title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / len(series)
    xs = list(range(len(items)))
    for j, (key, label, colour) in enumerate(series):
        vals = [it[key]["value"] for it in items]
        if all(v is None for v in vals):
            continue
        pos = [x + (j - (len(series) - 1) / 2) * width for x in xs]
        heights = [v or 0.0 for v in vals]
        err = [[max(0.0, h - (it[key]["low"] if it[key]["low"] is not None else h))
                for h, it in zip(heights, items, strict=True)],
               [max(0.0, (it[key]["high"] if it[key]["high"] is not None else h) - h)
                for h, it in zip(heights, items, strict=True)]]
        bars = ax.bar(pos, heights, width, yerr=err, capsize=3, label=label, color=colour)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "-" for v in vals],
                     fontsize=7)
    ax.set_xticks(xs, [f"v{it['version']}\nn={it['n']}" for it in items])
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.yaxis.set_major_locator(MaxNLocator(6))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="lower right")


def plot_live_accuracy(summary: dict[str, Any]) -> Figure:
    """Per champion: live top-1 beside the rule and the test side; live IoU beside the test."""
    from matplotlib.figure import Figure

    live = summary.get("live_accuracy") or {"ranker": [], "crop": []}
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, items, series, title in (
            (ax1, live["ranker"], [("live_top1", "live", "#2e8b57"),
                                   ("rule_top1", "highest stage (same groups)", "#9db4c0"),
                                   ("test_top1", "test side", "#555555")], "ranker top-1"),
            (ax2, live["crop"], [("live_mean_iou", "live", "#2e8b57"),
                                 ("test_mean_iou", "test side", "#555555")], "crop mean IoU")):
        if items:
            _bars(ax, items, series, title)
        else:
            ax.text(0.5, 0.5, f"{title}: no reviewed prediction yet", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
    fig.tight_layout()
    return fig
