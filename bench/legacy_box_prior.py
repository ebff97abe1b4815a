"""The box prior on the real legacy crops: the crop proposer without embeddings.

Reads ``select_crop_log.csv`` (no images: only each chosen image's size and stage), normalizes
pixel boxes by the chosen image's width/height (any value > 1 means pixels), skips full-frame
rows, duplicates (same chosen image) and unusable lines, splits by a stable hash of the group
key exactly like training does, trains the crop network on ``[w/2048, h/2048, stage/3]`` and
prints its holdout IoU beside the full-frame and mean-box baselines.

    .venv/bin/python bench/legacy_box_prior.py [PATH/TO/select_crop_log.csv]
"""

from __future__ import annotations

import csv
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from daemon.images import parse_stage
from daemon.settings import TrainingSettings
from daemon.training.dataset import CropData
from daemon.training.split import in_holdout

# the shipped subset; pass the full legacy crop log where a copy is at hand
DEFAULT = (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "legacy"
           / "select_crop_log_subset.csv")
FULL_TOL = 0.001


def read_crops(path: Path) -> tuple[CropData, Counter[str]]:
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    dims, stages, boxes, projects, keys = [], [], [], [], []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            try:
                chosen = int(row[4])
                chosen_path = row[5]
                coords = [float(v) for v in row[6:10]]
                block = row[11 + 4 * chosen: 15 + 4 * chosen]
                w, h = float(block[2]), float(block[3])
            except (ValueError, IndexError):
                skipped["unparseable"] += 1
                continue
            if not all(math.isfinite(v) for v in coords) or w <= 0 or h <= 0:
                skipped["bad_size_or_coords"] += 1
                continue
            if chosen_path in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(chosen_path)
            if any(v > 1 for v in coords):
                coords = [coords[0] / w, coords[1] / h, coords[2] / w, coords[3] / h]
            x1, y1, x2, y2 = coords
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                skipped["box_invalid"] += 1
                continue
            if all(abs(a - b) <= FULL_TOL for a, b in zip(coords, (0, 0, 1, 1), strict=True)):
                skipped["full_frame"] += 1
                continue
            stage = parse_stage(block[1]) or parse_stage(chosen_path)
            project = chosen_path.split("/", 1)[0] if "/" in chosen_path else "(none)"
            dims.append((w, h))
            stages.append(float("nan") if stage is None else stage)
            boxes.append(coords)
            projects.append(project)
            keys.append(f"{row[1]}|{chosen_path}")
    n = len(boxes)
    holdout = np.asarray([in_holdout(p, k, fraction=0.2) for p, k in zip(projects, keys,
                                                                         strict=True)])
    return CropData(vectors=np.zeros((n, 0), np.float32), dims=np.asarray(dims, np.float32),
                    stages=np.asarray(stages, np.float32), boxes=np.asarray(boxes, np.float32),
                    holdout=holdout, projects=projects, group_ids=keys), skipped


def main() -> int:
    from daemon.training.fit import fit_crop, mean_box, predict_crop
    from daemon.training.metrics import crop_report

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    data, skipped = read_crops(path)
    train, hold = data.subset(~data.holdout), data.subset(data.holdout)
    hp = TrainingSettings(crop_epochs=60, device="cpu", dropout=0.1)
    model, _ = fit_crop(train, hp, use_stage=True)
    report = crop_report(predict_crop(model, hold, use_stage=True), hold.boxes, hold.stages,
                         mean_box(train.boxes))
    print(f"legacy crops: {data.size} usable ({train.size} train / {hold.size} holdout by "
          f"group hash); skipped {dict(sorted(skipped.items()))}")
    names = (("box prior (dims+stage)", "model"), ("full frame", "baseline_full_frame"),
             ("mean box", "baseline_mean_box"))
    for label, key in names:
        m = report[key]
        print(f"{label:<24} mean IoU {m['mean_iou']:.3f}  median {m['median_iou']:.3f}  "
              f"centre dist {m['mean_centre_distance']:.3f}  corners<=0.05 "
              f"{m['corners_within_0_05']:.1%}")
    for stage, m in report["model"]["by_stage"].items():
        ff = report["baseline_full_frame"]["by_stage"][stage]["mean_iou"]
        mb = report["baseline_mean_box"]["by_stage"][stage]["mean_iou"]
        print(f"  stage {stage:<8} n={m['n']:<5} prior {m['mean_iou']:.3f}  full frame "
              f"{ff:.3f}  mean box {mb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
