"""Crop panels: a few recent crop decisions drawn on their images, with the person's box and the
model's box, so a reader sees what the IoU numbers mean.

The model's box is the crop champion's prediction for that image, when the champion, the
image's vector and torch are all at hand; otherwise the box the reviewer's AI recorded in the
row (``ai_crop_coords``); otherwise none, and the panel says why.  Images are read only from
the image index's paths of files still present; a vanished image is skipped with a note
(reviewed images are deleted soon after review).  Nothing here raises out of the summary.
"""

from __future__ import annotations

import json
import math
from typing import Any

import structlog

from daemon.images import parse_stage
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.training import registry

log = structlog.get_logger("summary")


def _box(value: Any) -> list[float] | None:
    """A normalized ``[x1, y1, x2, y2]`` from a JSON text, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        box = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (x1, y1, x2, y2)) or x1 >= x2 \
            or y1 >= y2:
        return None
    return [x1, y1, x2, y2]


def _picked_name(example: dict[str, Any]) -> str | None:
    try:
        names = json.loads(example["images"]) if isinstance(example["images"], str) else None
    except (ValueError, RecursionError):
        return None
    idx = example.get("user_selected_index")
    if (isinstance(names, list) and isinstance(idx, int) and not isinstance(idx, bool)
            and 0 <= idx < len(names) and isinstance(names[idx], str)):
        return str(names[idx])
    return None


def crop_panels(settings: Settings, store: StateStore, examples: list[dict[str, Any]],
                vectors: VectorSource | None = None, shown: int = 4) -> list[dict[str, Any]]:
    """Up to ``shown`` recent crop decisions, those whose image is still on disk first: where
    the image is (or why it is not drawn), the person's box, the model's box and its source."""
    panels = []
    by_key = {(ex["project"], ex["group_id"]): ex for ex in examples}
    for ex in examples:
        name = _picked_name(ex)
        panel: dict[str, Any] = {
            "project": ex["project"], "group_id": ex["group_id"], "timestamp": ex["timestamp"],
            "file_name": name, "image_path": None, "human_box": _box(ex["final_crop_coords"]),
            "model_box": None, "model_box_from": None, "note": None}
        if name is None:
            panel["note"] = "the row names no picked image"
        else:
            path = store.images.latest_path(ex["project"], name)
            if path is None:
                panel["note"] = "image no longer on disk (deleted after review)"
            else:
                panel["image_path"] = path
        recorded = _box(ex.get("ai_crop_coords"))
        if recorded is not None:
            panel["model_box"], panel["model_box_from"] = recorded, "ai_crop_coords in the row"
        panels.append(panel)
    # draw the most recent examples whose image is still on disk; the rest only as notes
    drawn = [p for p in panels if p["image_path"]][:shown]
    skipped = [p for p in panels if not p["image_path"]]
    panels = (drawn + skipped)[:shown]
    examples = [by_key[(p["project"], p["group_id"])] for p in panels]
    _add_champion_boxes(settings, store, examples, panels, vectors)
    return panels


def _add_champion_boxes(settings: Settings, store: StateStore, examples: list[dict[str, Any]],
                        panels: list[dict[str, Any]], vectors: VectorSource | None) -> None:
    """The crop champion's box for each panel whose image has a vector (best effort)."""
    version = registry.champion_version(settings.models_dir, "crop")
    if version is None or not panels:
        return
    try:
        meta = registry.read_metadata(settings.models_dir, "crop", version) or {}
        if vectors is None:
            from daemon.embedding.lookup import CacheVectorSource

            vectors = CacheVectorSource(settings, store)
        if meta.get("embedder_id") != vectors.embedder_id:
            return
        import numpy as np

        from daemon.training.dataset import CropData
        from daemon.training.fit import predict_crop
        from daemon.training.models import build

        arch = meta.get("architecture", {})
        use_stage = bool(meta.get("hyperparameters", {}).get("crop_use_stage", False))
        model = build("crop", int(arch["in_features"]), float(arch.get("dropout", 0.0)))
        model.load_state_dict(registry.load_state(
            registry.model_path(settings.models_dir, "crop", version)))
        for ex, panel in zip(examples, panels, strict=True):
            name = panel["file_name"]
            w, h = ex.get("image_width"), ex.get("image_height")
            if name is None or not isinstance(w, int) or not isinstance(h, int):
                continue
            vec = vectors.vectors_for(ex["project"], [name]).get(name)
            if vec is None or vec.shape[-1] + 2 + int(use_stage) != int(arch["in_features"]):
                continue
            stage = parse_stage(name)
            data = CropData(vec.reshape(1, -1).astype(np.float32),
                            np.asarray([[w, h]], np.float32),
                            np.asarray([math.nan if stage is None else stage], np.float32),
                            np.zeros((1, 4), np.float32), np.zeros(1, bool), [ex["project"]],
                            [str(ex["group_id"])])
            box = predict_crop(model, data, use_stage)[0]
            panel["model_box"] = [float(v) for v in box]
            panel["model_box_from"] = f"crop champion v{version}"
    except Exception as exc:  # an optional drawing: the panel keeps the recorded box
        log.warning("summary.champion_boxes_skipped", error=repr(exc)[:300])
