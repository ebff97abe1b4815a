"""Shared pieces of the summary tests (no tests here): a realistic scene to summarise.

A year of reviewer rows in a real WAL DB with its writer open (some timestamped inside the
summary window, some bad), real PNG files under an image root for recent rows, part of them
embedded, part deleted before they were embedded (lost), and models trained on them.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.embedding.ledger import FileRow, Ledger, VectorRow
from daemon.images import ImageIndex
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.timeparse import iso_utc
from daemon.validation import Validator


def draw_image(path: Path, width: int, height: int, seed: int) -> None:
    """A small PNG with a few coloured shapes (something a crop box can be seen on)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (width, height), (rng.randrange(40, 90),) * 3)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(10, max(11, width // 4))
        d.ellipse((x - r, y - r, x + r, y + r),
                  fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def year_of_rows(db: Any, now: datetime, *, old: int, recent: int, seed: int = 7
                 ) -> list[dict[str, Any]]:
    """``old`` rows spread over the year before the window, ``recent`` inside the 24 h before
    ``now``; returns the recent ones."""
    rng = random.Random(seed)
    for _ in range(old):
        when = now - timedelta(days=rng.uniform(1.05, 365))
        db.insert(timestamp=iso_utc(when))
    rows = []
    for _ in range(recent):
        when = now - timedelta(hours=rng.uniform(0.1, 23.5))
        rows.append(db.insert(timestamp=iso_utc(when)))
    return rows


def picked_name(row: dict[str, Any]) -> str:
    return str(json.loads(row["images"])[row["user_selected_index"]])


def images_for(settings: Settings, store: StateStore, project: str, rows: list[dict[str, Any]],
               root: Path, now: datetime, *, embedded: int, lost: int) -> dict[str, list[str]]:
    """PNG files for the picked image of ``rows`` (at 1/8 of the row's size), indexed; the first
    ``embedded`` get a vector row, the next ``lost`` are deleted before they were embedded."""
    names = [picked_name(r) for r in rows]
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        draw_image(root / name, max(16, row["image_width"] // 8),
                   max(16, row["image_height"] // 8), i)
    index = ImageIndex(store)
    index.scan(project, [root], now)
    files, vectors = [], []
    for name in names[:embedded]:
        path = root / name
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        st = path.stat()  # the size and mtime of what was read, as the stage records them
        files.append(FileRow(project, str(path), name, st.st_size, st.st_mtime_ns, sha, "ok"))
        vectors.append(VectorRow(sha, "hash-512", 512, None, None))
    Ledger(store).record(files, vectors, now, "hash-512")
    for name in names[embedded:embedded + lost]:
        (root / name).unlink()
    index.scan(project, [root], now)
    return {"embedded": names[:embedded], "lost": names[embedded:embedded + lost],
            "waiting": names[embedded + lost:]}


def scene(settings: Settings, store: StateStore, make_db: Any, now: datetime, *,
          old: int = 400, recent: int = 40, bad: int = 25, embedded: int = 20, lost: int = 12
          ) -> dict[str, Any]:
    """The whole scene, validated; returns what was planted."""
    db = make_db("mojo3", checks=False)
    recent_rows = year_of_rows(db, now, old=old, recent=recent)
    rng = random.Random(11)
    for k in range(bad):
        change = rng.choice([{"image_width": 0}, {"user_action": "Approve"},
                             {"final_crop_coords": "[10, 20, 300, 400]"},
                             {"ai_confidence": 1.7}])
        db.insert(timestamp=iso_utc(now - timedelta(days=3 + k)), **change)
    root = settings.data_root / "images" / "mojo3"
    fates = images_for(settings, store, "mojo3", recent_rows, root, now, embedded=embedded,
                       lost=lost)
    Validator(store, settings, clock=lambda: now).validate_all()
    return {"db": db, "recent": recent_rows, "fates": fates, "root": root}
