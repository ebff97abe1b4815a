"""Shared pieces of the training tests (no tests here): a real tiny open_clip model with random
weights run on real PIL images behind the ``VectorSource`` seam, and planted-signal projects."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.demo.sample import STAGE_NAMES

TINY = "tiny-test-vit"
TINY_CFG: dict[str, Any] = {
    "embed_dim": 512,  # the reviewer's width, so the reviewer-format export is exercised
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1},
}


class TinyClip:
    """A real open_clip model from a tiny registered config, random weights, fixed seed."""

    def __init__(self, seed: int = 0) -> None:
        import open_clip
        import torch
        from open_clip import factory

        factory._MODEL_CONFIGS[TINY] = TINY_CFG
        torch.manual_seed(seed)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            TINY, pretrained=None)
        self.model.eval()

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.stack([self.preprocess(im) for im in images])
            e = self.model.encode_image(x)
            e = e / e.norm(dim=-1, keepdim=True)
        out: np.ndarray = e.numpy().astype(np.float32)
        return out


def tinted_image(rng: np.random.Generator, good: bool) -> Any:
    """Noise with a green (good) or red (bad) cast: a property the random embedder can see."""
    from PIL import Image

    a = rng.integers(0, 90, (40, 40, 3)).astype(np.uint8)
    a[..., 1 if good else 0] += 140
    return Image.fromarray(a)


class MemorySource:
    """An in-memory ``VectorSource``: ``(project, file_name) -> vector``."""

    def __init__(self, embedder_id: str = "tiny-test-vit/random-seed0") -> None:
        self._id = embedder_id
        self.vectors: dict[tuple[str, str], np.ndarray] = {}

    @property
    def embedder_id(self) -> str:
        return self._id

    def vectors_for(self, project: str, file_names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: self.vectors[(project, n)] for n in file_names
                if (project, n) in self.vectors}


class HashSource:
    """Random but stable 512-d vectors for any file name (for child processes)."""

    embedder_id = "hash-512"

    def vectors_for(self, project: str, file_names: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for n in file_names:
            seed = int.from_bytes(hashlib.sha256(f"{project}/{n}".encode()).digest()[:4], "big")
            v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
            out[n] = v / np.linalg.norm(v)
        return out


def hash_source(settings: Any, store: Any) -> HashSource:
    """The factory a training child imports (``tests.test_training_helpers:hash_source``)."""
    return HashSource()


def plant_groups(db: Any, source: MemorySource, clip: TinyClip, groups: int, *,
                 anomaly_share: float = 0.4, seed: int = 3, pool: int = 24,
                 action: str | None = None) -> list[dict[str, Any]]:
    """Insert ``groups`` rows whose pick is the green image, often not the highest stage."""
    rng = np.random.default_rng(seed)
    good = clip.embed([tinted_image(rng, True) for _ in range(pool)])
    bad = clip.embed([tinted_image(rng, False) for _ in range(pool)])
    rows = []
    for g in range(groups):
        count = int(rng.choice([2, 3, 4]))
        stages = sorted(rng.choice(4, size=count, replace=False).tolist())
        pick = int(rng.integers(0, count - 1)) if rng.random() < anomaly_share else count - 1
        names = [f"2025{g:04d}_{k:06d}_{STAGE_NAMES[s]}.png" for k, s in enumerate(stages)]
        for k, name in enumerate(names):
            vec = good[rng.integers(pool)] if k == pick else bad[rng.integers(pool)]
            # a fresh vector per image (pool vector + noise, cosine ~0.9 between two draws):
            # a reused vector would join every group that drew it into one unit (issue 12)
            vec = vec + 0.35 * rng.standard_normal(vec.shape).astype(np.float32) / np.sqrt(
                vec.size)
            source.vectors[(db.project, name)] = vec / np.linalg.norm(vec)
        changes: dict[str, Any] = {"images": json.dumps(names), "user_selected_index": pick,
                                   "ai_selected_index": count - 1,
                                   "selection_match": int(pick == count - 1)}
        if action == "approve":
            changes.update(user_action="approve", final_crop_coords=None, crop_timestamp=None,
                           crop_match=None)
        rows.append(db.insert(**changes))
    return rows
