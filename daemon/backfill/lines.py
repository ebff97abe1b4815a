"""What one legacy CSV line becomes: a :class:`Converted` row or a :class:`Rejected` note, and
what the conversion is given (the file's :class:`CsvLayout`, a :class:`ConvertContext`).

Split from :mod:`daemon.backfill.convert` so the run, the input side and the conversion share
these records without importing each other.  Pure data: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.backfill.projects import ProjectFrom, Window


@dataclass(frozen=True, slots=True)
class Note:
    """A finding about one line: a rejection reason (error) or a conversion remark (warning)."""

    code: str
    field: str | None
    value_repr: str
    message: str


@dataclass(frozen=True, slots=True)
class ImageProblem:
    """The image file found for a line exists but cannot give its size (too large for PIL's
    decompression-bomb limit, truncated, not an image, not a regular file)."""

    path: str
    reason: str


#: ``(project, bare file name) -> (width, height)``; an :class:`ImageProblem` when the file was
#: found but cannot be read; None when it is not found.
SizeLookup = Callable[[str, str], "tuple[int, int] | ImageProblem | None"]


@dataclass(frozen=True, slots=True)
class Rejected:
    note: Note


@dataclass(frozen=True, slots=True)
class Converted:
    """A line turned into a row; ``group_id`` is assigned later from ``stamp`` (stateful)."""

    project: str
    chosen_name: str
    stamp: str
    values: dict[str, Any]  # every canonical column except group_id
    notes: tuple[Note, ...] = ()


Outcome = Converted | Rejected


@dataclass(frozen=True, slots=True)
class CsvLayout:
    """What the header of one legacy CSV says about its lines."""

    format: str
    header: tuple[str, ...]
    index: dict[str, int]
    block_start: int | None = None  # crop logs: position of image_0_path
    has_coords: bool = False

    def get(self, fields: Sequence[str], name: str) -> str | None:
        pos = self.index.get(name)
        return fields[pos] if pos is not None and pos < len(fields) else None


@dataclass(frozen=True, slots=True)
class ConvertContext:
    project_from: ProjectFrom = "folder"
    project: str | None = None
    windows: tuple[Window, ...] = ()
    full_frame_tolerance: float = 0.001
    size_lookup: SizeLookup = field(default=lambda project, name: None)
