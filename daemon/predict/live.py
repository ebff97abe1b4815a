"""Live accuracy: how each champion's predictions fared on the groups reviewed after them.

A periodic pass on the heavy lane (run after every prediction pass): it reads the decision rows
that arrived since the last pass through the read-only reader
(:class:`daemon.decisions.reader.SourceReader`: invisible, retried while busy), matches each
row's ``images`` (file names, in group order) to a group trainingd predicted, and, when the
prediction was made *before* the row's review timestamp, records whether the pick matched,
whether the highest-stage rule would have matched, and the crop IoU (the reviewer's final crop,
a full frame for an approve without one; pending until the crop tool writes it).  No edit to
the validator is needed; the cursor and the reviews are committed together, so a crash replays
a chunk and replaying writes the same rows.  Bad rows (unparseable images or indexes) are
skipped here: the validator already reports them as issues.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.predict.grouping import stage_number
from daemon.predict.store import PredictionStore, Review, names_key
from daemon.timeparse import iso_utc, parse_timestamp

log = structlog.get_logger("predict")

FULL_FRAME = (0.0, 0.0, 1.0, 1.0)
CHUNK = 2000
_COL = {name: i + 1 for i, name in enumerate((
    "group_id", "timestamp", "project_id", "directory", "batch_number", "images",
    "ai_selected_index", "ai_crop_coords", "ai_confidence", "user_selected_index",
    "user_action", "final_crop_coords"))}


def box_of(value: Any) -> tuple[float, float, float, float] | None:
    """A normalized ``[x1, y1, x2, y2]`` from JSON text or a list, or None when it is not one."""
    try:
        raw = json.loads(value) if isinstance(value, str) else value
        x1, y1, x2, y2 = (float(v) for v in raw)
    except (TypeError, ValueError, RecursionError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        return None
    return (x1, y1, x2, y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def highest_stage_index(names: Sequence[str]) -> int:
    """The rule's pick: the highest stage, the later image on a tie."""
    return max(range(len(names)), key=lambda i: (stage_number(names[i]), i))


def record_review(prediction: dict[str, Any], *, decision_db: str, decision_group_id: str,
                  images: Sequence[str], reviewed_at: str, user_selected_index: Any,
                  user_action: Any, final_crop_coords: Any, now: datetime) -> Review | None:
    """The live record of one reviewed group, or None when it does not count: the prediction
    was made at or after the review, or the row's pick is not an index into its images."""
    reviewed = parse_timestamp(reviewed_at)
    predicted = parse_timestamp(prediction["predicted_at"])
    if reviewed is None or predicted is None or predicted >= reviewed:
        return None
    if isinstance(user_selected_index, bool) or not isinstance(user_selected_index, int) \
            or not 0 <= user_selected_index < len(images):
        return None
    action = str(user_action)
    truth = box_of(final_crop_coords)
    if truth is None and action == "approve":
        truth = FULL_FRAME
    ours = box_of(prediction.get("ai_crop_coords"))
    pending = action == "crop" and truth is None
    crop_iou = round(iou(ours, truth), 6) if ours is not None and truth is not None else None
    pick = prediction.get("ai_selected_index")
    return Review(prediction["group_id"], decision_db, decision_group_id,
                  int(prediction["ranker_version"]), prediction.get("crop_version"), pick,
                  user_selected_index, action, pick == user_selected_index,
                  highest_stage_index(images) == user_selected_index, crop_iou, pending,
                  str(prediction["predicted_at"]), iso_utc(reviewed), iso_utc(now))


def _reviews(pstore: PredictionStore, rows: Sequence[tuple[Any, ...]], decision_db: str,
             now: datetime) -> list[Review]:
    parsed: list[tuple[tuple[Any, ...], list[str]]] = []
    for row in rows:
        try:
            images = json.loads(row[_COL["images"]])
        except (TypeError, ValueError, RecursionError):
            continue
        if isinstance(images, list) and images and all(isinstance(n, str) for n in images):
            parsed.append((row, images))
    found = pstore.by_names(names_key(images) for _, images in parsed)
    out = []
    for row, images in parsed:
        pred = found.get(names_key(images))
        if pred is None:
            continue
        rev = record_review(pred, decision_db=decision_db,
                            decision_group_id=str(row[_COL["group_id"]]), images=images,
                            reviewed_at=row[_COL["timestamp"]],
                            user_selected_index=row[_COL["user_selected_index"]],
                            user_action=row[_COL["user_action"]],
                            final_crop_coords=row[_COL["final_crop_coords"]], now=now)
        if rev is not None:
            out.append(rev)
    return out


def record_live_reviews(pstore: PredictionStore, decision_db: Path, now: datetime
                        ) -> dict[str, int]:
    """Read the rows added since the last pass (and the rows whose crop was pending) and record
    the reviews of predicted groups.  Returns what it read and recorded."""
    from daemon.decisions.reader import SourceReader
    from daemon.errors import SourceError

    key = str(decision_db)
    figures = {"rows_read": 0, "reviews_recorded": 0}
    if not decision_db.is_file():
        return figures
    try:
        with SourceReader(decision_db) as reader:
            _, hi, _ = reader.snapshot()
            pending = pstore.pending_crops(key)
            if pending:  # the crop tool UPDATEs rows in place: read those again
                again = _reviews(pstore, reader.rows_by_group_id(pending), key, now)
                pstore.record_reviews(again, key, None)
                figures["reviews_recorded"] += len(again)
            after = pstore.cursor(key)
            if hi < after:  # VACUUM renumbered rowids or the DB was replaced: read it all
                after = 0
            for rows in reader.iter_rows(after, hi, CHUNK):
                revs = _reviews(pstore, rows, key, now)
                pstore.record_reviews(revs, key, int(rows[-1][0]))
                figures["rows_read"] += len(rows)
                figures["reviews_recorded"] += len(revs)
    except SourceError as exc:  # busy or unreadable now: the validator reports it; next pass
        log.info("predict.live_source_unavailable", db=key, error=str(exc))
        figures["unavailable"] = 1
    return figures
