"""The two networks, in exactly the layouts the reviewer loads (data contract section 6).

Ranker: a per-image scorer ``net = Linear(d,256) ReLU Dropout Linear(256,64) ReLU Linear(64,1)``
(keys ``net.0``, ``net.3``, ``net.5``).  Crop proposer: ``Linear(in,512) ReLU Dropout
Linear(512,256) ReLU Dropout Linear(256,128) ReLU Linear(128,4) Sigmoid`` (keys ``net.0``,
``net.3``, ``net.6``, ``net.8``) whose raw output is a box; trainingd projects it onto the nearest
valid box that keeps the image's aspect ratio (:func:`project_box`) and trains through that
projection, so the raw output the reviewer reads is a near-valid box as well.
Imports torch at module level: import this module only inside functions that train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MIN_SIDE = 0.02


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


def architecture(kind: str, in_features: int, dropout: float) -> dict[str, Any]:
    """How the metadata describes a network (enough to rebuild it)."""
    if kind == "ranker":
        layers = f"Linear({in_features},256) ReLU Dropout({dropout}) Linear(256,64) ReLU " \
                 "Linear(64,1)"
    else:
        layers = f"Linear({in_features},512) ReLU Dropout({dropout}) Linear(512,256) ReLU " \
                 f"Dropout({dropout}) Linear(256,128) ReLU Linear(128,4) Sigmoid"
    return {"class": "Scorer" if kind == "ranker" else "CropNet", "in_features": in_features,
            "dropout": dropout, "layers": layers}


def build(kind: str, in_features: int, dropout: float) -> nn.Module:
    return Scorer(in_features, dropout) if kind == "ranker" else CropNet(in_features, dropout)
