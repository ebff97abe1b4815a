"""The networks: two in exactly the layouts the reviewer loads (data contract section 6), and
the residual ranker trainingd itself ranks with.

Ranker, reviewer layout: a per-image scorer ``net = Linear(d,256) ReLU Dropout Linear(256,64)
ReLU Linear(64,1)`` (keys ``net.0``, ``net.3``, ``net.5``); the reviewer takes the argmax over a
group's 512-d vectors and sees nothing else (no stage).  Residual ranker: the same ``net`` as a
*correction* added to the stage prior ``prior_scale * (position - top position)``, its last
layer zero at the start, so before training its argmax is exactly "the highest stage" and it
leaves the rule only where the embedding pays for it in the loss.  It needs the group's order,
so the reviewer cannot load it.

Crop proposer: ``Linear(in,512) ReLU Dropout Linear(512,256) ReLU Dropout Linear(256,128) ReLU
Linear(128,4) Sigmoid`` (keys ``net.0``, ``net.3``, ``net.6``, ``net.8``).  The reviewer reads its
raw output as the box, so the raw output is trained to be a valid, aspect-keeping box
(:func:`box_shape_penalty`); :func:`project_box` stays as the guard trainingd applies.
Imports torch at module level: import this module only inside functions that train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MIN_SIDE = 0.02
PRIOR_SCALE_INIT = 4.0  # softmax puts ~0.98 on the top stage of a pair before any training
DESIGNS = ("residual", "scorer")


class Scorer(nn.Module):
    """Scores one image from its embedding; a group's pick is the argmax."""

    def __init__(self, dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x).squeeze(-1)
        return out


class ResidualRanker(nn.Module):
    """Stage prior plus a learned correction: ``prior_scale * rank + net(x)``.

    ``rank`` is the image's position minus its group's top position (0 for the highest stage,
    -1 for the next, ...), so with ``net`` at zero the argmax is the highest-stage rule."""

    def __init__(self, dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = Scorer(dim, dropout).net
        self.prior_scale = nn.Parameter(torch.tensor(PRIOR_SCALE_INIT))
        last = self.net[5]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x).squeeze(-1)
        return out

    def forward(self, x: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        return self.prior_scale * rank + self.correction(x)


class CropNet(nn.Module):
    """Predicts ``[x1, y1, x2, y2]`` from embedding + ``[w/2048, h/2048]`` (+ stage)."""

    def __init__(self, in_features: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 512), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def project_box(raw: torch.Tensor) -> torch.Tensor:
    """The valid, aspect-keeping box nearest a raw ``(n, 4)`` prediction: same centre (shifted
    inside the frame), side = mean of the raw width and height."""
    cx = (raw[:, 0] + raw[:, 2]) / 2
    cy = (raw[:, 1] + raw[:, 3]) / 2
    side = (((raw[:, 2] - raw[:, 0]).abs() + (raw[:, 3] - raw[:, 1]).abs()) / 2)
    side = side.clamp(MIN_SIDE, 1.0)
    half = side / 2
    cx = torch.minimum(torch.maximum(cx, half), 1 - half)
    cy = torch.minimum(torch.maximum(cy, half), 1 - half)
    box = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)
    return box.clamp(0.0, 1.0)


def box_shape_penalty(raw: torch.Tensor) -> torch.Tensor:
    """Per-example distance of a raw ``(n, 4)`` output from a valid aspect-keeping box: unequal
    normalized sides, corners in the wrong order (or closer than ``MIN_SIDE``).  Zero exactly
    when the raw output is such a box (the Sigmoid already keeps it inside [0, 1])."""
    w = raw[:, 2] - raw[:, 0]
    h = raw[:, 3] - raw[:, 1]
    order = torch.relu(MIN_SIDE - w) + torch.relu(MIN_SIDE - h)
    return (w - h).abs() + order


def raw_box_figures(raw: torch.Tensor, projected: torch.Tensor, tolerance: float
                    ) -> dict[str, float | int | None]:
    """How the raw output (what the reviewer reads) compares with the guarded box."""
    n = int(raw.shape[0])
    if n == 0:
        return {"n": 0, "raw_valid": None, "raw_aspect_kept": None,
                "raw_differs_from_projected": None, "aspect_tolerance": tolerance}
    w = raw[:, 2] - raw[:, 0]
    h = raw[:, 3] - raw[:, 1]
    valid = (raw[:, 0] >= 0) & (raw[:, 1] >= 0) & (raw[:, 2] <= 1) & (raw[:, 3] <= 1) & \
        (w > 0) & (h > 0)
    ratio = torch.where(h > 0, w / h.clamp_min(1e-9), torch.full_like(w, float("inf")))
    kept = valid & ((ratio - 1).abs() <= tolerance)
    differs = ~kept | ((raw - projected).abs().amax(dim=1) > tolerance)
    return {"n": n, "raw_valid": float(valid.float().mean()),
            "raw_aspect_kept": float(kept.float().mean()),
            "raw_differs_from_projected": float(differs.float().mean()),
            "aspect_tolerance": tolerance}


def architecture(kind: str, in_features: int, dropout: float, design: str = "scorer"
                 ) -> dict[str, Any]:
    """How the metadata describes a network (enough to rebuild it)."""
    if kind == "ranker":
        layers = f"Linear({in_features},256) ReLU Dropout({dropout}) Linear(256,64) ReLU " \
                 "Linear(64,1)"
        if design == "residual":
            layers = f"prior_scale * (position - top position) + [{layers}]"
        cls = "ResidualRanker" if design == "residual" else "Scorer"
        return {"class": cls, "design": design, "in_features": in_features,
                "dropout": dropout, "layers": layers,
                "reviewer_loadable": design == "scorer" and in_features == 512}
    layers = f"Linear({in_features},512) ReLU Dropout({dropout}) Linear(512,256) ReLU " \
             f"Dropout({dropout}) Linear(256,128) ReLU Linear(128,4) Sigmoid"
    return {"class": "CropNet", "in_features": in_features, "dropout": dropout,
            "layers": layers}


def build(kind: str, in_features: int, dropout: float, design: str = "scorer") -> nn.Module:
    if kind == "ranker":
        return ResidualRanker(in_features, dropout) if design == "residual" \
            else Scorer(in_features, dropout)
    return CropNet(in_features, dropout)
