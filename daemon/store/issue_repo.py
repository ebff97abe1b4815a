"""Queries on the ``issues`` table that belong to one stage each, moved out of the pipeline
(issue 11): the image issues that heal once a file embeds, and the warnings the audit hook
has not yet seen.  Writers call these inside the store's ``transaction()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daemon.store.db import StateStore

IMAGE_KEY = "#image:"


@dataclass(frozen=True, slots=True)
class FlaggedRow:
    """A row flagged with a warning, as the audit hook receives it."""

    issue_id: int
    project: str
    group_id: str | None
    rowid: int
    code: str
    field: str | None
    value_repr: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IssueRepo:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def clear_healed_image_issues(self) -> None:
        """Drop image issues of files that have since embedded fine (their bytes changed).
        Reads the stage's verdict where the schema keeps it: ``embed_files`` before migration
        ``0005_images_merge_embed_files``, ``images.embed_status`` after it."""
        merged = self.store.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'embed_files'"
        ).fetchone() is None
        table, status = ("images", "embed_status") if merged else ("embed_files", "status")
        self.store.conn.execute(
            f"DELETE FROM issues WHERE row_key LIKE '#image:%' AND EXISTS (SELECT 1 FROM "
            f"{table} f WHERE f.project = issues.project AND f.{status} = 'ok' AND "
            f"'#image:' || f.path = issues.row_key)")

    def flagged_after(self, issue_id: int, limit: int) -> list[FlaggedRow]:
        """Warnings on source rows with an id above ``issue_id``, oldest first."""
        return [FlaggedRow(*r) for r in self.store.conn.execute(
            "SELECT id, project, group_id, src_rowid, code, field, value_repr, message "
            "FROM issues WHERE id > ? AND severity = 'warning' AND src_rowid IS NOT NULL "
            "ORDER BY id LIMIT ?", (issue_id, limit))]
