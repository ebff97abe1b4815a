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
mean IoU) is kept and reported as ``best_epoch``; the test side is never looked at here.  A
ranker stops early once ``PATIENCE`` epochs in a row have neither raised validation top-1 nor
lowered validation cross-entropy by more than the figure's standard error (the kept weights
are then decided; more epochs only cost time: the bench's 20k groups ran all 15 epochs of both
designs on a flat validation curve).  The crop net
runs all its epochs: its shape term needs them (see :func:`refit_head`).  Optimiser steps use
the fused AdamW kernel where torch has one (same update, one kernel instead of a dozen per
parameter).
``should_stop`` is polled every batch: a stop request ends the run within one batch, without a
model.  Imports torch at module level: import inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


#: epochs in a row without a validation gain beyond noise after which the ranker stops
PATIENCE = 5


def _optimizer(model: nn.Module, hp: TrainingSettings) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where this torch and device support it."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                 fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


def _gain(figures: tuple[float, float, float], ref: tuple[float, float, float] | None,
          n: int) -> bool:
    """Whether validation top-1 rose, or its cross-entropy fell, by more than the figure's
    standard error on ``n`` groups since ``ref``: a few groups flipping is noise, but a loss
    still falling means the correction is still learning before any argmax has moved."""
    if ref is None:
        return True
    top1_se = math.sqrt(max(ref[0] * (1 - ref[0]), 1 / max(n, 1)) / max(n, 1))
    return figures[0] > ref[0] + top1_se or figures[1] < ref[1] - ref[2]


@dataclass(frozen=True)
class FitHistory:
    """How one fit went, as the metadata's ``training`` records it: epochs run, the epoch kept
    and why, the validation curve (``validation_key`` names it), the last loss, the loss."""

    epochs: int
    epochs_run: int
    best_epoch: int
    selected_by: str
    validation_key: str
    validation: list[float]
    final_train_loss: float | None
    loss: str
    design: str | None = None  # rankers only (residual or scorer)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.design is None else {"design": self.design}
        out.update({"epochs": self.epochs, "epochs_run": self.epochs_run,
                    "best_epoch": self.best_epoch, "selected_by": self.selected_by,
                    self.validation_key: self.validation,
                    "final_train_loss": self.final_train_loss, "loss": self.loss})
        return out


def fit_ranker(train: RankerData, hp: TrainingSettings, *, validation: RankerData | None = None,
               design: str = "residual", should_stop: Callable[[], bool] = lambda: False,
               progress: Progress | None = None) -> tuple[nn.Module, FitHistory]:
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
    opt = _optimizer(model, hp)
    rng = np.random.default_rng(hp.seed)
    losses: list[float] = []
    val_top1: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    ref: tuple[float, float, float] | None = None  # validation figures at the last real gain
    last_gain = 0
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
            figures = _validation_figures(model, validation, device)
            top1 = figures[0]
            val_top1.append(top1)
            event["validation_top1"] = top1
            if best is None or top1 > best[0]:  # ties keep the earlier, simpler epoch
                best = (top1, epoch + 1, _snapshot(model))
            if _gain(figures, ref, validation.groups):
                ref, last_gain = figures, epoch + 1
        if progress is not None:
            progress(event)
        if best is not None and epoch + 1 - last_gain >= PATIENCE:
            break
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    history = FitHistory(
        design=design, epochs=hp.epochs, epochs_run=len(losses),
        best_epoch=best[1] if best is not None else hp.epochs,
        selected_by="validation top-1" if best is not None else "last epoch (no validation)",
        validation_key="validation_top1", validation=val_top1,
        final_train_loss=losses[-1] if losses else None,
        loss="listwise softmax cross-entropy on the pick, anomaly-weighted"
             + (", added to the stage prior" if design == "residual" else ""))
    return model.cpu(), history


@torch.no_grad()
def predict_ranker(model: nn.Module, data: RankerData,
                   device: torch.device | None = None) -> np.ndarray:
    """The argmax image of every group, as the model will be used: the residual ranker with
    each image's rank, a plain scorer from the vectors alone (as the reviewer does)."""
    if data.groups == 0:
        return np.zeros(0, dtype=np.int64)
    out: np.ndarray = group_scores(model, data, device).argmax(dim=1).numpy().astype(np.int64)
    return out


@torch.no_grad()
def group_scores(model: nn.Module, data: RankerData,
                 device: torch.device | None = None) -> torch.Tensor:
    """``(groups, 4)`` scores as the model is used, ``-inf`` past each group's end."""
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
        out.append(scores.masked_fill(~torch.from_numpy(mask_np[sl]), float("-inf")))
    model.train(was_training)
    return torch.cat(out)


