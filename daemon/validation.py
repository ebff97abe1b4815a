"""Incremental validation of decision DBs against the state DB's checkpoints.

Per project the state DB keeps a checkpoint (rowid watermark, row count, probe rows, schema
fingerprint, rules version) and a digest per row, so a run reads only rows that are new
(rowid above the watermark) or likely to have changed (crop rows still waiting for their final
box, and rows named by a hint such as a sidecar event).  The rowid watermark is only a shortcut:
a full reconcile (every row's digest compared) runs whenever the count, the max rowid, a probe
row, the file's inode, the schema or the rules version say the shortcut cannot be trusted, when
the last one is older than ``validation.full_reconcile_minutes``, and on request.

Results and checkpoint are written in one transaction per chunk: a crash replays the chunk and
the effect is the same (checks are pure, writes are upserts).  Source DBs are only read.

One bad thing never stops the rest: each row is checked inside its own guard (an exception
becomes an issue on that row and the checkpoint moves past it), and each project inside its
own (an unexpected failure becomes a ``project_check_failed`` issue, logged with its
traceback, and the next project is validated).  Only a failure of our own state DB
(:class:`~daemon.errors.StoreError`) propagates: no project can be validated without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
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
from daemon.decisions.schema import REQUIRED_COLUMNS, is_live_db_name, project_name_from_db
from daemon.errors import SchemaError, SourceBusyError, StoreError, StoreRebuiltError
from daemon.records import Finding, Issue, ProjectResult, SchemaReport
from daemon.settings import Settings
from daemon.store.db import SCHEMA_KEY, Checkpoint, RowState, StateStore
from daemon.timeparse import iso_utc, parse_timestamp

log = structlog.get_logger("validation")

#: Bump when a rule changes: every row of every project is then checked again.
RULES_VERSION = 1
DUP_ACROSS = "group_id_duplicate_across_projects"
#: row_key of a project-level failure: apart from the schema issues, cleared by the next pass
PROJECT_KEY = "#project"
#: a first sight of a big DB is backlog anyway: no need to remember all of its names
MAX_COLLECTED_IMAGES = 50_000


@dataclass(frozen=True, slots=True)
class ProjectSource:
    project: str
    db_path: Path


def discover_projects(settings: Settings) -> list[ProjectSource]:
    """Live project DBs: every ``*.db`` in the decisions folder that is not temp, backup or a
    SQLite side file, plus projects configured with an explicit ``db``."""
    found: dict[str, Path] = {}
    folder = settings.decisions_dir
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_live_db_name(path.name):
                found[project_name_from_db(path)] = path
    for name in settings.projects:
        found[name] = settings.project_db(name)
    return [ProjectSource(name, path) for name, path in sorted(found.items())]


def row_digest(row: Row) -> int:
    """A stable 63-bit digest of a row's values (rowid excluded: VACUUM may renumber it)."""
    raw = hashlib.blake2b(repr(row[1:]).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big", signed=True)


def _gid_key(row: Row) -> str:
    gid = row[GROUP_ID]
    return gid if isinstance(gid, str) and gid.strip() else f"#rowid:{row[ROWID]}"


def schema_issues(schema: SchemaReport, project: str, db_file: str) -> list[Issue]:
    """The schema findings of one DB as issue records (row fields empty)."""

    def mk(code: str, field: str | None, value: object, message: str) -> Issue:
        return Issue(code, SEVERITY[code], project, db_file, None, None, field, repr(value),
                     message)

    out: list[Issue] = []
    if schema.kind == "foreign":
        out.append(mk("db_not_decision_db", None, schema.detail,
                      "the file has no ai_decisions table; move it out of the decisions folder"))
        return out
    if not schema.has_rowid:
        out.append(mk("db_without_rowid", None, "WITHOUT ROWID",
                      "recreate the table with the canonical DDL"))
    for col in schema.missing_columns:
        if col in REQUIRED_COLUMNS:
            out.append(mk("schema_missing_column", col, None,
                          f"required column {col!r} is missing; its rule cannot be checked"))
        else:
            out.append(mk("schema_missing_optional_column", col, None,
                          f"nullable column {col!r} is missing (older or temp DB)"))
    for col in schema.extra_columns:
        out.append(mk("schema_extra_column", col, col, f"column {col!r} is not in the contract"))
    for col in schema.missing_checks:
        out.append(mk("schema_missing_check", col, None,
                      f"no CHECK constraint guards {col!r}; bad values can be written"))
    for name in schema.missing_indexes:
        out.append(mk("schema_missing_index", None, name, f"index {name!r} is missing"))
    for name in schema.missing_views:
        out.append(mk("schema_missing_view", None, name, f"view {name!r} is missing"))
    if not schema.group_id_unique:
        out.append(mk("schema_group_id_not_unique", "group_id", None,
                      "group_id is not the PRIMARY KEY; duplicates are possible"))
    return out


@dataclass
class _Tally:
    read: int = 0
    checked: int = 0
    deleted: int = 0


class Validator:
    """Validates projects into a :class:`StateStore`.  Single-threaded: one per worker."""

    def __init__(
        self,
        store: StateStore,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        collect_images: bool = False,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        #: called once per committed chunk: the daemon's health tick counts it as work moving,
        #: so a long full reconcile of a large DB is never mistaken for a stall
        self.progress = progress
        self.settings = settings
        self.clock = clock
        #: with ``collect_images``: project -> file names in the rows checked since the last
        #: :meth:`take_checked_images` (the daemon embeds those first; bounded per project)
        self.collect_images = collect_images
        self._checked_images: dict[str, set[str]] = {}

    def take_checked_images(self, project: str) -> set[str]:
        return self._checked_images.pop(project, set())

    # -- public ---------------------------------------------------------------------------------

    def validate_all(
        self, *, full: bool = False, only: Sequence[str] | None = None, verify: bool = False
    ) -> list[ProjectResult]:
        sources = discover_projects(self.settings)
        if only:
            wanted = set(only)
            sources = [s for s in sources if s.project in wanted]
        return [self.validate_project(s, full=full, verify=verify) for s in sources]

    def validate_project(
        self, source: ProjectSource, *, full: bool = False, hints: Iterable[str] = (),
        verify: bool = False,
    ) -> ProjectResult:
        """``verify`` (the reconcile pass): also prove the checkpoint covers exactly the rows the
        state DB holds for the project, and reconcile in full when it does not."""
        started = time.perf_counter()
        project, db_file = source.project, str(source.db_path)
        try:
            result = self._validate_source(source, full=full, hints=hints, verify=verify)
        except StoreRebuiltError as exc:
            # the heal queued a reconcile, which derives this project again from scratch
            log.warning("validation.pass_abandoned", project=project, db=db_file,
                        reason=str(exc), action="the reconcile queued by the heal redoes it")
            return ProjectResult(project, db_file, "skipped", "rebuilt", reason=str(exc))
        except StoreError:
            raise  # our own state DB: no project can be validated without it
        except Exception as exc:  # a bug met on this project's data: the next project goes on
            return self._failed(project, db_file, exc)
        if result.mode == "skipped":
            return result
        log.info(
            "validation.project_checked", project=project, db=db_file, mode=result.mode,
            schema=result.schema_kind, rows_total=result.rows_total, rows_read=result.rows_read,
            rows_checked=result.rows_checked, rows_deleted=result.rows_deleted,
            errors=result.errors, warnings=result.warnings, reason=result.reason,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    # -- engine ---------------------------------------------------------------------------------

    def _validate_source(
        self, source: ProjectSource, *, full: bool, hints: Iterable[str], verify: bool
    ) -> ProjectResult:
        project, db_file = source.project, str(source.db_path)
        if not os.path.lexists(source.db_path):
            return self._missing(project, db_file)
        s = self.settings.sources
        try:
            reader = SourceReader(source.db_path, busy_timeout_ms=s.busy_timeout_ms,
                                  busy_budget_seconds=s.busy_retry_seconds)
        except SourceBusyError as exc:
            log.warning("validation.source_busy", project=project, db=db_file, error=str(exc))
            return ProjectResult(project, db_file, "skipped", "busy", reason=str(exc))
        except SchemaError as exc:
            return self._unreadable(project, db_file, str(exc.__cause__ or exc))
        try:
            with reader:
                return self._validate_open(reader, project, db_file, full=full, hints=hints,
                                           verify=verify)
        except SourceBusyError as exc:
            log.warning("validation.source_busy", project=project, db=db_file, error=str(exc))
            return ProjectResult(project, db_file, "skipped", "busy", reason=str(exc))
        except SchemaError as exc:
            return self._unreadable(project, db_file, str(exc.__cause__ or exc))

    def _skipped(self, project: str, db_file: str, kind: str, reason: str) -> ProjectResult:
        counts = self.store.issue_counts(project)
        return ProjectResult(project, db_file, "skipped", kind, reason=reason,
                             errors=counts.get("error", 0), warnings=counts.get("warning", 0))

    def _failed(self, project: str, db_file: str, exc: Exception) -> ProjectResult:
        """An unexpected exception while validating one project: record, log, go on."""
        detail = f"{type(exc).__name__}: {exc}"
        log.error("validation.project_failed", project=project, db=db_file,
                  error_type=type(exc).__name__, error=safe_repr(str(exc), HEAD_CHARS),
                  exc_info=exc)
        issue = Issue("project_check_failed", SEVERITY["project_check_failed"], project, db_file,
                      None, None, None, safe_repr(detail, HEAD_CHARS),
                      "validating this project failed with an unexpected error (a bug in "
                      "trainingd); the other projects were validated: report the "
                      "validation.project_failed log event with its traceback")
        with self.store.transaction():
            self.store.replace_issues(project, [PROJECT_KEY], [(PROJECT_KEY, issue)],
                                      self.clock())
        return self._skipped(project, db_file, "failed", detail)

    def _missing(self, project: str, db_file: str) -> ProjectResult:
        """A configured project without a DB file: expected until the reviewer's first save.

        Reported once (one warning record, one log line at its first sight), not as an
        unreadable DB on every pass.  A DB that was validated before and is gone now is
        another matter: that one is ``db_unreadable``.
        """
        cp = self.store.checkpoint(project)
        if cp is not None and cp.last_checked_at is not None:
            return self._unreadable(
                project, db_file, "the DB file is gone",
                message=f"the DB file was validated at {cp.last_checked_at} and is gone now; "
                "restore it from a backup, or remove the project from the configuration")
        known = self.store.issue_codes(project).get("db_missing", 0) > 0
        issue = Issue("db_missing", SEVERITY["db_missing"], project, db_file, None, None, None,
                      repr(db_file),
                      "no DB file yet: it appears when the reviewer first saves in this project; "
                      "if it should exist, check paths.decisions_dir and the project's db "
                      "setting")
        if not known:
            with self.store.transaction():
                self.store.replace_issues(project, [SCHEMA_KEY], [(SCHEMA_KEY, issue)],
                                          self.clock())
            log.warning("validation.db_missing", project=project, db=db_file)
        else:
            log.debug("validation.db_still_missing", project=project, db=db_file)
        return self._skipped(project, db_file, "missing", "no DB file yet")

    def _unreadable(self, project: str, db_file: str, detail: str, *,
                    message: str = "the file cannot be read as SQLite; restore it from a backup"
                    ) -> ProjectResult:
        issue = Issue("db_unreadable", "error", project, db_file, None, None, None, repr(detail),
                      message)
        with self.store.transaction():
            self.store.replace_issues(project, [SCHEMA_KEY], [(SCHEMA_KEY, issue)], self.clock())
        log.error("validation.db_unreadable", project=project, db=db_file, error=detail)
        return self._skipped(project, db_file, "unreadable", detail)

    def _validate_open(
        self, reader: SourceReader, project: str, db_file: str, *, full: bool,
        hints: Iterable[str], verify: bool = False,
    ) -> ProjectResult:
        # everything this pass writes is derived from what it reads now: a heal of the state DB
        # in between (another thread) makes its next write raise StoreRebuiltError, so a stale
        # checkpoint never lands in the new DB above rows it never saw
        gen = self.store.generation
        now = self.clock()
        schema = reader.schema
        with self.store.transaction(generation=gen):
            # PROJECT_KEY: a failure of an earlier pass is over once a pass gets this far again
            self.store.replace_issues(
                project, [SCHEMA_KEY, PROJECT_KEY],
                [(SCHEMA_KEY, i) for i in schema_issues(schema, project, db_file)], now,
            )
        if not schema.readable or not schema.has_rowid:
            counts = self.store.issue_counts(project)
            return ProjectResult(project, db_file, "skipped", schema.kind,
                                 reason="not a readable v3 decision DB",
                                 errors=counts.get("error", 0), warnings=counts.get("warning", 0))

        v = self.settings.validation
        ctx = CheckContext(
            project=project, now=now, columns=frozenset(schema.columns),
            aspect_tolerance=v.aspect_tolerance, full_frame_tolerance=v.full_frame_tolerance,
            future_slack=timedelta(hours=v.future_slack_hours),
        )
        images = self._checked_images.setdefault(project, set()) if self.collect_images else None
        run = _Run(self.store, reader, project, db_file, ctx, now, v.chunk_rows, images,
                   progress=self.progress, generation=gen)
        cp = self.store.checkpoint(project)
        min_rowid, max_rowid, count = reader.snapshot()
        inode = _inode(reader.path)

        force = full or (cp is not None and (cp.rules_version != RULES_VERSION
                                             or cp.schema_fingerprint != schema.fingerprint))
        reason = self._reconcile_reason(cp, reader, inode, max_rowid, now, force)
        if reason is None and verify and cp is not None:
            held = self.store.row_figures(project)["validated"]
            if held != cp.row_count:
                reason = (f"the state DB holds {held} rows of this project but its checkpoint "
                          f"covers {cp.row_count}")
        base = Checkpoint(
            project=project, db_path=db_file, db_inode=inode, schema_kind=schema.kind,
            schema_fingerprint=schema.fingerprint, rules_version=RULES_VERSION,
            max_rowid=cp.max_rowid if cp else 0, row_count=cp.row_count if cp else 0,
            probes=cp.probes if cp else (), last_checked_at=cp.last_checked_at if cp else None,
            last_full_at=cp.last_full_at if cp else None, needs_full=False,
        )
        if reason is None:
            base = run.incremental(base, max_rowid, hints)
            if base.row_count != count:
                reason = f"row count {count} != expected {base.row_count} (rows deleted?)"
        mode = "incremental"
        if reason is not None:
            mode = "full"
            log.info("validation.reconcile_started", project=project, reason=reason,
                     recheck_all=force)
            base = run.full(base, max_rowid, force=force)
        probes = tuple(sorted(reader.group_ids_at([min_rowid, max_rowid]).items()))
        with self.store.transaction(generation=gen):
            self.store.put_checkpoint(replace(base, probes=probes, last_checked_at=iso_utc(now)))
        counts = self.store.issue_counts(project)
        return ProjectResult(
            project, db_file, mode, schema.kind, rows_total=count, rows_read=run.tally.read,
            rows_checked=run.tally.checked, rows_deleted=run.tally.deleted,
            errors=counts.get("error", 0), warnings=counts.get("warning", 0), reason=reason,
        )

    def _reconcile_reason(
        self, cp: Checkpoint | None, reader: SourceReader, inode: int | None, max_rowid: int,
        now: datetime, force: bool,
    ) -> str | None:
        if force:
            return "full check requested, or rules or schema changed"
        if cp is None:
            return None  # first sight: the incremental path from rowid 0 is a full check
        if cp.needs_full:
            return "an earlier reconcile did not finish"
        if cp.db_inode != inode:
            return "the DB file was replaced (inode changed)"
        if max_rowid < cp.max_rowid:
            return f"max(rowid) went down from {cp.max_rowid} to {max_rowid}"
        if cp.probes:
            current = reader.group_ids_at([r for r, _ in cp.probes])
            for rowid, gid in cp.probes:
                if current.get(rowid) != gid:
                    return f"rowid {rowid} no longer holds group {gid!r} (VACUUM or delete)"
        interval = self.settings.validation.full_reconcile_minutes
        last = parse_timestamp(cp.last_full_at) if cp.last_full_at else None
        if last is None or now - last >= timedelta(minutes=interval):
            return f"last full reconcile older than {interval:g} min"
        return None


class _Run:
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
        self.tally = _Tally()
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
            keyed = [(_gid_key(r), r) for r in rows if r[ROWID] <= upto]
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
                key = _gid_key(row)
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
        keys = [_gid_key(r) for r in chunk]
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


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
