"""The records ``trainingd status`` gathers (champions, the reviewer's files, disk use).

Exists so the status room passes typed facts between its readers and the document, not loose
dicts; ``to_dict`` gives the ``--json`` shape, whose keys keep their meaning.  No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ChampionFacts:
    """One kind's champion as status shows it (``--json``: :meth:`to_dict`)."""

    version: int
    metric: str
    figure: Any  # the metadata's number, shown as it was written (None when missing)
    n: Any
    trained_at: Any
    promoted_at: str | None
    file: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "metric": self.metric, "figure": self.figure,
                "n": self.n, "trained_at": self.trained_at, "promoted_at": self.promoted_at,
                "file": self.file}


@dataclass(frozen=True, slots=True)
class ReviewerFile:
    """A file in the registry's ``reviewer/`` folder: name, size, version, mtime."""

    name: str
    bytes: int
    version: Any  # read from its metadata JSON; None when unreadable
    mtime: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "version": self.version,
                "mtime": self.mtime}


@dataclass(frozen=True, slots=True)
class ReviewerFiles:
    folder: str
    files: tuple[ReviewerFile, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "files": [f.to_dict() for f in self.files]}


@dataclass(frozen=True, slots=True)
class DiskUse:
    path: str
    bytes: int
    files: int
    human: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "files": self.files,
                "human": self.human}