def _validation_figures(model: nn.Module, data: RankerData, device: torch.device
                        ) -> tuple[float, float, float]:
    """Validation top-1, mean cross-entropy on the pick, and that mean's standard error."""
    scores = group_scores(model, data, device)
    picks = torch.from_numpy(data.picks)
    top1 = float((scores.argmax(dim=1) == picks).float().mean())
    loss = nn.functional.cross_entropy(scores, picks, reduction="none").double()
    se = float(loss.std() / math.sqrt(len(loss))) if len(loss) > 1 else 0.0
    return top1, float(loss.mean()), se


def crop_features(data: CropData, use_stage: bool) -> np.ndarray:
    """Embedding + ``[w/2048, h/2048]`` (+ stage/3, 0 where unknown), as the reviewer feeds."""
    parts = [data.vectors.reshape(data.size, -1), data.dims / DIM_SCALE]
    if use_stage:
        stage = np.nan_to_num(data.stages, nan=0.0) / MAX_STAGE
        parts.append(stage.reshape(-1, 1))
    return np.concatenate(parts, axis=1).astype(np.float32)


SHAPE_WEIGHT = 10.0  # the raw output must itself be an aspect-keeping box: the reviewer reads it
HEAD_REFITS = 3  # rounds of the closed-form refit of the last layer onto the guarded boxes
POLISH_STEPS = 300  # full-batch steps on the last layer after the refit
POLISH_LR = 1e-3
HEAD_RIDGE = 1e-3  # per example: how strongly the refit stays near the trained last layer


@torch.no_grad()
def refit_head(model: CropNet, x: torch.Tensor) -> None:
    """Make the raw output land on the guarded box: refit the last ``Linear(128, 4)`` by ridge
    least squares (towards its trained weights) so its logits match the logits of the projected
    box, a few rounds.  The penalty leaves the raw boxes near a square but not within 1%; the
    projection is what trainingd would use anyway, and the layer is linear in the frozen
    features, so this moves the raw output onto it without touching the rest of the network (the
    reviewer's layout and keys are unchanged)."""
    was_training = model.training
    model.eval()
    head = model.net[8]
    assert isinstance(head, nn.Linear)
    feats = model.net[:8](x).double()
    a = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1)
    lam = HEAD_RIDGE * len(a)
    gram = a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    for _ in range(HEAD_REFITS):
        theta0 = torch.cat([head.weight.T, head.bias[None, :]], 0).double()
        target = torch.logit(project_box(torch.sigmoid(head(feats.float()))).double(), eps=1e-6)
        theta = torch.linalg.solve(gram, a.T @ target + lam * theta0)
        head.weight.copy_(theta[:-1].T.float())
        head.bias.copy_(theta[-1].float())
    _polish_head(head, feats.float())
    model.train(was_training)


def _polish_head(head: nn.Linear, feats: torch.Tensor) -> None:
    """The least-squares refit is an average: a few boxes stay outside the tolerance.  A short
    full-batch descent on the last layer alone drives the aspect error itself (log of the side
    ratio, beyond half the 1% tolerance) to zero while staying on the refit's guarded boxes."""
    with torch.no_grad():
        target = project_box(torch.sigmoid(head(feats)))
    opt = torch.optim.Adam(head.parameters(), lr=POLISH_LR)
    with torch.enable_grad():
        for _ in range(POLISH_STEPS):
            raw = torch.sigmoid(head(feats))
            w = (raw[:, 2] - raw[:, 0]).clamp_min(1e-4)
            h = (raw[:, 3] - raw[:, 1]).clamp_min(1e-4)
            excess = torch.relu((w / h).log().abs() - 0.005)
            loss = 100 * excess.mean() + (raw - target).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()


def fit_crop(train: CropData, hp: TrainingSettings, *, use_stage: bool,
             validation: CropData | None = None,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Progress | None = None) -> tuple[CropNet, FitHistory]:
    """Train the box regressor so that its raw output is the box (the reviewer's view)."""
    from daemon.training.metrics import box_iou

    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    x = torch.from_numpy(crop_features(train, use_stage)).to(device)
    y = torch.from_numpy(train.boxes).to(device)
    model = CropNet(x.shape[1], hp.dropout).to(device)
    opt = _optimizer(model, hp)
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
    refit_head(model, x)
    model.eval()
    return model.cpu(), FitHistory(
        epochs=hp.crop_epochs, epochs_run=len(losses),
        best_epoch=best[1] if best is not None else hp.crop_epochs,
        selected_by="validation mean IoU of the raw output" if best is not None
        else "last epoch (no validation)",
        validation_key="validation_raw_mean_iou", validation=val_iou,
        final_train_loss=losses[-1] if losses else None,
        loss=f"L1 of the raw output + (0 -> {SHAPE_WEIGHT} over the first half) * box "
             "shape penalty (unequal sides, corner order) + 0.5 * L1 of the projected box")


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

