"""Holdout metrics and the baselines they are shown beside.  Pure numpy, no I/O.

A number is only shown next to what a trivial rule scores on the same groups: the ranker beside
"always the highest stage" and the AI pick recorded in the rows; the crop proposer beside the
full frame and the mean training box.  The old ranker reported 98.3% while scoring 2.8% on
anomalies, which is what the baseline scores; :func:`baseline_copy_reason` flags such a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CORNER_TOLERANCE = 0.05


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None


def highest_stage_picks(offsets: np.ndarray) -> np.ndarray:
    """The "always highest stage" rule: images are stored lowest stage first, so the last."""
    return np.diff(offsets) - 1


@dataclass(frozen=True)
class SelectionFigures:
    """Top-1 agreement with the person on some groups: overall, normal, anomaly, per project
    (a rate is None where there is no group to score)."""

    groups: int
    anomaly_groups: int
    top1: float | None
    top1_normal: float | None
    top1_anomaly: float | None
    per_project: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "anomaly_groups": self.anomaly_groups,
                "top1": self.top1, "top1_normal": self.top1_normal,
                "top1_anomaly": self.top1_anomaly, "per_project": self.per_project}


def selection_metrics(pred: np.ndarray, picks: np.ndarray, offsets: np.ndarray,
                      projects: Sequence[str], mask: np.ndarray | None = None
                      ) -> SelectionFigures:
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
    return SelectionFigures(int(sel.sum()), int((sel & anomaly).sum()), _rate(hit[sel]),
                            _rate(hit[sel & ~anomaly]), _rate(hit[sel & anomaly]), per_project)


def ranker_report(pred: np.ndarray, picks: np.ndarray, offsets: np.ndarray,
                  ai_picks: np.ndarray, projects: Sequence[str]) -> dict[str, Any]:
    """The model's figures with both baselines on the same holdout groups."""
    base = highest_stage_picks(offsets)
    return {
        "model": selection_metrics(pred, picks, offsets, projects).to_dict(),
        "baseline_highest_stage": selection_metrics(base, picks, offsets, projects).to_dict(),
        "recorded_ai_pick": selection_metrics(ai_picks, picks, offsets, projects,
                                              mask=ai_picks >= 0).to_dict(),
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


@dataclass(frozen=True)
class BoxMetrics:
    """Box figures (n, IoU mean / median / sd, centre distance, corners within tolerance)
    overall and per stage label, in the report's JSON shape."""

    overall: dict[str, Any]
    by_stage: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.overall, "by_stage": self.by_stage}


def box_metrics(pred: np.ndarray, true: np.ndarray, stages: np.ndarray) -> BoxMetrics:
    """IoU, centre distance and corner agreement, overall and by stage."""
    labels = np.asarray([stage_label(float(s)) for s in stages], dtype=object)
    return BoxMetrics(_box_figures(pred, true),
                      {lab: _box_figures(pred[labels == lab], true[labels == lab])
                       for lab in sorted(set(labels.tolist()))})


