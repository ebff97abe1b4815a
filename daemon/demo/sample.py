"""Reviewer-like decision data: live-format rows, and a sample project with planted faults.

Used by ``trainingd demo``, the tests and ``bench/``.  Rows look like the real reviewer's
(live group_id format, JSON written with ``json.dumps``, aspect-keeping crops, mostly the
highest stage picked) so that checks and benchmarks see realistic values.
"""

from __future__ import annotations

import io
import json
import os
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.decisions.schema import COLUMNS, INSERT_SQL, create_legacy_db, create_v3_db
from daemon.fsutil import atomic_write_text

STAGE_NAMES = ("stage1_generated", "stage1.5_face_swapped", "stage2_upscaled", "stage3_enhanced")
SIZES = ((832, 1216), (1216, 832), (1024, 1024), (1664, 2432), (2048, 2048), (3072, 3072))
EPOCH = datetime(2025, 10, 23, 20, 0, 0, tzinfo=UTC)


def iso_z(moment: datetime) -> str:
    """A timestamp as the reviewer writes it (``...Z``)."""
    return moment.isoformat().replace("+00:00", "Z")


# -- files as the reviewer writes and moves them -------------------------------------------------

def png_bytes(size: tuple[int, int], color: tuple[int, int, int], stage: int) -> bytes:
    """A small PNG whose content differs per stage, so the versions of one group differ."""
    from PIL import Image, ImageDraw  # imported here: the simulator's --help stays instant

    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle((w // 8, h // 8, w // 8 + (stage + 1) * w // 10, h // 2),
                   fill=(255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_sidecar(path: Path, data: dict[str, Any]) -> None:
    """A kind A sidecar as the reviewer writes it: ``json.dump(indent=2)``, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2))


def move_into(src: Path, dst_dir: Path) -> Path:
    """Move ``src`` into ``dst_dir`` (made if missing) with one rename, as the reviewer does."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    os.replace(src, dst)
    return dst


def reviewer_row(project: str, n: int, rng: random.Random, *, pending: bool = False,
                 start: datetime = EPOCH) -> dict[str, Any]:
    """One clean live row, as the reviewer writes it (crop rows carry their final box unless
    ``pending``)."""
    when = start + timedelta(seconds=7 * n, microseconds=rng.randrange(1_000_000))
    batch = n // 100 + 1
    count = rng.choice((2, 2, 3, 4))
    stages = sorted(rng.sample(range(4), count))
    names = []
    for k, stage in enumerate(stages):
        t = when - timedelta(days=90, seconds=60 * (count - k))
        names.append(f"{t:%Y%m%d_%H%M%S}_{STAGE_NAMES[stage]}.png")
    pick = count - 1 if rng.random() < 0.976 else rng.randrange(count - 1)
    ai_pick = count - 1
    width, height = rng.choice(SIZES)
    action = "crop" if rng.random() < 0.4 else "approve"
    final = None
    crop_ts = None
    crop_match = None
    if action == "crop" and not pending:
        side = rng.uniform(0.45, 0.95)
        x1, y1 = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
        box = [round(x1 * width) / width, round(y1 * height) / height,
               round((x1 + side) * width) / width, round((y1 + side) * height) / height]
        final = json.dumps(box)
        crop_ts = iso_z(when + timedelta(minutes=rng.randrange(5, 600)))
        crop_match = 0
    return {
        "group_id": f"{project}_group_{when:%Y%m%dT%H%M%S%f}_batch{batch:03d}_img{n % 1000:03d}",
        "timestamp": iso_z(when),
        "project_id": project,
        "directory": f"/Users/reviewer/training data/{project}",
        "batch_number": batch,
        "images": json.dumps(names),
        "ai_selected_index": ai_pick,
        "ai_crop_coords": None,
        "ai_confidence": round(rng.uniform(0.5, 0.99), 4),
        "user_selected_index": pick,
        "user_action": action,
        "final_crop_coords": final,
        "crop_timestamp": crop_ts,
        "image_width": width,
        "image_height": height,
        "selection_match": int(pick == ai_pick),
        "crop_match": crop_match,
        "ai_crop_accepted": None,
    }


def row_tuple(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in COLUMNS)


def synthetic_rows(project: str, start: int, count: int, seed: int = 0,
                   pending_every: int = 0) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed * 1_000_003 + start)
    for n in range(start, start + count):
        pending = bool(pending_every) and n % pending_every == 0
        yield row_tuple(reviewer_row(project, n, rng, pending=pending))


@dataclass(frozen=True, slots=True)
class PlantedFault:
    code: str
    changes: dict[str, Any]


#: One row per fault the demo shows; the code is what ``trainingd validate`` must report.
PLANTED_FAULTS: tuple[PlantedFault, ...] = (
    PlantedFault("crop_coords_pixels", {"user_action": "crop",
                                        "final_crop_coords": "[0.0, 66.0, 1787.0, 1853.0]",
                                        "crop_timestamp": "2025-10-24T10:00:00Z"}),
    PlantedFault("crop_box_inverted", {"user_action": "crop",
                                       "final_crop_coords": "[0.8, 0.1, 0.2, 0.7]",
                                       "crop_timestamp": "2025-10-24T10:00:00Z"}),
    PlantedFault("user_action_invalid", {"user_action": "Approve"}),
    PlantedFault("image_path_not_bare",
                 {"images": json.dumps(["PROJECT_ROOT/demo/20250708_060416_stage1_generated.png",
                                        "20250708_060530_stage2_upscaled.png"]),
                  "user_selected_index": 1, "ai_selected_index": 1, "selection_match": 1}),
    PlantedFault("timestamp_unparseable", {"timestamp": "23/10/2025 20:44"}),
    PlantedFault("index_out_of_range", {"images": json.dumps(
        ["20250708_060416_stage1_generated.png", "20250708_060530_stage2_upscaled.png"]),
        "user_selected_index": 3, "ai_selected_index": 1, "selection_match": 0}),
    PlantedFault("image_dimension_invalid", {"image_width": 0}),
    PlantedFault("crop_aspect_mismatch", {"user_action": "crop",
                                          "final_crop_coords": "[0.1, 0.1, 0.9, 0.5]",
                                          "crop_timestamp": "2025-10-24T10:00:00Z"}),
    PlantedFault("crop_full_frame_placeholder", {"user_action": "crop",
                                                 "final_crop_coords": "[0.0, 0.0, 1.0, 1.0]",
                                                 "crop_timestamp": "2025-10-24T10:00:00Z"}),
    PlantedFault("project_id_mismatch", {"project_id": "mojo9"}),
    PlantedFault("crop_incomplete", {"user_action": "crop", "final_crop_coords": None,
                                     "crop_timestamp": None, "crop_match": None}),
    PlantedFault("ai_confidence_invalid", {"ai_confidence": 1.7}),
)


def write_sample_project(decisions_dir: Path, project: str = "demo", rows: int = 200,
                         seed: int = 7, *, faults: bool = True) -> tuple[Path, dict[str, str]]:
    """Write ``<project>.db`` with ``rows`` clean rows plus one row per planted fault.

    With ``faults`` the DB has the CHECK-less DDL of the older scripts (the canonical CHECKs
    would refuse the planted rows, which is how such rows reach real DBs); without, it is a
    canonical v3 DB.  Returns the DB path and ``group_id -> expected code`` of planted rows.
    """
    decisions_dir.mkdir(parents=True, exist_ok=True)
    path = decisions_dir / f"{project}.db"
    rng = random.Random(seed)
    planted: dict[str, str] = {}
    conn = create_legacy_db(path) if faults else create_v3_db(path)
    try:
        with conn:
            conn.execute("BEGIN")
            for n in range(rows):
                conn.execute(INSERT_SQL, row_tuple(reviewer_row(project, n, rng)))
            for k, fault in enumerate(PLANTED_FAULTS if faults else ()):
                row = reviewer_row(project, rows + k, rng)
                row.update(fault.changes)
                conn.execute(INSERT_SQL, row_tuple(row))
                planted[row["group_id"]] = fault.code
            conn.execute("COMMIT")
    finally:
        conn.close()
    return path, planted


def copy_row_into(path: Path, group_id: str, source: Path) -> None:
    """Insert the row ``group_id`` of ``source`` into ``path`` (a cross-project duplicate)."""
    src = sqlite3.connect(source)
    dst = sqlite3.connect(path)
    try:
        row = src.execute(f"SELECT {', '.join(COLUMNS)} FROM ai_decisions WHERE group_id = ?",
                          (group_id,)).fetchone()
        with dst:
            dst.execute(INSERT_SQL, row)
    finally:
        src.close()
        dst.close()
