"""Training loops: the residual ranker, the reviewer's scorer, the crop proposer.  Readable top
to bottom.

Rankers see whole groups: softmax over the group's image scores, cross-entropy on the person's
pick, anomaly groups (pick below the highest stage) weighted by ``anomaly_weight``.  The
residual ranker adds its scores to the stage prior (see :mod:`daemon.training.models`), so it
keeps the highest-stage rule's easy wins and overrides it only where the embedding says so; the
plain scorer is what the reviewer can load.  The crop proposer's raw output is trained to be the
box itself (L1 to the final box plus :func:`box_shape_penalty`), because the raw output is what
the reviewer reads; the projected box is trained too, as the guard trainingd applies.

With a ``validation`` side the epoch whose weights score best there (top-1, or the raw boxes'
mean IoU) is kept and reported as ``best_epoch``; the test side is never looked at here.
``should_stop`` is polled every batch: a stop request ends the run within one batch, without a
model.  Imports torch at module level: import inside functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from daemon.errors import TrainingError
from daemon.settings import TrainingSettings
from daemon.training.dataset import DIM_SCALE, MAX_STAGE, CropData, RankerData
from daemon.training.models import (
    CropNet,
    ResidualRanker,
    box_shape_penalty,
    build,
    project_box,
)

MAX_GROUP = 4
Progress = Callable[[dict[str, Any]], None]


class TrainingStopped(TrainingError):
    """A stop was requested (shutdown); no model was produced."""


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _padded_index(data: RankerData) -> tuple[np.ndarray, np.ndarray]:
    """``(groups, 4)`` image rows (the extra zero row where a group is shorter) and its mask."""
    sizes = data.sizes
    pos = np.arange(MAX_GROUP)[None, :]
    mask = pos < sizes[:, None]
    idx = np.where(mask, data.offsets[:-1, None] + pos, len(data.vectors))
    return idx.astype(np.int64), mask


def _batch_rows(offsets: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """The image rows of ``groups`` (no padding) and each row's (group slot, position)."""
    sizes = offsets[groups + 1] - offsets[groups]
    slot = np.repeat(np.arange(len(groups)), sizes)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    within = np.arange(int(sizes.sum())) - first
    return offsets[groups][slot] + within, slot, within