def crop_report(pred: np.ndarray, true: np.ndarray, stages: np.ndarray,
                mean_box: np.ndarray) -> dict[str, Any]:
    """The model's box figures beside the full-frame and mean-box baselines."""
    n = len(true)
    full = np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1))
    mean = np.tile(mean_box.astype(np.float32), (n, 1))
    return {"model": box_metrics(pred, true, stages).to_dict(),
            "baseline_full_frame": box_metrics(full, true, stages).to_dict(),
            "baseline_mean_box": box_metrics(mean, true, stages).to_dict(),
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


# -- baselines scored per test item (issue 12): what the paired promotion test compares --------

def random_picks(offsets: np.ndarray, keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """A uniformly random image per group, stable per group key (not per run order)."""
    import hashlib

    sizes = np.diff(offsets)
    u = np.asarray([int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big")
                    for k in keys], dtype=np.uint64)
    return (u % np.maximum(sizes, 1).astype(np.uint64)).astype(np.int64)


def ranker_baseline_picks(offsets: np.ndarray, ai_picks: np.ndarray, keys: Sequence[str],
                          seed: int = 0) -> dict[str, np.ndarray]:
    """Per test group: the highest stage, a random image, and the recorded AI pick (where no AI
    ran, or only the fake index 0, the reviewer shows the highest stage: so does this)."""
    base = highest_stage_picks(offsets)
    return {"highest_stage": base, "random": random_picks(offsets, keys, seed),
            "recorded_ai_pick": np.where(ai_picks >= 0, ai_picks, base)}


def ranker_hits(pred: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """0/1 per group: the pick was the person's (what McNemar pairs)."""
    out: np.ndarray = (np.asarray(pred) == np.asarray(picks)).astype(np.float64)
    return out


def _cxcys(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = ((b[:, 2] - b[:, 0]) + (b[:, 3] - b[:, 1])) / 2
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, side], axis=1)


def _box(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
    out: np.ndarray = aspect_box(c[:, 0], c[:, 1], c[:, 2]).astype(np.float32)
    return out


def median_box(boxes: np.ndarray) -> np.ndarray:
    """The coordinate-wise median (centre and side) of the training boxes, aspect-keeping."""
    if len(boxes) == 0:
        return np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    out: np.ndarray = _box(np.median(_cxcys(boxes), axis=0))[0]
    return out


def best_constant_box(boxes: np.ndarray, *, max_examples: int = 5000, seed: int = 0
                      ) -> np.ndarray:
    """The aspect-keeping box with the highest mean IoU over the training boxes.

    Coordinate search over (centre x, centre y, side) from the median, with steps halving from
    0.1 to 0.001; at most ``max_examples`` boxes (a seeded sample) are scored per step."""
    if len(boxes) == 0:
        return np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    true = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(true) > max_examples:
        true = true[np.random.default_rng(seed).choice(len(true), max_examples, replace=False)]

    def score(c: np.ndarray) -> float:
        return float(box_iou(np.tile(_box(c), (len(true), 1)), true).mean())

    best = np.median(_cxcys(true), axis=0)
    best_score = score(best)
    for start in (_cxcys(true).mean(axis=0),):
        if (s := score(start)) > best_score:
            best, best_score = start, s
    step = 0.1
    while step >= 0.001:
        improved = True
        while improved:
            improved = False
            for dim in range(3):
                for sign in (-1.0, 1.0):
                    cand = best.copy()
                    cand[dim] += sign * step
                    if (s := score(cand)) > best_score + 1e-12:
                        best, best_score, improved = cand, s, True
        step /= 2
    out: np.ndarray = _box(best)[0]
    return out


def aspect_bucket(dims: np.ndarray) -> np.ndarray:
    """0 portrait (w/h < 0.9), 1 square-ish, 2 landscape (w/h > 1.1)."""
    d = np.asarray(dims, dtype=np.float64).reshape(-1, 2)
    ratio = d[:, 0] / np.where(d[:, 1] > 0, d[:, 1], 1.0)
    return np.where(ratio < 0.9, 0, np.where(ratio > 1.1, 2, 1))


def dims_stage_prior(train_boxes: np.ndarray, train_dims: np.ndarray, train_stages: np.ndarray,
                     test_dims: np.ndarray, test_stages: np.ndarray, *, min_count: int = 5
                     ) -> np.ndarray:
    """Per test crop, the median training box of its (aspect bucket, stage) cell; cells with
    fewer than ``min_count`` training boxes fall back to the aspect bucket, then to all."""
    c = _cxcys(train_boxes)
    tb, tt = aspect_bucket(train_dims), np.nan_to_num(train_stages, nan=-1.0)
    qb, qt = aspect_bucket(test_dims), np.nan_to_num(test_stages, nan=-1.0)
    overall = np.median(c, axis=0) if len(c) else np.asarray([0.5, 0.5, 1.0])
    out = np.tile(overall, (len(qb), 1))
    for i, (b, t) in enumerate(zip(qb, qt, strict=True)):
        cell = (tb == b) & (tt == t)
        if cell.sum() >= min_count:
            out[i] = np.median(c[cell], axis=0)
        elif (tb == b).sum() >= min_count:
            out[i] = np.median(c[tb == b], axis=0)
    return _box(out)


def crop_baseline_boxes(train_boxes: np.ndarray, train_dims: np.ndarray,
                        train_stages: np.ndarray, test_dims: np.ndarray,
                        test_stages: np.ndarray) -> dict[str, np.ndarray]:
    """Per test crop, every crop baseline's box (all fitted on the train side only)."""
    n = len(test_dims)
    mean = _box(_cxcys(train_boxes).mean(axis=0))[0] if len(train_boxes) else \
        np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    return {
        "full_frame": np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], np.float32), (n, 1)),
        "mean_box": np.tile(mean, (n, 1)),
        "median_box": np.tile(median_box(train_boxes), (n, 1)),
        "best_constant_box": np.tile(best_constant_box(train_boxes), (n, 1)),
        "dims_stage_prior": dims_stage_prior(train_boxes, train_dims, train_stages, test_dims,
                                             test_stages),
    }


def majority_action_hits(train_actions: Sequence[str], test_actions: Sequence[str]
                         ) -> tuple[str, np.ndarray]:
    """"Crop or approve": the majority action on train, and 0/1 per test group for it."""
    counts: dict[str, int] = {}
    for a in train_actions:
        counts[a] = counts.get(a, 0) + 1
    major = max(sorted(counts), key=lambda a: counts[a]) if counts else "approve"
    return major, np.asarray([a == major for a in test_actions], dtype=np.float64)
