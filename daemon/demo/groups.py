"""What the simulated reviewer decides for one group, drawn before anything is written.

The simulator (:mod:`daemon.demo.simulator`) shows a group's images first and commits its row
at once or, with a review delay, later: every choice (names, size, pick, action, boxes, which
losers go) is drawn here in one go, in the order the draws always had, so a seed gives the same
output whether the review follows at once or after a delay.  The one difference: when groups
can wait in the image root together (``overlapping``), each starts with its generated image, so
the upstream's grouping rule (:mod:`daemon.predict.grouping`: a stage not above the last one
starts a new group) tells them apart, as it does the real generator's groups.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from daemon.demo.sample import STAGE_NAMES

#: Tiny stand-ins for the real sizes (832x1216, 1216x832, ...), same aspect ratios.
TINY_SIZES: tuple[tuple[int, int], ...] = ((52, 76), (76, 52), (64, 64), (104, 152), (128, 128))
CROP_FRACTION = 0.4
AUTO_CROP_FRACTION = 0.25  # of the crops: AI crop accepted, routed to __crop_auto/
HIGHEST_STAGE_RATE = 0.976
#: Images of group n are "generated" at FILE_EPOCH + n * 7 minutes: names are unique per DB.
FILE_EPOCH = datetime(2025, 7, 1, 8, 0, 0)


@dataclass(slots=True)
class ShownGroup:
    """A group whose images are (about to be) in the root, with every choice of its review."""

    n: int  # the group's number in the DB: file names and the group_id's img/batch numbers
    shown_at: float  # simulator clock when its images appeared
    stages: list[int]  # indexes into STAGE_NAMES
    names: list[str]
    size: tuple[int, int]
    color: tuple[int, int, int]
    pick: int
    action: str  # approve or crop
    auto: bool  # an accepted AI crop (routed to __crop_auto/)
    shape: int  # which of the three live kind A field sets the sidecar has
    ai_box: list[float] | None
    confidence: float
    delete_mask: list[bool]  # per image: deleted from delete staging after review (losers)
    final_box: list[float] | None  # what the crop tool will draw (crops only)


@dataclass(slots=True)
class ReviewedGroup:
    """What the simulator did for one group (for tests and the bench)."""

    group_id: str
    action: str
    images: list[str]
    picked: str
    folder: str  # where the picked image went: __selected, __crop or __crop_auto
    sidecar: Path | None
    final_box: list[float] | None = None  # what the crop tool will draw (crops only)
    deleted: list[str] = field(default_factory=list)
    cropped: bool = False


@dataclass(order=True, slots=True)
class Due:
    at: float
    seq: int
    kind: str = field(compare=False)  # "crop" or "delete"
    group: ReviewedGroup = field(compare=False)
    names: tuple[str, ...] = field(compare=False, default=())


def box(rng: random.Random) -> list[float]:
    """A normalized crop box; real crops keep the image's aspect ratio: equal normalized width
    and height."""
    side = rng.uniform(0.45, 0.95)
    x1, y1 = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
    return [round(x1, 6), round(y1, 6), round(x1 + side, 6), round(y1 + side, 6)]


def draw_group(rng: random.Random, n: int, *, overlapping: bool, delete_fraction: float,
               clock: float) -> ShownGroup:
    """Every choice of group ``n``, drawn from ``rng``."""
    count = rng.choice((2, 2, 3, 4))
    if overlapping:  # a group starts with its generated image: waiting groups stay apart
        stages = [0, *sorted(rng.sample(range(1, 4), count - 1))]
    else:
        stages = sorted(rng.sample(range(4), count))
    size = rng.choice(TINY_SIZES)
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    generated = FILE_EPOCH + timedelta(minutes=7 * n)
    names: list[str] = []
    for k, stage in enumerate(stages):
        t = generated + timedelta(seconds=40 * k + rng.randrange(30))
        names.append(f"{t:%Y%m%d_%H%M%S}_{STAGE_NAMES[stage]}.png")
    pick = count - 1 if rng.random() < HIGHEST_STAGE_RATE else rng.randrange(count - 1)
    action = "crop" if rng.random() < CROP_FRACTION else "approve"
    auto = action == "crop" and rng.random() < AUTO_CROP_FRACTION
    shape = rng.randrange(3)  # which of the three live kind A field sets
    ai_box = box(rng) if auto or shape == 1 else None
    confidence = round(rng.uniform(0.5, 0.99), 4)
    delete_mask = [rng.random() < delete_fraction for _ in names]
    final_box: list[float] | None = None
    if action == "crop":
        # an accepted AI crop is kept as suggested; otherwise the person draws a new box
        keep_ai = ai_box is not None and (auto or rng.random() < 0.5)
        final_box = ai_box if keep_ai else box(rng)
    return ShownGroup(n, clock, stages, names, size, color, pick, action, auto, shape, ai_box,
                      confidence, delete_mask, final_box)
