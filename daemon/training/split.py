"""The holdout rule: by group, by a stable hash of the group key, never by pair.

A group's side depends only on ``(seed, project, group_id)``, so it never moves between train
and holdout as data grows (the old ranker split by pair and leaked groups into both sides).
Whole projects may be held out as well, which is the only honest test of "a new project".
Pure functions and the split's record: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class SplitSettings:
    """What defines the train / validation / test sides, as a model's metadata and units file
    record it: a champion trained under other values is flagged, never silently compared."""

    seed: int | None
    test_fraction: float | None
    validation_fraction: float | None
    holdout_projects: tuple[str, ...] = ()
    near_duplicate_cosine: float | None = None
    rule: str | None = None
    unit: str | None = None

    def key(self) -> tuple[Any, ...]:
        """The values whose change moves groups between sides (rule and unit are words)."""
        return (self.seed, self.test_fraction, self.validation_fraction,
                self.holdout_projects, self.near_duplicate_cosine)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "unit": self.unit, "seed": self.seed,
                "test_fraction": self.test_fraction,
                "validation_fraction": self.validation_fraction,
                "holdout_projects": list(self.holdout_projects),
                "near_duplicate_cosine": self.near_duplicate_cosine}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitSettings:
        """Parse the JSON a units file holds (older files named the test side ``holdout``)."""
        return cls(seed=data.get("seed"),
                   test_fraction=data.get("test_fraction", data.get("holdout_fraction")),
                   validation_fraction=data.get("validation_fraction"),
                   holdout_projects=tuple(data.get("holdout_projects") or ()),
                   near_duplicate_cosine=data.get("near_duplicate_cosine"),
                   rule=data.get("rule"), unit=data.get("unit"))
