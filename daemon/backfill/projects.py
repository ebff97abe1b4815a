"""Which project a legacy line belongs to: bare file names from logged paths, the project a
path names (data contract section 5, ``Documents/BACKFILL.md``), and ``--window`` date ranges.

Split from :mod:`daemon.backfill.convert` (which turns one line into one row): these rules are
shared by the conversion and the CLI's argument checks.  Pure: no I/O and no clock.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from daemon.files import DELETE_STAGING_FOLDERS
from daemon.timeparse import parse_timestamp

ProjectFrom = Literal["fixed", "folder", "window"]
#: Workflow folders relative to a project's image root (data contract section 2): never a project.
WORKFLOW_FOLDERS = frozenset({
    "crop", "crop_auto", "crop_cropped", "cropped", "selected",
    "__crop", "__crop_auto", "__cropped", "__selected", *DELETE_STAGING_FOLDERS,
})
PROJECT_MARKER = "training data"
PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True, slots=True)
class Window:
    """Lines whose log timestamp lies in ``[start, end)`` belong to ``project``."""

    project: str
    start: datetime
    end: datetime


def _parts(raw: str) -> list[str]:
    return [p for p in raw.strip().replace("\\", "/").split("/") if p not in ("", ".")]


def bare_name(raw: str) -> str:
    """``PROJECT_ROOT/mojo1/a b.png`` -> ``a b.png``; spaces and unicode are kept."""
    parts = _parts(raw)
    return parts[-1].strip() if parts else ""


def project_from_path(raw: str) -> str | None:
    """The project a legacy path names, or None when the path does not say (see BACKFILL.md).

    After dropping ``PROJECT_ROOT/`` and everything up to the last ``training data/`` folder,
    the project is the first folder left, minus a ``_final`` suffix.  A path that starts with
    a workflow folder (``crop/``...) or an ``_`` folder, or an absolute path without a
    ``training data/`` folder, does not name its project.
    """
    text = raw.strip().replace("\\", "/")
    absolute = text.startswith("/") or bool(re.match(r"[A-Za-z]:/", text))
    folders = _parts(text)[:-1]
    if folders and folders[0] == "PROJECT_ROOT":
        folders, absolute = folders[1:], False
    marks = [i for i, f in enumerate(folders) if f.lower() == PROJECT_MARKER]
    if marks:
        folders = folders[marks[-1] + 1 :]
    elif absolute:
        return None
    if not folders:
        return None
    first = folders[0].strip()
    if first.lower() in WORKFLOW_FOLDERS or first.startswith("_"):
        return None
    if first.endswith("_final") and len(first) > len("_final"):
        first = first[: -len("_final")]
    return first if PROJECT_RE.match(first) else None


def parse_window(text: str) -> Window:
    """``mojo1=2025-10-04..2025-10-08``: whole UTC days, both ends included; full timestamps
    (any contract format) are exact instants, the end excluded.  Raises ValueError."""
    project, sep, span = text.partition("=")
    start_s, sep2, end_s = span.partition("..")
    project = project.strip()
    if not sep or not sep2 or not PROJECT_RE.match(project):
        raise ValueError(f"expected PROJECT=START..END, got {text!r}")
    start = _window_bound(start_s.strip(), end=False)
    end = _window_bound(end_s.strip(), end=True)
    if start is None or end is None:
        raise ValueError(f"window {text!r}: START and END must be YYYY-MM-DD or a timestamp")
    if end <= start:
        raise ValueError(f"window {text!r}: END is not after START")
    return Window(project, start, end)


def _window_bound(text: str, *, end: bool) -> datetime | None:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        moment = parse_timestamp(f"{text} 00:00:00")
        if moment is not None and end:
            moment += timedelta(days=1)
        return moment
    return parse_timestamp(text)


def overlapping_windows(windows: Sequence[Window]) -> tuple[Window, Window] | None:
    ordered = sorted(windows, key=lambda w: (w.start, w.end, w.project))
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            return a, b
    return None
