"""The summary's plots, one function per PNG, each returning a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot: no global state, safe on the
worker thread, nothing to close) so tests can inspect tick labels, line extents and legend
entries before anything is saved.  Rules every plot keeps, each one a complaint from a reader:
version axes have integer ticks; a baseline is drawn as a segment across each version, so it
shows with a single version; a legend lists only series that have data; bars carry their
numbers; issues are split by severity.  matplotlib is imported here only, lazily by the caller.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from daemon.summary.live import plot_live_accuracy

SEVERITY_COLOURS = {"error": "#c0392b", "warning": "#e69f00"}
FATE_COLOURS = {"embedded": "#2e8b57", "failed": "#c0392b", "waiting": "#9db4c0",
                "lost": "#555555"}
_PANEL_PIXELS = 480
_MAX_PANEL_IMAGE_PIXELS = 80_000_000


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only for artists that were given a label (series with data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, **kwargs)


def _value(fig: Any) -> float | None:
    v = fig.get("value") if isinstance(fig, dict) else fig
    return None if v is None else float(v)


def _err(figs: Sequence[Any]) -> list[list[float]]:
    """Asymmetric error bar lengths from interval dicts (0 where unknown)."""
    lo, hi = [], []
    for f in figs:
        v = _value(f)
        if v is None or not isinstance(f, dict) or f.get("low") is None:
            lo.append(0.0)
            hi.append(0.0)
        else:
            lo.append(max(0.0, v - float(f["low"])))
            hi.append(max(0.0, float(f["high"]) - v))
    return [lo, hi]


def _version_axis(ax: Any, versions: Sequence[int]) -> None:
    """Integer ticks only, with room around a single version."""
    lo, hi = min(versions), max(versions)
    ax.set_xlim(lo - 0.6, hi + 0.6)
    if len(versions) <= 12:
        ax.set_xticks(list(versions), [f"v{v}" for v in versions])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("model version")


def _segments(versions: Sequence[int], values: Sequence[float | None]
              ) -> tuple[list[float], list[float]]:
    """A horizontal segment across each version's slot (NaN-separated): a baseline that is
    visible with one version and shows how it moved across several."""
    xs: list[float] = []
    ys: list[float] = []
    for v, y in zip(versions, values, strict=True):
        if y is None:
            continue
        xs += [v - 0.4, v + 0.4, math.nan]
        ys += [y, y, math.nan]
    return xs, ys


def plot_decisions(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    dec = summary["new_decisions"]
    window = f"{summary['window_start'][:16]} to {summary['window_end'][:16]} UTC"
    if dec and any(sum(v.values()) for v in dec.values()):
        names = list(dec)
        actions = sorted({a for v in dec.values() for a, n in v.items() if n})
        bottom = [0] * len(names)
        for a in actions:
            vals = [dec[p].get(a, 0) for p in names]
            bars = ax.bar(names, vals, bottom=bottom, label=a, width=0.5)
            ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center",
                         fontsize=8, color="white")
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        # an invisible bar on top carries the totals
        totals = ax.bar(names, [0] * len(names), bottom=bottom, width=0.5)
        ax.bar_label(totals, labels=[str(b) for b in bottom], fontsize=8, padding=2)
        ax.set_ylim(0, max(bottom) * 1.15 + 1)
        ax.set_ylabel("decisions (by their own timestamp)")
        _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _empty(ax, "no decisions timestamped in this window")
    ax.set_title(f"New decisions per project and action\n{window}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_issues(summary: dict[str, Any]) -> Figure:
    by_sev = summary["issues"]["by_severity"]
    codes = sorted({c for v in by_sev.values() for c in v},
                   key=lambda c: (-sum(v.get(c, 0) for v in by_sev.values()), c))
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(codes) + 1.2)))
    ax = fig.subplots()
    if codes:
        left = [0] * len(codes)
        for sev in ("error", "warning"):
            vals = [by_sev.get(sev, {}).get(c, 0) for c in codes]
            if not any(vals):
                continue
            bars = ax.barh(codes, vals, left=left, color=SEVERITY_COLOURS[sev],
                           label=f"{sev} ({sum(vals)})")
            ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center",
                         fontsize=7, color="white")
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.1 + 1)
        ax.set_xlabel("current issues")
        ax.tick_params(axis="y", labelsize=7)
        _legend(ax, fontsize=8, loc="lower right")
    else:
        _empty(ax, "no issues")
    t = summary["issues"]["totals"]
    ax.set_title(f"Issues by code: {t.get('error', 0)} errors, {t.get('warning', 0)} warnings",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_coverage(summary: dict[str, Any]) -> Figure:
    cov = summary["embedding_coverage"]
    projects = cov.get("projects") or {}
    fig = Figure(figsize=(7, max(2.5, 0.5 * len(projects) + 1.4)))
    ax = fig.subplots()
    if cov.get("available") and projects:
        names = list(projects)
        left = [0] * len(names)
        for fate in ("embedded", "failed", "waiting", "lost"):
            vals = [projects[p][fate] for p in names]
            if not any(vals):
                continue
            bars = ax.barh(names, vals, left=left, color=FATE_COLOURS[fate],
                           label=f"{fate} ({sum(vals)})")
            ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center",
                         fontsize=7, color="white")
            left = [a + b for a, b in zip(left, vals, strict=True)]
        for i, p in enumerate(names):
            c = projects[p]["coverage"]
            ax.text(left[i], i, f"  {100 * c:.0f}% embedded" if c is not None else "",
                    va="center", fontsize=8)
        ax.set_xlim(0, max(left) * 1.3 + 1)
        ax.invert_yaxis()
        ax.set_xlabel("image files seen (each counted once)")
        _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _empty(ax, cov.get("reason", "no image files seen yet"))
    ax.set_title("Embedding coverage: vanished before embedding = lost", fontsize=10)
    fig.tight_layout()
    return fig


def _series(ax: Any, versions: list[int], items: list[dict[str, Any]], key: str, label: str,
            style: str, *, baseline: bool = False, colour: str | None = None) -> None:
    figs = [i.get(key) for i in items]
    values = [_value(f) for f in figs]
    if all(v is None for v in values):
        return  # no data: no line, no legend entry
    n = next((f.get("n") for f in reversed(figs) if isinstance(f, dict) and f.get("n")), None)
    text = f"{label} (n={n})" if n else label
    if baseline:
        xs, ys = _segments(versions, values)
        ax.plot(xs, ys, style, label=text, color=colour, linewidth=2)
    else:
        pts = [(v, y, f) for v, y, f in zip(versions, values, figs, strict=True) if y is not None]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=_err([p[2] for p in pts]),
                    fmt=style, label=text, color=colour, capsize=3)


def plot_model_metrics(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11, 5))
    a1, a2 = fig.subplots(1, 2)
    rk = [i for i in summary["models"]["ranker"] if isinstance(i.get("version"), int)]
    if rk:
        v = [i["version"] for i in rk]
        _series(a1, v, rk, "model_top1", "model top-1", "o-", colour="#1f77b4")
        _series(a1, v, rk, "model_top1_anomaly", "model anomaly top-1", "s-", colour="#d62728")
        _series(a1, v, rk, "baseline_top1", "highest stage top-1", "--", baseline=True,
                colour="#1f77b4")
        _series(a1, v, rk, "baseline_top1_anomaly", "highest stage anomaly", "--",
                baseline=True, colour="#d62728")
        _series(a1, v, rk, "recorded_ai_top1", "recorded AI pick top-1", ":", baseline=True,
                colour="#7f7f7f")
        _version_axis(a1, v)
        a1.set_ylim(0, 1.05)
        a1.set_ylabel("share of holdout groups (95% Wilson)")
        _legend(a1, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        a1.set_title(f"Ranker on its holdout (latest: {rk[-1].get('holdout_size')} groups)",
                     fontsize=10)
    else:
        _empty(a1, "no ranker trained yet")
        a1.set_title("Ranker on its holdout", fontsize=10)
    cr = [i for i in summary["models"]["crop"] if isinstance(i.get("version"), int)]
    if cr:
        v = [i["version"] for i in cr]
        _series(a2, v, cr, "model_mean_iou", "model", "o-", colour="#2ca02c")
        _series(a2, v, cr, "full_frame_mean_iou", "full frame", "--", baseline=True,
                colour="#7f7f7f")
        _series(a2, v, cr, "mean_box_mean_iou", "mean box", "-.", baseline=True,
                colour="#9467bd")
        _version_axis(a2, v)
        a2.set_ylim(0, 1.05)
        a2.set_ylabel("mean IoU (95% t-interval)")
        _legend(a2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        a2.set_title(f"Crop proposer (latest: {cr[-1].get('holdout_size')} holdout crops)",
                     fontsize=10)
    else:
        _empty(a2, "no crop proposer trained yet")
        a2.set_title("Crop proposer mean IoU", fontsize=10)
    fig.tight_layout()
    return fig


def plot_crop_by_stage(summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    cr = summary["models"]["crop"]
    latest = cr[-1] if cr else None
    if latest and latest.get("by_stage"):
        stages = list(latest["by_stage"])
        x = list(range(len(stages)))
        for k, (key, label) in enumerate((("model", "model"), ("full_frame", "full frame"),
                                          ("mean_box", "mean box"))):
            figs = [latest["by_stage"][s].get(key) for s in stages]
            vals = [_value(f) for f in figs]
            if all(v is None for v in vals):
                continue
            bars = ax.bar([i + 0.27 * (k - 1) for i in x], [v or 0 for v in vals], width=0.27,
                          yerr=_err(figs), capsize=2, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "" for v in vals],
                         fontsize=7, padding=2)
        ax.set_xticks(x, [f"stage {s}\nn={latest['by_stage'][s].get('n')}" for s in stages])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("mean IoU (95% t-interval)")
        _legend(ax, fontsize=8)
        ax.set_title(f"Crop IoU by stage (crop proposer v{latest['version']}, holdout "
                     f"{latest.get('holdout_size')})", fontsize=10)
    else:
        _empty(ax, "no crop proposer trained yet")
        ax.set_title("Crop IoU by stage", fontsize=10)
    fig.tight_layout()
    return fig


def load_panel_image(path: str) -> Any:
    """An RGB thumbnail of a regular image file, or raise OSError/ValueError with the reason."""
    from PIL import Image, ImageOps

    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError("not a regular file")
    with Image.open(path) as opened:
        if opened.width * opened.height > _MAX_PANEL_IMAGE_PIXELS:
            raise ValueError(f"{opened.width}x{opened.height} pixels is too large to draw")
        im: Any = ImageOps.exif_transpose(opened) or opened
        im.thumbnail((_PANEL_PIXELS, _PANEL_PIXELS))
        return im.convert("RGB")


def plot_crop_panels(summary: dict[str, Any],
                     load: Callable[[str], Any] = load_panel_image) -> Figure:
    panels = summary["crop_panels"]
    fig = Figure(figsize=(3.2 * max(1, len(panels)), 3.8))
    if not panels:
        ax = fig.subplots()
        _empty(ax, "no finished crop decision yet")
        ax.set_title("Recent crops: person's box vs model's box", fontsize=10)
        fig.tight_layout()
        return fig
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels, strict=True):
        title = f"{p['project']}\n{str(p['group_id'])[-28:]}"
        image = None
        note = p.get("note")
        if p.get("image_path"):
            try:
                image = load(p["image_path"])
            except Exception as exc:
                note = f"image unreadable: {type(exc).__name__}"
        if image is None:
            ax.text(0.5, 0.5, (note or "image not available").replace(" (", "\n("),
                    ha="center", va="center", transform=ax.transAxes, fontsize=7)
            ax.set_axis_off()
            ax.set_title(title, fontsize=7)
            continue
        w, h = image.size
        ax.imshow(image)
        for box, colour, label in ((p.get("human_box"), "#00c853", "person"),
                                   (p.get("model_box"), "#ff1744", "model")):
            if box:
                x1, y1, x2, y2 = box
                ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h,
                                       fill=False, edgecolor=colour, linewidth=2,
                                       linestyle="-" if label == "person" else "--",
                                       label=label))
        ax.set_xticks([])
        ax.set_yticks([])
        src = p.get("model_box_from") or "no model box available"
        ax.set_xlabel(f"green: person; red dashed: {src}", fontsize=6)
        ax.set_title(title, fontsize=7)
    fig.suptitle("Recent crops: person's box vs model's box", fontsize=10)
    fig.tight_layout()
    return fig


def plot_trend(summary: dict[str, Any]) -> Figure:
    days = summary["trend"]["days"]
    labels = [d["day"][5:] for d in days]
    x = list(range(len(days)))
    fig = Figure(figsize=(11, 6))
    (a1, a2), (a3, a4) = fig.subplots(2, 2)
    bars = a1.bar(x, [d["decisions"] for d in days], color="#1f77b4")
    a1.bar_label(bars, labels=[str(d["decisions"]) if d["decisions"] else "" for d in days],
                 fontsize=7, padding=1)
    a1.set_title("Decisions per day (by their own timestamp)", fontsize=9)
    a1.yaxis.set_major_locator(MaxNLocator(integer=True))

    def line(ax: Any, key: str, label: str, colour: str, scale: float = 1.0) -> None:
        pts = [(i, d.get(key)) for i, d in zip(x, days, strict=True) if d.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], "o-", color=colour,
                    label=label, markersize=4)

    line(a2, "errors", "errors", SEVERITY_COLOURS["error"])
    line(a2, "warnings", "warnings", SEVERITY_COLOURS["warning"])
    a2.set_title("Current issues at each day's summary", fontsize=9)
    a2.yaxis.set_major_locator(MaxNLocator(integer=True))
    line(a3, "coverage", "embedded", FATE_COLOURS["embedded"], 100.0)
    a3.set_title("Embedding coverage (%)", fontsize=9)
    a3.set_ylim(0, 105)
    line(a4, "ranker_top1", "ranker champion top-1", "#1f77b4")
    line(a4, "crop_mean_iou", "crop champion mean IoU", "#2ca02c")
    a4.set_title("Champion figures", fontsize=9)
    a4.set_ylim(0, 1.05)
    for ax in (a1, a2, a3, a4):
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set_xlim(-0.6, len(days) - 0.4)
        if ax is not a1:
            _legend(ax, fontsize=7)
            if not ax.get_lines():
                ax.text(0.5, 0.5, "no data in these days yet", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
    fig.suptitle(f"Last {len(days)} days (gaps: no summary written that day)", fontsize=10)
    fig.tight_layout()
    return fig


BUILDERS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "decisions": plot_decisions, "issues": plot_issues, "embedding_coverage": plot_coverage,
    "model_metrics": plot_model_metrics, "crop_iou_by_stage": plot_crop_by_stage,
    "crop_panels": plot_crop_panels, "trend": plot_trend,
    "live_accuracy": plot_live_accuracy,
}


def render_png(fig: Figure, dpi: int = 80) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
