"""The holdout rule: by group, by a stable hash of the group key, never by pair.

A group's side depends only on ``(seed, project, group_id)``, so it never moves between train
and holdout as data grows (the old ranker split by pair and leaked groups into both sides).
Whole projects may be held out as well, which is the only honest test of "a new project".
Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

SPLIT_RULE = ("holdout if sha256(f'{seed}:{project}:{group_id}') read as a fraction in [0, 1) "
              "< holdout_fraction, or the project is listed in holdout_projects")


def group_fraction(project: str, group_id: str, seed: int = 0) -> float:
    """A stable number in [0, 1) for one group."""
    digest = hashlib.sha256(f"{seed}:{project}:{group_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(project: str, group_id: str, *, fraction: float, seed: int = 0,
               holdout_projects: Collection[str] = ()) -> bool:
    """Whether the group belongs to the holdout side."""
    if project in holdout_projects:
        return True
    return group_fraction(project, group_id, seed) < fraction
