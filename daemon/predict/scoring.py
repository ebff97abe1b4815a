"""The champion ranker and crop proposer applied to groups of cached vectors.

trainingd predicts with its *own* champion (``champions.json`` in the registry), as training
evaluated it: the residual ranker sees each image's rank in its group (position minus the top
position), and the crop net's raw output goes through :func:`project_box`, the guard trainingd
applies to its own boxes.  Scoring is batched over many groups at once (one forward pass per
batch of images), so cached vectors cost no more than a matrix product per group.
Imports torch: import this module only inside functions that predict.
"""

from __future__ import annotations

from collections.abc import Sequence
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
class GroupInput:
    """One group to score: its vectors (``None`` where an image has none), sizes and stages."""

    vectors: Sequence[np.ndarray | None]
    dims: Sequence[tuple[int, int] | None]
    stages: Sequence[float | None]


@dataclass(frozen=True)
class GroupScore:
    index: int
    confidence: float
    box: tuple[float, float, float, float] | None


@torch.inference_mode()
def score_groups(champs: Champions, groups: Sequence[GroupInput]) -> list[GroupScore | None]:
    """The pick (index into the whole group), its softmax confidence over the images that have
    vectors, and the crop box of the pick; None for a group with no vector at all."""
    rows: list[np.ndarray] = []
    ranks: list[float] = []
    owner: list[int] = []
    position: list[int] = []
    for g, grp in enumerate(groups):
        top = len(grp.vectors) - 1
        for i, v in enumerate(grp.vectors):
            if v is not None:
                rows.append(v)
                ranks.append(float(i - top))
                owner.append(g)
                position.append(i)
    out: list[GroupScore | None] = [None] * len(groups)
    if not rows:
        return out
    x = torch.from_numpy(np.stack(rows).astype(np.float32, copy=False)).to(champs.device)
    r = torch.tensor(ranks, dtype=torch.float32, device=champs.device)
    model = champs.ranker
    scores = (model(x, r) if isinstance(model, ResidualRanker) else model(x)).float().cpu()
    own = np.asarray(owner)
    starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
    ends = np.r_[starts[1:], len(own)]
    picks: list[tuple[int, int]] = []  # (group, row)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        seg = scores[s:e]
        best = int(torch.argmax(seg))
        conf = float(torch.softmax(seg, dim=0)[best])
        g = int(own[s])
        out[g] = GroupScore(position[s + best], conf, None)
        picks.append((g, s + best))
    if champs.crop is not None:
        _add_boxes(champs, groups, out, picks, x)
    return out


def _add_boxes(champs: Champions, groups: Sequence[GroupInput], out: list[GroupScore | None],
               picks: list[tuple[int, int]], x: torch.Tensor) -> None:
    assert champs.crop is not None
    usable = []
    extra: list[list[float]] = []
    for g, row in picks:
        score = out[g]
        assert score is not None
        dims = groups[g].dims[score.index]
        if dims is None or dims[0] <= 0 or dims[1] <= 0:
            continue  # no size known: the reviewer's input cannot be built
        feats = [dims[0] / DIM_SCALE, dims[1] / DIM_SCALE]
        if champs.crop_use_stage:
            stage = groups[g].stages[score.index]
            feats.append((stage or 0.0) / MAX_STAGE)
        usable.append((g, row))
        extra.append(feats)
    if not usable:
        return
    idx = torch.tensor([row for _, row in usable], device=champs.device)
    feats_t = torch.tensor(extra, dtype=torch.float32, device=champs.device)
    raw = champs.crop(torch.cat([x[idx], feats_t], dim=1)).float().cpu()
    boxes = project_box(raw).numpy()
    for (g, _), box in zip(usable, boxes, strict=True):
        score = out[g]
        assert score is not None
        out[g] = GroupScore(score.index, score.confidence,
                            tuple(round(float(v), 6) for v in box))  # type: ignore[arg-type]
