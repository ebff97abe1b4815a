"""Holdout metrics and the baselines they are shown beside.  Pure numpy, no I/O.

A number is only shown next to what a trivial rule scores on the same groups: the ranker beside
"always the highest stage" and the AI pick recorded in the rows; the crop proposer beside the
full frame and the mean training box.  The old ranker reported 98.3% while scoring 2.8% on
anomalies, which is what the baseline scores; :func:`baseline_copy_reason` flags such a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CORNER_TOLERANCE = 0.05


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None


def highest_stage_picks(offsets: np.ndarray) -> np.ndarray:
    """The "always highest stage" rule: images are stored lowest stage first, so the last."""
    return np.diff(offsets) - 1


def selection_metrics(pred: np.ndarray, picks: np.ndarray, offsets: np.ndarray,
                      projects: Sequence[str], mask: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Top-1 agreement with the person overall, on normal and anomaly groups, per project.

    ``mask`` limits the groups (the AI pick exists only where an AI ran)."""
    sel = np.ones(len(picks), dtype=bool) if mask is None else mask
    anomaly = picks != highest_stage_picks(offsets)
    hit = pred == picks
    names = np.asarray(projects, dtype=object)
    per_project = {
        str(p): _rate(hit[sel & (names == p)]) for p in sorted(set(projects))
        if (sel & (names == p)).any()
    }
    return {
        "groups": int(sel.sum()), "anomaly_groups": int((sel & anomaly).sum()),
        "top1": _rate(hit[sel]), "top1_normal": _rate(hit[sel & ~anomaly]),
        "top1_anomaly": _rate(hit[sel & anomaly]), "per_project": per_project,
    }


def ranker_report(pred: np.ndarray, picks: np.ndarray, offsets: np.ndarray,
                  ai_picks: np.ndarray, projects: Sequence[str]) -> dict[str, Any]:
    """The model's figures with both baselines on the same holdout groups."""
    base = highest_stage_picks(offsets)
    return {
        "model": selection_metrics(pred, picks, offsets, projects),
        "baseline_highest_stage": selection_metrics(base, picks, offsets, projects),
        "recorded_ai_pick": selection_metrics(ai_picks, picks, offsets, projects,
                                              mask=ai_picks >= 0),
        "agreement_with_baseline": _rate(pred == base),
    }


def baseline_copy_reason(report: dict[str, Any], agreement_limit: float) -> str | None:
    """Why the model is only the baseline again, or None when it is more than that."""
    agree = report.get("agreement_with_baseline")
    if agree is not None and agree >= agreement_limit:
        return f"agrees with the highest-stage rule on {agree:.1%} of holdout groups"
    model, base = report["model"]["top1_anomaly"], report["baseline_highest_stage"]["top1_anomaly"]
    if model is not None and base is not None and model <= base:
        return f"anomaly accuracy {model:.1%} is not above the baseline's {base:.1%}"
    return None


# -- boxes ----------------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (n, 4) arrays of normalized boxes."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _box_figures(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    if len(true) == 0:
        return {"n": 0, "mean_iou": None, "median_iou": None, "std_iou": None,
                "mean_centre_distance": None, "corners_within_0_05": None}
    iou = box_iou(pred, true)
    cp = (pred[:, :2] + pred[:, 2:]) / 2
    ct = (true[:, :2] + true[:, 2:]) / 2
    centre = np.linalg.norm(cp - ct, axis=1)
    corners = np.all(np.abs(pred - true) <= CORNER_TOLERANCE, axis=1)
    return {"n": len(true), "mean_iou": float(iou.mean()),
            "median_iou": float(np.median(iou)),
            # the summary's t-interval of the mean IoU needs the spread (sample sd, ddof=1)
            "std_iou": float(iou.std(ddof=1)) if len(iou) > 1 else None,
            "mean_centre_distance": float(centre.mean()),
            "corners_within_0_05": float(corners.mean())}


def stage_label(stage: float) -> str:
    return "unknown" if math.isnan(stage) else f"{stage:g}"


def box_metrics(pred: np.ndarray, true: np.ndarray, stages: np.ndarray) -> dict[str, Any]:
    """IoU, centre distance and corner agreement, overall and by stage."""
    out = _box_figures(pred, true)
    labels = np.asarray([stage_label(float(s)) for s in stages], dtype=object)
    out["by_stage"] = {lab: _box_figures(pred[labels == lab], true[labels == lab])
                       for lab in sorted(set(labels.tolist()))}
    return out


def crop_report(pred: np.ndarray, true: np.ndarray, stages: np.ndarray,
                mean_box: np.ndarray) -> dict[str, Any]:
    """The model's box figures beside the full-frame and mean-box baselines."""
    n = len(true)
    full = np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1))
    mean = np.tile(mean_box.astype(np.float32), (n, 1))
    return {"model": box_metrics(pred, true, stages),
            "baseline_full_frame": box_metrics(full, true, stages),
            "baseline_mean_box": box_metrics(mean, true, stages),
            "mean_box": [float(v) for v in mean_box]}


def aspect_box(cx: np.ndarray, cy: np.ndarray, s: np.ndarray, min_side: float = 0.02
               ) -> np.ndarray:
    """A valid normalized box of side ``s`` centred as near ``(cx, cy)`` as the frame allows.

    Equal normalized width and height is what keeping the image's aspect ratio means; shifting
    (never shrinking) keeps the box inside [0, 1]."""
    s = np.clip(s, min_side, 1.0)
    cx = np.clip(cx, s / 2, 1 - s / 2)
    cy = np.clip(cy, s / 2, 1 - s / 2)
    return np.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], axis=1)
