"""One validation pass over one open source DB: the rows it reads, checks and commits.

Split from :mod:`daemon.validation`, which decides *which* pass runs (incremental or a full
reconcile) and guards each project; this module is the row work of a pass.  Results and the
checkpoint that covers them are written in one transaction per chunk, under the state DB's
``generation`` read when the pass began (a heal in between stops the pass at its next write).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from daemon.codes import SEVERITY
from daemon.decisions.checks import (
    GROUP_ID,
    HEAD_CHARS,
    IMAGES,
    ROWID,
    USER_ACTION,
    CheckContext,
    check_row,
    finding_for_exception,
    is_pending_crop,
    safe_repr,
)
from daemon.decisions.reader import Row, SourceReader
from daemon.records import Finding, Issue
from daemon.store.db import Checkpoint, RowState, StateStore
from daemon.timeparse import iso_utc

log = structlog.get_logger("validation")

DUP_ACROSS = "group_id_duplicate_across_projects"
#: a first sight of a big DB is backlog anyway: no need to remember all of its names
MAX_COLLECTED_IMAGES = 50_000


def row_digest(row: Row) -> int:
    """A stable 63-bit digest of a row's values (rowid excluded: VACUUM may renumber it)."""
    raw = hashlib.blake2b(repr(row[1:]).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big", signed=True)


def gid_key(row: Row) -> str:
    gid = row[GROUP_ID]
    return gid if isinstance(gid, str) and gid.strip() else f"#rowid:{row[ROWID]}"


@dataclass
class Tally:
    read: int = 0
    checked: int = 0
    deleted: int = 0


class RowPass:
    """One validation pass over one open source DB."""

    def __init__(self, store: StateStore, reader: SourceReader, project: str, db_file: str,
                 ctx: CheckContext, now: datetime, chunk_rows: int,
                 images: set[str] | None = None, *,
                 progress: Callable[[], None] | None = None, generation: int | None = None
                 ) -> None:
        self.store, self.reader, self.project, self.db_file = store, reader, project, db_file
        self.generation = generation
        self.progress = progress
        self.ctx, self.now, self.chunk_rows = ctx, now, chunk_rows
        self.images = images
        self.unique = reader.schema.group_id_unique
        self.tally = Tally()
        # one line per checked row only when debugging (tests use it to prove "once per content")
        self.trace = logging.getLogger("validation").isEnabledFor(logging.DEBUG)

    # -- the two passes -------------------------------------------------------------------------

    def incremental(self, cp: Checkpoint, upto: int, hints: Iterable[str]) -> Checkpoint:
        first_sight = cp.max_rowid == 0 and cp.row_count == 0
        done: set[str] = set()
        for chunk in self.reader.iter_rows(cp.max_rowid, upto, self.chunk_rows):
            keyed, added = self._key_new_rows(chunk)
            known = self.store.row_states(self.project, [k for k, _ in keyed])
            cp = replace(cp, max_rowid=int(chunk[-1][ROWID]), row_count=cp.row_count + added)
            self._apply(keyed, known, force=False, checkpoint=cp)
            done.update(k for k, _ in keyed)
        # rows that change in place: crops still waiting for their final box, and hinted groups
        pending = [p for p in self.store.pending_crops(self.project) if p[0] not in done]
        hinted = [h for h in hints if h not in done]
        if pending or hinted:
            if self.unique:
                gids = {gid for _, gid, _ in pending if gid is not None} | set(hinted)
                rows = self.reader.rows_by_group_id(sorted(gids))
            else:
                rows = self.reader.rows_by_rowid(sorted({r for _, _, r in pending}))
            keyed = [(gid_key(r), r) for r in rows if r[ROWID] <= upto]
            known = self.store.row_states(self.project, [k for k, _ in keyed])
            self._apply(keyed, known, force=False, checkpoint=cp)
        if first_sight:
            cp = replace(cp, last_full_at=iso_utc(self.now))
        return cp

    def full(self, cp: Checkpoint, upto: int, *, force: bool) -> Checkpoint:
        known = self.store.all_digests(self.project)
        seen: set[str] = set()
        marker = replace(cp, needs_full=True)
        for chunk in self.reader.iter_rows(0, upto, self.chunk_rows):
            keyed: list[tuple[str, Row]] = []
            for row in chunk:
                key = gid_key(row)
                if key in seen:  # a second row with the same group_id (no PK): keep it apart
                    key = f"#rowid:{row[ROWID]}"
                seen.add(key)
                keyed.append((key, row))
            states = {k: RowState(k, None, known[k][1], known[k][0], 0, 0, None, False)
                      for k, _ in keyed if k in known}
            self._apply(keyed, states, force=force, checkpoint=marker)
        gone = sorted(set(known) - seen)
        with self.store.transaction(generation=self.generation):
            if gone:
                gids = [g for g in gone if not g.startswith("#")]
                self.store.delete_rows(self.project, gone)
                self._refresh_cross_project(gids)
                self.tally.deleted += len(gone)
                log.info("validation.rows_deleted", project=self.project, rows=len(gone),
                         sample=gone[:5])
            cp = replace(cp, max_rowid=upto, row_count=len(seen), needs_full=False,
                         last_full_at=iso_utc(self.now))
            self.store.put_checkpoint(cp)
        return cp

    # -- helpers --------------------------------------------------------------------------------

    def _key_new_rows(self, chunk: list[Row]) -> tuple[list[tuple[str, Row]], int]:
        """Keys for rows above the watermark and how many of them are rows the store did not
        hold before.  A known group_id at a new rowid is the same row re-inserted (INSERT OR
        REPLACE) unless the DB allows duplicates and the old rowid still holds it."""
        keys = [gid_key(r) for r in chunk]
        known = self.store.row_states(self.project, keys)
        moved_from = {k: s.src_rowid for k, s in known.items()}
        still_there: dict[int, Any] = {}
        if not self.unique and moved_from:
            still_there = self.reader.group_ids_at(sorted(set(moved_from.values())))
        keyed, added, taken = [], 0, set()
        for key, row in zip(keys, chunk, strict=True):
            if key in taken or (not self.unique and key in moved_from
                                and still_there.get(moved_from[key]) == key):
                key = f"#rowid:{row[ROWID]}"
            taken.add(key)
            if key not in known:
                added += 1
            keyed.append((key, row))
        return keyed, added

    def _apply(self, keyed: list[tuple[str, Row]], known: dict[str, RowState], *, force: bool,
               checkpoint: Checkpoint) -> None:
        """Check the rows whose digest changed and commit results + checkpoint together."""
        if self.progress is not None:
            self.progress()
        upserts: list[tuple[Any, ...]] = []
        issues: list[tuple[str, Issue]] = []
        moves: list[tuple[int, str]] = []
        checked_keys: list[str] = []
        self.tally.read += len(keyed)
        for key, row in keyed:
            digest = row_digest(row)
            prev = known.get(key)
            if prev is not None and prev.digest == digest and not force:
                if prev.src_rowid != row[ROWID]:
                    moves.append((int(row[ROWID]), key))
                continue
            findings = self._check(key, row)
            if self.trace:
                log.debug("validation.row_checked", project=self.project, group_id=key,
                          digest=digest, rowid=row[ROWID])
            gid_raw = row[GROUP_ID]
            if key.startswith("#rowid:") and isinstance(gid_raw, str) and gid_raw.strip():
                findings.append(Finding("group_id_duplicate", "group_id", repr(row[GROUP_ID]),
                                        "another row of this DB has the same group_id; "
                                        "this later copy is excluded from training"))
            errors = warnings = 0
            gid = row[GROUP_ID] if isinstance(row[GROUP_ID], str) else None
            for f in findings:
                sev = SEVERITY.get(f.code, "error")
                if sev == "error":
                    errors += 1
                else:
                    warnings += 1
                issues.append((key, Issue(f.code, sev, self.project, self.db_file, gid,
                                          int(row[ROWID]), f.field, f.value_repr, f.message)))
            action = row[USER_ACTION] if isinstance(row[USER_ACTION], str) else None
            upserts.append((key, gid, int(row[ROWID]), digest, errors, warnings, action,
                            int(is_pending_crop(row))))
            checked_keys.append(key)
        self.tally.checked += len(checked_keys)
        with self.store.transaction(generation=self.generation):
            if upserts:
                self.store.upsert_rows(self.project, upserts, self.now)
                # only rows the store held before can have issues to replace
                self.store.replace_issues(self.project, [k for k in checked_keys if k in known],
                                          issues, self.now)
                self._refresh_cross_project([k for k in checked_keys if not k.startswith("#")])
            if moves:
                self.store.move_rows(self.project, moves)
            # the checkpoint advances in the same transaction as the results it covers
            self.store.put_checkpoint(checkpoint)

    def _check(self, key: str, row: Row) -> list[Finding]:
        """The row's findings; whatever a value makes a check raise becomes one more finding
        on this row, so the chunk (and its checkpoint) goes on past it."""
        try:
            findings = check_row(row, self.ctx)
        except Exception as exc:
            finding = finding_for_exception(exc)
            log.error("validation.row_check_failed", project=self.project, group_id=key,
                      rowid=row[ROWID], code=finding.code, error_type=type(exc).__name__,
                      error=safe_repr(str(exc), HEAD_CHARS),
                      exc_info=exc if finding.code == "row_check_failed" else None)
            findings = [finding]
        if self.images is not None and len(self.images) < MAX_COLLECTED_IMAGES:
            self._collect_images(row[IMAGES])
        return findings

    def _collect_images(self, raw: object) -> None:
        assert self.images is not None
        try:
            names = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            return  # reported by the checks
        if isinstance(names, list):
            self.images.update(n for n in names if isinstance(n, str))

    def _refresh_cross_project(self, group_ids: list[str]) -> None:
        if not group_ids:
            return
        dups = self.store.other_projects_with(group_ids)
        self.store.delete_issues_by_code(DUP_ACROSS, group_ids)
        if not dups:
            return
        db_files = {cp.project: cp.db_path for cp in self.store.checkpoints()}
        db_files[self.project] = self.db_file
        found: list[tuple[str, Issue]] = []
        for gid, holders in dups.items():
            projects = sorted({p for p, _, _ in holders})
            for project, key, rowid in holders:
                others = ", ".join(p for p in projects if p != project)
                found.append((key, Issue(
                    DUP_ACROSS, SEVERITY[DUP_ACROSS], project, db_files.get(project, "?"), gid,
                    rowid, "group_id", repr(gid), f"group_id is also used in project(s) {others}",
                )))
        self.store.insert_issues(found, self.now)
