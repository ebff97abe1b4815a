"""The validation engine's tables in the state DB: per-project checkpoints (``projects``), what
is remembered of each source row (``row_state``), the issues found (``issues``) and small facts
(``meta``).

Split from :mod:`daemon.store.db`, which owns the connection, its transactions and healing;
:class:`RowTables` is the part of :class:`~daemon.store.db.StateStore` that knows these tables,
so callers keep asking the store itself (``store.checkpoint(p)``, ``store.upsert_rows(...)``).
This room knows tables, not rules: the validation engine decides what to write.  Writers run
inside the store's :meth:`~daemon.store.db.StateStore.transaction`, with the results they cover.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from daemon.records import Issue
from daemon.store.chunks import in_chunks
from daemon.timeparse import iso_utc


@dataclass(frozen=True, slots=True)
class Checkpoint:
    project: str
    db_path: str
    db_inode: int | None
    schema_kind: str
    schema_fingerprint: str
    rules_version: int
    max_rowid: int
    row_count: int
    probes: tuple[tuple[int, str | None], ...]
    last_checked_at: str | None
    last_full_at: str | None
    needs_full: bool


@dataclass(frozen=True, slots=True)
class RowState:
    """What the store remembers of one source row."""

    row_key: str
    group_id: str | None
    src_rowid: int
    digest: int
    errors: int
    warnings: int
    user_action: str | None
    pending_crop: bool


class RowTables:
    """The checkpoint, row-state, issue and meta tables, over the store's connection."""

    @property
    def conn(self) -> sqlite3.Connection:
        """The store's connection (:class:`~daemon.store.db.StateStore` provides it)."""
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, project: str) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT project, db_path, db_inode, schema_kind, schema_fingerprint, rules_version, "
            "max_rowid, row_count, probes, last_checked_at, last_full_at, needs_full "
            "FROM projects WHERE project = ?",
            (project,),
        ).fetchone()
        if row is None:
            return None
        return Checkpoint(
            project=row[0], db_path=row[1], db_inode=row[2], schema_kind=row[3],
            schema_fingerprint=row[4], rules_version=row[5], max_rowid=row[6], row_count=row[7],
            probes=tuple((int(p[0]), p[1]) for p in json.loads(row[8])),
            last_checked_at=row[9], last_full_at=row[10], needs_full=bool(row[11]),
        )

    def checkpoints(self) -> list[Checkpoint]:
        names = [r[0] for r in self.conn.execute("SELECT project FROM projects ORDER BY project")]
        return [cp for n in names if (cp := self.checkpoint(n)) is not None]

    def put_checkpoint(self, cp: Checkpoint) -> None:
        """Must run inside :meth:`transaction`, together with the results it covers."""
        self.conn.execute(
            "INSERT OR REPLACE INTO projects (project, db_path, db_inode, schema_kind, "
            "schema_fingerprint, rules_version, max_rowid, row_count, probes, last_checked_at, "
            "last_full_at, needs_full) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (cp.project, cp.db_path, cp.db_inode, cp.schema_kind, cp.schema_fingerprint,
             cp.rules_version, cp.max_rowid, cp.row_count, json.dumps(cp.probes),
             cp.last_checked_at, cp.last_full_at, int(cp.needs_full)),
        )

    # -- rows -----------------------------------------------------------------------------------

    def row_states(self, project: str, keys: Iterable[str]) -> dict[str, RowState]:
        out: dict[str, RowState] = {}
        for part, marks in in_chunks(keys):
            for r in self.conn.execute(
                "SELECT row_key, group_id, src_rowid, digest, errors, warnings, user_action, "
                f"pending_crop FROM row_state WHERE project = ? AND row_key IN ({marks})",
                (project, *part),
            ):
                out[r[0]] = RowState(
                    row_key=r[0], group_id=r[1], src_rowid=r[2], digest=r[3], errors=r[4],
                    warnings=r[5], user_action=r[6], pending_crop=bool(r[7]),
                )
        return out

    def all_digests(self, project: str) -> dict[str, tuple[int, int]]:
        """``row_key -> (digest, src_rowid)`` for a full reconcile."""
        return {
            r[0]: (r[1], r[2])
            for r in self.conn.execute(
                "SELECT row_key, digest, src_rowid FROM row_state WHERE project = ?", (project,)
            )
        }

    def pending_crops(self, project: str) -> list[tuple[str, str | None, int]]:
        """``(row_key, group_id, src_rowid)`` of rows still waiting for their final crop."""
        return [
            (r[0], r[1], r[2])
            for r in self.conn.execute(
                # the planner prefers the primary key without ANALYZE stats; the partial index
                # holds only pending rows, so this stays small however large the project grows
                "SELECT row_key, group_id, src_rowid FROM row_state INDEXED BY row_state_pending "
                "WHERE project = ? AND pending_crop = 1",
                (project,),
            )
        ]

    def upsert_rows(self, project: str, rows: Sequence[tuple[Any, ...]], now: datetime) -> None:
        """``rows``: ``(row_key, group_id, src_rowid, digest, errors, warnings, user_action,
        pending_crop)``."""
        stamp = iso_utc(now)
        self.conn.executemany(
            "INSERT OR REPLACE INTO row_state (project, row_key, group_id, src_rowid, digest, "
            "errors, warnings, user_action, pending_crop, checked_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(project, *r, stamp) for r in rows],
        )

    def move_rows(self, project: str, moves: Sequence[tuple[int, str]]) -> None:
        """Record new source rowids of unchanged rows (``(src_rowid, row_key)``)."""
        self.conn.executemany(
            "UPDATE row_state SET src_rowid = ? WHERE project = ? AND row_key = ?",
            [(rowid, project, key) for rowid, key in moves],
        )

    def delete_rows(self, project: str, keys: Sequence[str]) -> None:
        for part, marks in in_chunks(keys):
            self.conn.execute(
                f"DELETE FROM row_state WHERE project = ? AND row_key IN ({marks})",
                (project, *part),
            )
            self.conn.execute(
                f"DELETE FROM issues WHERE project = ? AND row_key IN ({marks})",
                (project, *part),
            )

    # -- issues ---------------------------------------------------------------------------------

    def replace_issues(
        self, project: str, keys: Sequence[str], issues: Sequence[tuple[str, Issue]],
        now: datetime,
    ) -> None:
        """Drop the current issues of ``keys`` and insert ``issues`` (``(row_key, issue)``)."""
        for part, marks in in_chunks(keys):
            self.conn.execute(
                f"DELETE FROM issues WHERE project = ? AND row_key IN ({marks})",
                (project, *part),
            )
        self.insert_issues(issues, now)

    def insert_issues(self, issues: Sequence[tuple[str, Issue]], now: datetime) -> None:
        stamp = iso_utc(now)
        self.conn.executemany(
            "INSERT INTO issues (project, row_key, db_file, group_id, src_rowid, code, severity, "
            "field, value_repr, message, seen_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(i.project, key, i.db_file, i.group_id, i.rowid, i.code, i.severity, i.field,
              i.value_repr, i.message, stamp) for key, i in issues],
        )

    def issues(
        self, project: str | None = None, *, severity: str | None = None,
        limit: int | None = None,
    ) -> list[Issue]:
        sql = ("SELECT code, severity, project, db_file, group_id, src_rowid, field, value_repr, "
               "message FROM issues WHERE 1=1")
        params: list[Any] = []
        if project is not None:
            sql += " AND project = ?"
            params.append(project)
        if severity is not None:
            sql += " AND severity = ?"
            params.append(severity)
        sql += " ORDER BY project, row_key = '#schema' DESC, src_rowid, code, field"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [Issue(*r) for r in self.conn.execute(sql, params)]

    def issue_counts(self, project: str) -> dict[str, int]:
        return dict(self.conn.execute(
            "SELECT severity, count(*) FROM issues WHERE project = ? GROUP BY severity",
            (project,),
        ).fetchall())

    def issue_codes(self, project: str | None = None) -> dict[str, int]:
        if project is None:
            rows = self.conn.execute("SELECT code, count(*) FROM issues GROUP BY code")
        else:
            rows = self.conn.execute(
                "SELECT code, count(*) FROM issues WHERE project = ? GROUP BY code", (project,)
            )
        return dict(rows.fetchall())

    def row_figures(self, project: str) -> dict[str, int]:
        r = self.conn.execute(
            "SELECT count(*), coalesce(sum(errors > 0), 0), coalesce(sum(warnings > 0), 0), "
            "coalesce(sum(pending_crop), 0) FROM row_state WHERE project = ?",
            (project,),
        ).fetchone()
        return {"validated": r[0], "rows_with_errors": r[1], "rows_with_warnings": r[2],
                "pending_crops": r[3]}

    def other_projects_with(
        self, group_ids: Iterable[str]
    ) -> dict[str, list[tuple[str, str, int]]]:
        """``group_id -> [(project, row_key, src_rowid), ...]`` for ids held by 2+ projects."""
        shared: list[str] = []
        for part, marks in in_chunks(group_ids):
            # aggregate in SQL: the usual answer is "none", and no row crosses into Python
            shared.extend(r[0] for r in self.conn.execute(
                f"SELECT group_id FROM row_state WHERE group_id IN ({marks}) "
                "GROUP BY group_id HAVING count(DISTINCT project) > 1", part))
        found: dict[str, list[tuple[str, str, int]]] = {}
        for part, marks in in_chunks(shared):
            for gid, project, key, rowid in self.conn.execute(
                "SELECT group_id, project, row_key, src_rowid FROM row_state "
                f"WHERE group_id IN ({marks}) ORDER BY group_id, project",
                part,
            ):
                found.setdefault(gid, []).append((project, key, rowid))
        return found

    def delete_issues_by_code(self, code: str, group_ids: Iterable[str]) -> None:
        for part, marks in in_chunks(group_ids):
            self.conn.execute(
                f"DELETE FROM issues WHERE code = ? AND group_id IN ({marks})", (code, *part)
            )

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
