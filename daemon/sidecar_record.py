"""Recording ``.decision`` sidecars: parse each named file, link it to its row and image,
remember it in the state DB, and say which rows it names (they are re-checked).

Moved out of the pipeline (issue 11): the pipeline only orders this after a catch-up
validation; parsing rules live in :mod:`daemon.sidecars`, the table in
:mod:`daemon.store.sidecar_repo`.  A sidecar that cannot be parsed, or whose row, project or
image does not match, becomes an issue record keyed by its path; nothing here raises for bad
input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from daemon import sidecars as sc
from daemon.files import ImagesBeside
from daemon.records import Issue
from daemon.store.db import StateStore
from daemon.store.sidecar_repo import SidecarRecord, SidecarRepo
from daemon.tasks import SidecarsRecorded
from daemon.timeparse import iso_utc

SIDECAR_KEY = "#sidecar:"


@dataclass(frozen=True, slots=True)
class SidecarPass:
    """What one pass recorded, and the rows (project -> group ids) to validate again."""

    stats: SidecarsRecorded
    recheck: dict[str, frozenset[str]] = field(default_factory=dict)


def record_sidecars(store: StateStore, project: str, paths: Iterable[str], roots: list[Path],
                    now: datetime, beat: Callable[[str], None] = lambda note: None
                    ) -> SidecarPass:
    """Parse, record and link the sidecars at ``paths`` in one transaction."""
    repo = SidecarRepo(store)
    hints: dict[str, set[str]] = {}
    parsed_n = gone = issues_n = 0
    seen_at = iso_utc(now)
    images = ImagesBeside()  # one per pass: each folder listed at most once
    with store.transaction():
        for raw in sorted(paths):
            beat(f"sidecar {raw}")
            path = Path(raw)
            root = next((r for r in roots if r == path or r in path.parents), None)
            key = SIDECAR_KEY + raw
            # a FIFO, a folder or a link named *.decision is not "gone": parse_sidecar
            # turns it into sidecar_unreadable (it opens regular files only)
            if root is None or not os.path.lexists(path):
                repo.mark_gone(raw, seen_at)
                store.replace_issues(project, [key], [], now)
                gone += 1
                continue
            issues, rec, group = _examine(repo, project, raw, root, images)
            if group is not None:
                hints.setdefault(group[0], set()).add(group[1])
            repo.record(rec, seen_at)
            store.replace_issues(project, [key], [(key, i) for i in issues], now)
            parsed_n += 1
            issues_n += len(issues)
    return SidecarPass(SidecarsRecorded(parsed_n, gone, issues_n),
                       {p: frozenset(g) for p, g in hints.items()})


def _examine(repo: SidecarRepo, project: str, raw: str, root: Path, images: ImagesBeside
             ) -> tuple[list[Issue], SidecarRecord, tuple[str, str] | None]:
    """The sidecar's issues, its record, and (project, group id) of the row it names."""
    path = Path(raw)
    parsed = sc.parse_sidecar(path, project=project, image_root=root)
    size: int | None = None
    mtime_ns: int | None = None
    with contextlib.suppress(OSError):  # vanished since: the next scan says so
        st = os.lstat(path)
        size, mtime_ns = st.st_size, st.st_mtime_ns
    if isinstance(parsed, Issue):
        return [parsed], SidecarRecord(raw, project, None, None, None,
                                       sc.folder_role(path, root), size, mtime_ns), None
    row_project = repo.project_of_group(parsed.group_id)
    # any suffix case (x.Png too), each folder listed once per pass: 10,000 orphan sidecars
    # in one folder once made each pass quadratic (minutes)
    image_present = images.find(path.parent, parsed.image_stem) is not None
    issues = list(sc.check_sidecar_link(
        parsed, row_exists=row_project is not None, row_project=row_project,
        image_present=image_present, expected_project=project))
    rec = SidecarRecord(raw, project, parsed.kind, parsed.group_id, parsed.project_id,
                        parsed.folder_role, size, mtime_ns)
    group = (row_project, parsed.group_id) if row_project is not None else None
    return issues, rec, group
