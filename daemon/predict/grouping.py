"""The upstream's grouping of image files into review groups, ported so both agree.

The reviewer groups files with ``find_consecutive_stage_groups`` (upstream
``scripts/utils/companion_file_utils.py``) after sorting them with
``sort_image_files_by_timestamp_and_stage``; a prediction is only useful for a group the
reviewer will show, so trainingd must build the same groups from the same file list.  The rule,
restated ("nearest up"):

- files are ordered by (the file name's leading ``YYYYMMDD_HHMMSS``, or ``99999999_999999``
  when there is none; the stage number; the name);
- the stage number comes from a case-insensitive substring of the name: ``stage1_generated``
  1, ``stage1.5`` 1.5, ``stage2`` 2, ``stage3`` 3, anything else 0;
- a run starts at any file; from the run's last stage ``s`` it looks at the next files (at most
  ``lookahead``) until one has a stage ``<= s`` (a new series) and takes the *smallest* stage
  above ``s`` among them, its first occurrence; files it passed over are skipped for good;
- a run of fewer than ``min_group_size`` files is no group.

So ``1, 3, 2`` (sorted that way because the ``3`` carries an earlier timestamp) groups as
``[1, 2]``: the rule waits for the 2 rather than jumping to the 3.  Pure functions on names;
no file is opened.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

T = TypeVar("T")

#: substrings tried in this order (the upstream's order: a name holding two stages takes the
#: first that matches)
_STAGE_KEYS: tuple[tuple[str, float], ...] = (
    ("stage1_generated", 1.0), ("stage1.5", 1.5), ("stage2", 2.0), ("stage3", 3.0))
_DETECT_KEYS: tuple[str, ...] = (
    "stage1_generated", "stage1.5_face_swapped", "stage2_upscaled", "stage3_enhanced")
_TIMESTAMP = re.compile(r"^(\d{8}_\d{6})")
NO_TIMESTAMP = "99999999_999999"
LOOKAHEAD = 50
MIN_GROUP_SIZE = 2


@functools.lru_cache(maxsize=1 << 17)  # sorting and grouping ask for the same names again
def stage_number(name: str) -> float:
    """The upstream's stage number of a file name (0.0 for an unknown stage).

    Two steps, as upstream: the name's stage *label* (the four full stage names), then its
    number from that label; a name with no full label is stage 0."""
    lower = name.lower()
    label = next((k for k in _DETECT_KEYS if k in lower), None)
    if label is None:
        return 0.0
    return next(v for k, v in _STAGE_KEYS if k in label)


def timestamp_text(name: str) -> str | None:
    """The leading ``YYYYMMDD_HHMMSS`` of a file name, or None."""
    m = _TIMESTAMP.match(name)
    return m.group(1) if m else None


def timestamp_of(name: str) -> datetime | None:
    text = timestamp_text(name)
    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y%m%d_%H%M%S")
    except ValueError:  # 20251399_999999: digits, but no date
        return None


def sort_key(name: str) -> tuple[str, float, str]:
    return (timestamp_text(name) or NO_TIMESTAMP, stage_number(name), name)


def sort_names(names: Sequence[str]) -> list[str]:
    """The order the upstream sorts a folder's files into before grouping."""
    return sorted(names, key=sort_key)


def group_sorted(items: Sequence[T], name_of: Callable[[T], str] = str,
                 *, lookahead: int = LOOKAHEAD, min_group_size: int = MIN_GROUP_SIZE
                 ) -> list[list[T]]:
    """Groups of ``items`` (already in :func:`sort_key` order), by the nearest-up rule."""
    stages = [stage_number(name_of(it)) for it in items]
    n = len(items)
    out: list[list[T]] = []
    start = 0
    while start < n:
        run = [start]
        last = stages[start]
        nxt = start + 1
        while nxt < n:
            # the window: following files, up to the first that starts a new series
            window_end = nxt
            while window_end < n and window_end - nxt < lookahead and stages[window_end] > last:
                window_end += 1
            if window_end == nxt:
                break
            best = min(range(nxt, window_end), key=lambda k: (stages[k], k))
            run.append(best)
            last = stages[best]
            nxt = best + 1  # files between are passed over for good, as upstream
        start = nxt
        if len(run) >= min_group_size:
            out.append([items[k] for k in run])
    return out


def group_names(names: Sequence[str], *, lookahead: int = LOOKAHEAD,
                min_group_size: int = MIN_GROUP_SIZE) -> list[list[str]]:
    """Sort ``names`` as the upstream does and group them."""
    return group_sorted(sort_names(names), lookahead=lookahead, min_group_size=min_group_size)
