"""Image file names: stage parsing (the image index itself arrives with the watcher).

File names look like ``YYYYMMDD_HHMMSS_<stage>.png``; the stage decides the "always highest
stage" baseline, so it is parsed in exactly one place.
"""

from __future__ import annotations

import re

#: Stage name -> its numeric rank, in workflow order.
STAGES: dict[str, float] = {
    "stage1_generated": 1.0,
    "stage1.5_face_swapped": 1.5,
    "stage2_upscaled": 2.0,
    "stage3_enhanced": 3.0,
}
_STAGE_RE = re.compile(r"(stage1_generated|stage1\.5_face_swapped|stage2_upscaled|stage3_enhanced)")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def parse_stage(file_name: str) -> float | None:
    """The stage rank encoded in a file name, or None for an unknown stage."""
    # fast path for the canonical ``YYYYMMDD_HHMMSS_<stage>.<ext>`` (16-char prefix): this runs
    # for every image of every row in a full validation
    rank = STAGES.get(file_name[16 : file_name.rfind(".")])
    if rank is not None:
        return rank
    m = _STAGE_RE.search(file_name)
    return STAGES[m.group(1)] if m else None
