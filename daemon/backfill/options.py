"""What a backfill is asked to do and what it found: its options, its errors, its outcome.

Split from :mod:`daemon.backfill.run` so the CLI, the trigger and the report share these types
without the streaming machinery.  Also here: where outputs may go (:func:`check_output_path`),
since that rule is part of what the options promise.  Pure apart from resolving paths.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.backfill.convert import ProjectFrom, Window
from daemon.errors import DaemonError


class BackfillError(DaemonError):
    """The backfill cannot run as asked (bad arguments, unreadable CSV); nothing was written."""


class OutputPathError(BackfillError):
    """An output path lies outside the data root, or inside an image root or the decisions
    folder (after resolving symlinks); nothing was written."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"refusing to write {path}: {reason}")
        self.path = path


class OutputFailedError(BackfillError):
    """Writing an output DB failed (disk full, read-only folder); nothing was placed."""


class TargetExistsError(BackfillError):
    """A DB the backfill would create already exists; nothing was written or changed."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"refusing to overwrite existing file {path}: backfill only creates "
                         "new DBs; move it away or choose another --out")
        self.path = path


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """What to convert and where outputs may go.

    ``out_dir`` holds the default targets (``<out_dir>/<project>.db``).  When ``data_root`` is
    set, every output must resolve inside it; outputs never resolve inside ``forbidden_dirs``
    (the live decisions folder) or any image root (``image_roots``, ``project_image_roots``).
    """

    csv_paths: tuple[Path, ...]
    out_dir: Path
    execute: bool = False
    project: str | None = None
    project_from: ProjectFrom = "folder"
    windows: tuple[Window, ...] = ()
    image_roots: tuple[Path, ...] = ()
    project_image_roots: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    out: Path | None = None
    full_frame_tolerance: float = 0.001
    first_rows: int = 50
    data_root: Path | None = None
    forbidden_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class LineIssue:
    """A rejection (error) or a conversion note (warning) for one CSV line."""

    file: str
    line: int
    project: str | None
    code: str
    severity: str
    field: str | None
    value_repr: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileSummary:
    file: str
    format: str | None
    sha256: str = ""
    lines: int = 0
    converted: int = 0
    rejected: int = 0
    blank_lines: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackfillOutcome:
    """Everything the report needs; the issue lists stay in the scratch DB (see ``issues``)."""

    files: list[FileSummary] = field(default_factory=list)
    first_rows: list[dict[str, str]] = field(default_factory=list)
    by_action: Counter[str] = field(default_factory=Counter)
    by_project: Counter[str] = field(default_factory=Counter)
    by_project_action: dict[str, Counter[str]] = field(default_factory=dict)
    by_code: Counter[str] = field(default_factory=Counter)
    targets: dict[str, Path] = field(default_factory=dict)
    existing_targets: list[Path] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    scratch: sqlite3.Connection | None = None

    @property
    def converted(self) -> int:
        return sum(f.converted for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(f.rejected for f in self.files)

    def issues(self, severity: str, limit: int | None = None) -> Iterator[LineIssue]:
        if self.scratch is None:
            return
        sql = ("SELECT file, line, project, code, severity, field, value_repr, message "
               "FROM issues WHERE severity = ? ORDER BY seq")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.scratch.execute(sql, (severity,)):
            yield LineIssue(*row)


def target_for(opts: BackfillOptions, project: str) -> Path:
    """``--out``, else ``<out_dir>/<project>.db`` (the CLI's ``out_dir`` is
    ``<data_root>/backfill``: never the live decisions folder, which belongs to the reviewer)."""
    return opts.out if opts.out is not None else opts.out_dir / f"{project}.db"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_path(opts: BackfillOptions, path: Path) -> None:
    """Refuse (:class:`OutputPathError`) an output that, with every symlink resolved, lies
    outside the data root, or inside the decisions folder or an image root."""
    real = os.path.realpath(path)
    if opts.data_root is not None:
        root = os.path.realpath(opts.data_root)
        if not _within(real, root) or real == root:
            raise OutputPathError(path, f"it resolves to {real}, outside the data root {root}; "
                                        "backfill writes only inside the data root")
    forbidden = [(d, "the decisions folder (the reviewer's, read-only to trainingd): write "
                     "elsewhere, check the DB, then move it there as the reviewer's user")
                 for d in opts.forbidden_dirs]
    roots = {*opts.image_roots, *(r for rs in opts.project_image_roots.values() for r in rs)}
    forbidden += [(r, "an image root (the upstream's folder)") for r in sorted(roots)]
    for folder, what in forbidden:
        real_folder = os.path.realpath(folder)
        if _within(real, real_folder):
            raise OutputPathError(path, f"it resolves to {real}, inside {real_folder}, {what}")