def _scores(model: nn.Module, x: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per-image scores; only the residual ranker looks at the image's rank in its group."""
    out: torch.Tensor = model(x, rank) if isinstance(model, ResidualRanker) else model(x)
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_ranker(train: RankerData, hp: TrainingSettings, *, validation: RankerData | None = None,
               design: str = "residual", should_stop: Callable[[], bool] = lambda: False,
               progress: Progress | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a ranker on whole groups (only real images are scored: no padding).

    ``design``: ``residual`` (stage prior + correction, trainingd's own) or ``scorer`` (the
    reviewer's 512-input layout, embedding only)."""
    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    dim = train.vectors.shape[1]
    model = build("ranker", dim, hp.dropout, design).to(device)
    vectors = torch.from_numpy(train.vectors).to(device)
    picks = torch.from_numpy(train.picks).to(device)
    anomaly = train.picks != (train.sizes - 1)
    weights = torch.from_numpy(np.where(anomaly, hp.anomaly_weight, 1.0).astype(np.float32))
    weights = weights.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    rng = np.random.default_rng(hp.seed)
    losses: list[float] = []
    val_top1: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(hp.epochs):
        model.train()
        order = rng.permutation(train.groups)
        total, seen = 0.0, 0
        for start in range(0, train.groups, hp.batch_size):
            if should_stop():
                raise TrainingStopped(f"stopped in epoch {epoch + 1}")
            groups = order[start:start + hp.batch_size]
            rows, slot, within = _batch_rows(train.offsets, groups)
            rank = within - (train.sizes[groups][slot] - 1)
            flat = _scores(model, vectors[torch.from_numpy(rows).to(device)],
                           torch.from_numpy(rank.astype(np.float32)).to(device))
            scores = torch.full((len(groups), MAX_GROUP), float("-inf"), device=device)
            scores = scores.index_put((torch.from_numpy(slot).to(device),
                                       torch.from_numpy(within).to(device)), flat)
            b = torch.from_numpy(groups).to(device)
            loss_each = nn.functional.cross_entropy(scores, picks[b], reduction="none")
            loss = (loss_each * weights[b]).sum() / weights[b].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(groups)
            seen += len(groups)
        losses.append(total / max(seen, 1))
        event: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "loss": losses[-1]}
        if validation is not None and validation.groups:
            top1 = float((predict_ranker(model, validation, device) == validation.picks).mean())
            val_top1.append(top1)
            event["validation_top1"] = top1
            if best is None or top1 > best[0]:  # ties keep the earlier, simpler epoch
                best = (top1, epoch + 1, _snapshot(model))
        if progress is not None:
            progress(event)
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    history = {
        "design": design, "epochs": hp.epochs,
        "best_epoch": best[1] if best is not None else hp.epochs,
        "selected_by": "validation top-1" if best is not None else "last epoch (no validation)",
        "validation_top1": val_top1, "final_train_loss": losses[-1] if losses else None,
        "loss": "listwise softmax cross-entropy on the pick, anomaly-weighted"
                + (", added to the stage prior" if design == "residual" else "")}
    return model.cpu(), history


@torch.no_grad()
def predict_ranker(model: nn.Module, data: RankerData,
                   device: torch.device | None = None) -> np.ndarray:
    """The argmax image of every group, as the model will be used: the residual ranker with
    each image's rank, a plain scorer from the vectors alone (as the reviewer does)."""
    if data.groups == 0:
        return np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    dim = data.vectors.shape[1]
    vectors = torch.from_numpy(np.concatenate([data.vectors, np.zeros((1, dim), np.float32)]))
    idx_np, mask_np = _padded_index(data)
    rank_np = (np.arange(MAX_GROUP)[None, :] - (data.sizes[:, None] - 1)).astype(np.float32)
    out = []
    for start in range(0, data.groups, 4096):
        sl = slice(start, start + 4096)
        scores = _scores(model, vectors[torch.from_numpy(idx_np[sl])].to(dev),
                         torch.from_numpy(rank_np[sl]).to(dev)).cpu()
        scores = scores.masked_fill(~torch.from_numpy(mask_np[sl]), float("-inf"))
        out.append(scores.argmax(dim=1).numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.int64)


def crop_features(data: CropData, use_stage: bool) -> np.ndarray:
    """Embedding + ``[w/2048, h/2048]`` (+ stage/3, 0 where unknown), as the reviewer feeds."""
    parts = [data.vectors.reshape(data.size, -1), data.dims / DIM_SCALE]
    if use_stage:
        stage = np.nan_to_num(data.stages, nan=0.0) / MAX_STAGE
        parts.append(stage.reshape(-1, 1))
    return np.concatenate(parts, axis=1).astype(np.float32)


SHAPE_WEIGHT = 10.0  # the raw output must itself be an aspect-keeping box: the reviewer reads it


def fit_crop(train: CropData, hp: TrainingSettings, *, use_stage: bool,
             validation: CropData | None = None,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Progress | None = None) -> tuple[CropNet, dict[str, Any]]:
    """Train the box regressor so that its raw output is the box (the reviewer's view)."""
    from daemon.training.metrics import box_iou

    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    x = torch.from_numpy(crop_features(train, use_stage)).to(device)
    y = torch.from_numpy(train.boxes).to(device)
    model = CropNet(x.shape[1], hp.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    gen = torch.Generator().manual_seed(hp.seed)
    losses: list[float] = []
    val_iou: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(hp.crop_epochs):
        model.train()
        # the shape term grows over the run: a strong one from the start pins the boxes to the
        # square the untrained net outputs before they learn where to go
        shape = SHAPE_WEIGHT * min(1.0, (epoch + 1) / max(1, hp.crop_epochs // 2))
        order = torch.randperm(train.size, generator=gen).to(device)
        total, seen = 0.0, 0
        for start in range(0, train.size, hp.batch_size):
            if should_stop():
                raise TrainingStopped(f"stopped in epoch {epoch + 1}")
            b = order[start:start + hp.batch_size]
            raw = model(x[b])
            loss = ((raw - y[b]).abs().mean() + shape * box_shape_penalty(raw).mean()
                    + 0.5 * (project_box(raw) - y[b]).abs().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        losses.append(total / max(seen, 1))
        event: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "loss": losses[-1]}
        if validation is not None and validation.size:
            iou = float(box_iou(predict_crop_raw(model, validation, use_stage, device),
                                validation.boxes).mean())
            val_iou.append(iou)
            event["validation_raw_mean_iou"] = iou
            # only epochs trained under the full shape term: the box the reviewer reads
            if shape >= SHAPE_WEIGHT and (best is None or iou > best[0]):
                best = (iou, epoch + 1, _snapshot(model))
        if progress is not None:
            progress(event)
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    return model.cpu(), {
        "epochs": hp.crop_epochs, "best_epoch": best[1] if best is not None else hp.crop_epochs,
        "selected_by": "validation mean IoU of the raw output" if best is not None
        else "last epoch (no validation)",
        "validation_raw_mean_iou": val_iou,
        "final_train_loss": losses[-1] if losses else None,
        "loss": f"L1 of the raw output + (0 -> {SHAPE_WEIGHT} over the first half) * box "
                "shape penalty (unequal sides, corner order) + 0.5 * L1 of the projected box"}


@torch.no_grad()
def predict_crop_raw(model: nn.Module, data: CropData, use_stage: bool,
                     device: torch.device | None = None) -> np.ndarray:
    """The network's raw boxes: exactly what the reviewer reads."""
    if data.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    was_training = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    raw = model(torch.from_numpy(crop_features(data, use_stage)).to(dev)).cpu()
    model.train(was_training)
    out: np.ndarray = raw.numpy().astype(np.float32)
    return out


def predict_crop(model: nn.Module, data: CropData, use_stage: bool) -> np.ndarray:
    """Valid, aspect-keeping boxes for every example (the raw output through the guard)."""
    raw = predict_crop_raw(model, data, use_stage)
    if len(raw) == 0:
        return raw
    out: np.ndarray = project_box(torch.from_numpy(raw)).numpy().astype(np.float32)
    return out


def mean_box(boxes: np.ndarray) -> np.ndarray:
    """The mean training box, made aspect-keeping like every prediction."""
    if len(boxes) == 0:
        return np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    m = torch.from_numpy(boxes.mean(axis=0, keepdims=True).astype(np.float32))
    out: np.ndarray = project_box(m).numpy()[0]
    return out

