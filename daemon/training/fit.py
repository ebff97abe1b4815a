"""Training loops: listwise ranker, aspect-keeping crop proposer.  Readable top to bottom.

The ranker sees whole groups: softmax over the group's image scores, cross-entropy on the
person's pick, anomaly groups (pick below the highest stage) weighted up.  The crop proposer is
trained through :func:`daemon.training.models.project_box` (L1 to the final box) plus an L1 on
its raw output.  ``should_stop`` is polled every batch: a stop request ends the run within one
batch, without a model.  Imports torch at module level: import inside functions.
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
from daemon.training.models import CropNet, Scorer, project_box

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


def fit_ranker(train: RankerData, hp: TrainingSettings, *,
               should_stop: Callable[[], bool] = lambda: False,
               progress: Progress | None = None) -> tuple[Scorer, dict[str, Any]]:
    """Train the per-image scorer on whole groups (only real images are scored: no padding)."""
    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    dim = train.vectors.shape[1]
    model = Scorer(dim, hp.dropout).to(device)
    vectors = torch.from_numpy(train.vectors).to(device)
    picks = torch.from_numpy(train.picks).to(device)
    anomaly = train.picks != (train.sizes - 1)
    weights = torch.from_numpy(np.where(anomaly, hp.anomaly_weight, 1.0).astype(np.float32))
    weights = weights.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    rng = np.random.default_rng(hp.seed)
    losses: list[float] = []
    for epoch in range(hp.epochs):
        model.train()
        order = rng.permutation(train.groups)
        total, seen = 0.0, 0
        for start in range(0, train.groups, hp.batch_size):
            if should_stop():
                raise TrainingStopped(f"stopped in epoch {epoch + 1}")
            groups = order[start:start + hp.batch_size]
            rows, slot, within = _batch_rows(train.offsets, groups)
            flat = model(vectors[torch.from_numpy(rows).to(device)])
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
        if progress is not None:
            progress({"event": "epoch", "epoch": epoch + 1, "loss": losses[-1]})
    model.eval()
    return model.cpu(), {"epochs": hp.epochs, "final_train_loss": losses[-1] if losses else None,
                         "loss": "listwise softmax cross-entropy on the pick, anomaly-weighted"}


@torch.no_grad()
def predict_ranker(model: nn.Module, data: RankerData) -> np.ndarray:
    """The argmax image of every group."""
    if data.groups == 0:
        return np.zeros(0, dtype=np.int64)
    model.eval()
    dim = data.vectors.shape[1]
    vectors = torch.from_numpy(np.concatenate([data.vectors, np.zeros((1, dim), np.float32)]))
    idx_np, mask_np = _padded_index(data)
    out = []
    for start in range(0, data.groups, 4096):
        sl = slice(start, start + 4096)
        scores = model(vectors[torch.from_numpy(idx_np[sl])])
        scores = scores.masked_fill(~torch.from_numpy(mask_np[sl]), float("-inf"))
        out.append(scores.argmax(dim=1).numpy())
    return np.concatenate(out).astype(np.int64)


def crop_features(data: CropData, use_stage: bool) -> np.ndarray:
    """Embedding + ``[w/2048, h/2048]`` (+ stage/3, 0 where unknown), as the reviewer feeds."""
    parts = [data.vectors.reshape(data.size, -1), data.dims / DIM_SCALE]
    if use_stage:
        stage = np.nan_to_num(data.stages, nan=0.0) / MAX_STAGE
        parts.append(stage.reshape(-1, 1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def fit_crop(train: CropData, hp: TrainingSettings, *, use_stage: bool,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Progress | None = None) -> tuple[CropNet, dict[str, Any]]:
    """Train the box regressor through the aspect-keeping projection."""
    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    x = torch.from_numpy(crop_features(train, use_stage)).to(device)
    y = torch.from_numpy(train.boxes).to(device)
    model = CropNet(x.shape[1], hp.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    gen = torch.Generator().manual_seed(hp.seed)
    losses: list[float] = []
    for epoch in range(hp.crop_epochs):
        model.train()
        order = torch.randperm(train.size, generator=gen).to(device)
        total, seen = 0.0, 0
        for start in range(0, train.size, hp.batch_size):
            if should_stop():
                raise TrainingStopped(f"stopped in epoch {epoch + 1}")
            b = order[start:start + hp.batch_size]
            raw = model(x[b])
            loss = (project_box(raw) - y[b]).abs().mean() + 0.5 * (raw - y[b]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        losses.append(total / max(seen, 1))
        if progress is not None:
            progress({"event": "epoch", "epoch": epoch + 1, "loss": losses[-1]})
    model.eval()
    return model.cpu(), {"epochs": hp.crop_epochs,
                         "final_train_loss": losses[-1] if losses else None,
                         "loss": "L1 of the projected box + 0.5 * L1 of the raw output"}


@torch.no_grad()
def predict_crop(model: nn.Module, data: CropData, use_stage: bool) -> np.ndarray:
    """Valid, aspect-keeping boxes for every example."""
    if data.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    model.eval()
    raw = model(torch.from_numpy(crop_features(data, use_stage)))
    out: np.ndarray = project_box(raw).numpy().astype(np.float32)
    return out


def mean_box(boxes: np.ndarray) -> np.ndarray:
    """The mean training box, made aspect-keeping like every prediction."""
    if len(boxes) == 0:
        return np.asarray([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    m = torch.from_numpy(boxes.mean(axis=0, keepdims=True).astype(np.float32))
    out: np.ndarray = project_box(m).numpy()[0]
    return out

