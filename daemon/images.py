"""Image files: stage parsing, safe opening, and the per-project image index in the state DB.

File names look like ``YYYYMMDD_HHMMSS_<stage>.png``; the stage decides the "always highest
stage" baseline, so it is parsed in exactly one place.  Every read of a file in an image root
goes through :func:`daemon.files.open_regular`: a FIFO named ``x.png`` would block a plain
``open()`` forever.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.files import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from daemon.store.db import StateStore

#: Stage name -> its numeric rank, in workflow order.
STAGES: dict[str, float] = {
    "stage1_generated": 1.0,
    "stage1.5_face_swapped": 1.5,
    "stage2_upscaled": 2.0,
    "stage3_enhanced": 3.0,
}
_STAGE_RE = re.compile(r"(stage1_generated|stage1\.5_face_swapped|stage2_upscaled|stage3_enhanced)")


def parse_stage(file_name: str) -> float | None:
    """The stage rank encoded in a file name, or None for an unknown stage."""
    # fast path for the canonical ``YYYYMMDD_HHMMSS_<stage>.<ext>`` (16-char prefix): this runs
    # for every image of every row in a full validation
    rank = STAGES.get(file_name[16 : file_name.rfind(".")])
    if rank is not None:
        return rank
    m = _STAGE_RE.search(file_name)
    return STAGES[m.group(1)] if m else None


# -- the image index ---------------------------------------------------------------------------


def iter_files(root: Path, suffixes: frozenset[str]) -> Iterator[Path]:
    """Files under ``root`` with one of ``suffixes`` (lower case), recursively.  Folder names
    contain spaces; an unreadable folder (permissions, a symlink loop) is skipped, never an
    exception: the next reconcile sees it again once it is readable."""
    for folder, dirs, files in os.walk(root, onerror=lambda exc: None):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                yield Path(folder) / name


def iter_image_files(root: Path) -> Iterator[Path]:
    return iter_files(root, IMAGE_SUFFIXES)


class ImageIndex:
    """Per project: file name -> current path(s), in the state DB table ``images``.

    Updated from watcher events (one path at a time) and from the reconcile (whole roots).  A
    file that disappears is marked gone, never forgotten: its embedding outlives it.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def observe(self, project: str, path: Path, now: datetime) -> str:
        """Look at one path; returns ``new``, ``changed``, ``unchanged`` or ``gone``."""
        repo = self.store.images
        row = repo.seen(project, str(path))
        try:
            st = path.stat()
        except OSError:
            if row is not None and row.gone_at is None:
                repo.mark_gone(project, [str(path)], now)
                return "gone"
            return "unchanged"
        if row is not None and (row.size, row.mtime_ns) == (st.st_size, st.st_mtime_ns) \
                and not row.gone_at:
            return "unchanged"
        repo.upsert_seen(project, str(path), path.name, st.st_size, st.st_mtime_ns,
                         parse_stage(path.name), now)
        return "new" if row is None else "changed"

    def scan(self, project: str, roots: list[Path], now: datetime,
             progress: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Reconcile the index with the files under ``roots``; ``progress`` is called per file
        (a walk of a large root is long, and it is work moving)."""
        counts = {"new": 0, "changed": 0, "unchanged": 0, "gone": 0}
        seen: set[str] = set()
        with self.store.transaction():
            for root in roots:
                for path in iter_image_files(root):
                    seen.add(str(path))
                    counts[self.observe(project, path, now)] += 1
                    progress()
            stale = [p for p in self.store.images.present_paths(project)
                     if p not in seen and any(p.startswith(str(root) + os.sep) for root in roots)]
            self.store.images.mark_gone(project, stale, now)
            counts["gone"] += len(stale)
        return counts

    def present(self, project: str | None = None) -> list[tuple[str, str, Path]]:
        """``(project, file_name, path)`` of every image currently on disk."""
        return [(i.project, i.file_name, Path(i.path))
                for i in self.store.images.present(project)]
