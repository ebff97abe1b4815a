"""The champion ranker and crop proposer applied to groups of cached vectors.

trainingd predicts with its *own* champion (``champions.json`` in the registry), as training
evaluated it: the residual ranker sees each image's rank in its group (position minus the top
position), and the crop net's raw output goes through :func:`project_box`, the guard trainingd
applies to its own boxes.  Scoring is batched over many groups at once: one forward pass of
the ranker over every image of the batch, the per-group argmax and softmax as numpy segment
reductions, one pass of the crop net over the picks (no Python loop per group).
Imports torch: import this module only inside functions that predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.training import registry
from daemon.training.dataset import DIM_SCALE, MAX_STAGE
from daemon.training.fit import pick_device
from daemon.training.models import ResidualRanker, build, project_box


class NoChampion(Exception):
    """No usable champion: the reason says what is missing; nothing is predicted."""


@dataclass(frozen=True)
class Champions:
    """The loaded champion models and what they need."""

    ranker: torch.nn.Module
    ranker_version: int
    crop: torch.nn.Module | None
    crop_version: int | None
    crop_use_stage: bool
    embedder_id: str
    dim: int
    device: torch.device
    crop_note: str = ""


def _load(models_dir: Path, kind: str, version: int, meta: dict[str, Any]) -> torch.nn.Module:
    arch = meta.get("architecture") or {}
    model = build(kind, int(arch["in_features"]), float(arch.get("dropout", 0.0)),
                  str(arch.get("design", "scorer")))
    model.load_state_dict(registry.load_state(registry.model_path(models_dir, kind, version)))
    model.eval()
    return model


def load_champions(models_dir: Path, embedder_id: str, device: str = "auto") -> Champions:
    """The champions made from ``embedder_id``'s vectors; NoChampion when there is no ranker
    champion (or it needs other vectors).  A crop champion that cannot be used leaves crops
    empty (``crop_note`` says why); the picks are still made."""
    version = registry.champion_version(models_dir, "ranker")
    if version is None:
        raise NoChampion("no ranker champion yet: train one (`trainingd train ranker`)")
    meta = registry.read_metadata(models_dir, "ranker", version)
    if meta is None:
        raise NoChampion(f"ranker champion v{version} has no readable metadata")
    if meta.get("embedder_id") != embedder_id:
        raise NoChampion(f"ranker champion v{version} was trained on embedder "
                         f"{meta.get('embedder_id')!r}, the cache holds {embedder_id!r}")
    dev = pick_device(device)
    try:
        ranker = _load(models_dir, "ranker", version, meta).to(dev)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise NoChampion(f"ranker champion v{version} cannot be loaded: {exc}") from exc
    dim = int(meta["architecture"]["in_features"])
    crop, crop_version, use_stage, note = None, registry.champion_version(models_dir, "crop"), \
        False, ""
    cmeta = registry.read_metadata(models_dir, "crop", crop_version) if crop_version else None
    if crop_version is None:
        note = "no crop champion yet"
    elif cmeta is None or cmeta.get("embedder_id") != embedder_id:
        note = f"crop champion v{crop_version} used other vectors or has no metadata"
    else:
        use_stage = bool((cmeta.get("hyperparameters") or {}).get("crop_use_stage", False))
        try:
            crop = _load(models_dir, "crop", crop_version, cmeta).to(dev)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            note = f"crop champion v{crop_version} cannot be loaded: {exc}"
    if crop is None:
        crop_version = None
    return Champions(ranker, version, crop, crop_version, use_stage, embedder_id, dim, dev,
                     note)


@dataclass(frozen=True)
class Rows:
    """The images of a batch of groups that have a vector, group by group (``group`` never
    decreases): what one forward pass of each champion scores."""

    x: np.ndarray          # (n, dim) float32 vectors
    group: np.ndarray      # (n,) int64: which group of the batch
    position: np.ndarray   # (n,) int64: index of the image in its whole group
    rank: np.ndarray       # (n,) float32: position minus the group's top position
    width: np.ndarray      # (n,) float64 pixels, 0 when unknown
    height: np.ndarray     # (n,) float64 pixels, 0 when unknown
    stage: np.ndarray      # (n,) float64, 0 when unknown


@dataclass(frozen=True)
class Scores:
    """Per group of the batch: the pick (index into the whole group, -1 for a group with no
    vector at all), its softmax confidence over the images that have vectors, and the crop box
    of the pick (a row of NaN where there is none)."""

    index: np.ndarray       # (groups,) int64
    confidence: np.ndarray  # (groups,) float64
    box: np.ndarray         # (groups, 4) float64


@torch.inference_mode()
def score_rows(champs: Champions, rows: Rows, groups: int) -> Scores:
    """One ranker pass over every row, the per-group argmax and softmax as segment reductions
    (no Python loop per group), one crop pass over the picks."""
    index = np.full(groups, -1, dtype=np.int64)
    confidence = np.full(groups, np.nan)
    box = np.full((groups, 4), np.nan)
    n = len(rows.group)
    if n == 0:
        return Scores(index, confidence, box)
    x = torch.from_numpy(np.ascontiguousarray(rows.x, dtype=np.float32)).to(champs.device)
    model = champs.ranker
    if isinstance(model, ResidualRanker):
        rank = torch.from_numpy(np.asarray(rows.rank, dtype=np.float32)).to(champs.device)
        out = model(x, rank)
    else:
        out = model(x)
    scores = out.float().cpu().numpy().astype(np.float64)
    starts = np.flatnonzero(np.r_[True, rows.group[1:] != rows.group[:-1]])
    sizes = np.diff(np.r_[starts, n])
    top = np.repeat(np.maximum.reduceat(scores, starts), sizes)
    # the first row holding its group's maximum (torch.argmax's choice among equals)
    best = np.minimum.reduceat(np.where(scores == top, np.arange(n), n), starts)
    best = np.where(best < n, best, starts)  # a NaN score: the group's first image
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduceat(np.exp(scores - top), starts)
    owners = rows.group[starts]
    index[owners] = rows.position[best]
    confidence[owners] = np.exp(scores[best] - top[best]) / total
    if champs.crop is not None:
        box[owners] = _boxes(champs, rows, best)
    return Scores(index, confidence, box)


def _boxes(champs: Champions, rows: Rows, picks: np.ndarray) -> np.ndarray:
    """The crop box of each picked row (NaN where its size is unknown: the reviewer's input
    cannot be built), one forward pass."""
    assert champs.crop is not None
    out = np.full((len(picks), 4), np.nan)
    w, h = rows.width[picks], rows.height[picks]
    usable = np.flatnonzero((w > 0) & (h > 0))
    if len(usable) == 0:
        return out
    sel = picks[usable]
    dim = rows.x.shape[1]
    feats = np.empty((len(sel), dim + 2 + int(champs.crop_use_stage)), dtype=np.float32)
    feats[:, :dim] = rows.x[sel]
    feats[:, dim] = w[usable] / DIM_SCALE
    feats[:, dim + 1] = h[usable] / DIM_SCALE
    if champs.crop_use_stage:
        feats[:, dim + 2] = rows.stage[sel] / MAX_STAGE
    raw = champs.crop(torch.from_numpy(feats).to(champs.device)).float().cpu()
    out[usable] = project_box(raw).numpy()
    return out
