"""Legacy crop boxes: pixels or normalized (decided per row), checked, and full-frame
placeholders recognised (data contract section 5: one row in 7,194 holds normalized values,
553 rows are an approve logged as a full-frame crop).

Split from :mod:`daemon.backfill.convert`; pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from daemon.backfill.lines import Note


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


BoxResult = tuple[tuple[float, float, float, float], bool]


def normalize_box(raw: Sequence[str], width: int, height: int,
                  full_frame_tolerance: float) -> BoxResult | Note:
    """A logged box as a normalized one plus "is full frame"; a Note when it cannot be used.

    Any value > 1 means the row holds pixels (detected per row): x by width, y by height.
    """
    shown = repr(tuple(raw))
    nums = [_number(v) for v in raw]
    if any(v is None for v in nums):
        return Note("backfill_box_unparseable", "crop_x1", shown,
                    "a crop coordinate is empty or not a finite number")
    x1, y1, x2, y2 = (float(v) for v in nums if v is not None)
    if max(x1, y1, x2, y2) > 1:
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    box = (x1, y1, x2, y2)
    if min(box) < 0 or max(box) > 1:
        return Note("backfill_box_out_of_range", "crop_x1", shown,
                    f"the box reaches outside the {width}x{height} image")
    if x1 > x2 or y1 > y2:
        return Note("backfill_box_inverted", "crop_x1", shown,
                    "the box has its corners swapped (x1 > x2 or y1 > y2)")
    if x1 == x2 or y1 == y2:
        return Note("backfill_box_empty", "crop_x1", shown, "the box has zero width or height")
    full = all(abs(v - f) <= full_frame_tolerance
               for v, f in zip(box, (0.0, 0.0, 1.0, 1.0), strict=True))
    return box, full
