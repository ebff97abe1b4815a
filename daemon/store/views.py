"""Read-only figures over validation's tables for ``status``, ``/metrics`` and the summary.

Each answer is aggregated in SQL (no row crosses into Python that a count could replace) and
comes back as plain counts or frozen records.  Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.store.db import StateStore


@dataclass(frozen=True, slots=True)
class RowIssue:
    """One current finding about a source row (not about a schema, sidecar or image)."""

    project: str
    row_key: str
    group_id: str | None
    src_rowid: int
    code: str
    severity: str


class Figures:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    def issue_tally(self) -> dict[tuple[str, str, str], int]:
        """``(project, code, severity) -> current issues``."""
        return {(str(p), str(c), str(s)): int(n) for p, c, s, n in self._store.conn.execute(
            "SELECT project, code, severity, count(*) FROM issues GROUP BY 1, 2, 3")}

    def issues_by_code(self) -> list[tuple[str, str, int]]:
        """``(code, severity, n)`` over every project, by code."""
        return [(str(c), str(s), int(n)) for c, s, n in self._store.conn.execute(
            "SELECT code, severity, count(*) FROM issues GROUP BY 1, 2 ORDER BY 1")]

    def row_issues(self) -> list[RowIssue]:
        """Findings about source rows, errors first, each in the order it was found."""
        return [RowIssue(*r) for r in self._store.conn.execute(
            "SELECT project, row_key, group_id, src_rowid, code, severity FROM issues "
            "WHERE src_rowid IS NOT NULL AND row_key NOT LIKE '#schema%' "
            "AND row_key NOT LIKE '#sidecar:%' AND row_key NOT LIKE '#image:%' "
            "ORDER BY severity = 'error' DESC, id")]

    def rows_per_project(self) -> dict[str, int]:
        return {str(p): int(n) for p, n in self._store.conn.execute(
            "SELECT project, count(*) FROM row_state GROUP BY 1")}

    def validated_projects(self) -> list[str]:
        return [str(r[0]) for r in self._store.conn.execute(
            "SELECT DISTINCT project FROM row_state ORDER BY 1")]

    def last_validated(self) -> str | None:
        value = self._store.conn.execute("SELECT max(last_checked_at) FROM projects"
                                         ).fetchone()[0]
        return None if value is None else str(value)
