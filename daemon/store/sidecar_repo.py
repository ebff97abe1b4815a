"""The ``sidecars`` table: what the daemon knows of each ``.decision`` file it has seen.

Moved out of the pipeline (issue 11): the store owns its SQL, the sidecar stage
(:mod:`daemon.sidecar_record`) decides what to record.  Writers call these inside the store's
``transaction()``; nothing here opens one.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.store.db import StateStore


@dataclass(frozen=True, slots=True)
class SidecarRecord:
    """One row of ``sidecars``: a sidecar file as last seen (``kind`` None: unparseable)."""

    path: str
    project: str
    kind: str | None
    group_id: str | None
    project_id: str | None
    folder_role: str | None
    size: int | None
    mtime_ns: int | None


class SidecarRepo:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def known_paths(self, project: str) -> set[str]:
        """Sidecars of ``project`` not yet seen gone."""
        return {r[0] for r in self.store.conn.execute(
            "SELECT path FROM sidecars WHERE project = ? AND gone_at IS NULL", (project,))}

    def mark_gone(self, path: str, now_iso: str) -> None:
        self.store.conn.execute(
            "UPDATE sidecars SET gone_at = ? WHERE path = ? AND gone_at IS NULL", (now_iso, path))

    def project_of_group(self, group_id: str) -> str | None:
        """The project whose decision DB holds a row of ``group_id``, if any."""
        row = self.store.conn.execute(
            "SELECT project FROM row_state WHERE group_id = ? LIMIT 1", (group_id,)).fetchone()
        return str(row[0]) if row is not None else None

    def record(self, rec: SidecarRecord, seen_at: str) -> None:
        self.store.conn.execute(
            "INSERT OR REPLACE INTO sidecars (path, project, kind, group_id, project_id, "
            "folder_role, size, mtime_ns, seen_at, gone_at) VALUES (?,?,?,?,?,?,?,?,?,NULL)",
            (rec.path, rec.project, rec.kind, rec.group_id, rec.project_id, rec.folder_role,
             rec.size, rec.mtime_ns, seen_at))



