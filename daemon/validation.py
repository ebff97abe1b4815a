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

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from daemon.codes import SEVERITY
from daemon.decisions.checks import (
    HEAD_CHARS,
    CheckContext,
    safe_repr,
)
from daemon.decisions.reader import SourceReader
from daemon.decisions.schema import REQUIRED_COLUMNS, is_live_db_name, project_name_from_db
from daemon.errors import SchemaError, SourceBusyError, StoreError, StoreRebuiltError
from daemon.records import Issue, ProjectResult, SchemaReport
from daemon.row_pass import RowPass
from daemon.row_pass import row_digest as row_digest  # re-exported: training's one definition
from daemon.settings import Settings
from daemon.store.db import SCHEMA_KEY, Checkpoint, StateStore
from daemon.timeparse import iso_utc, parse_timestamp

log = structlog.get_logger("validation")

#: Bump when a rule changes: every row of every project is then checked again.
RULES_VERSION = 1
#: row_key of a project-level failure: apart from the schema issues, cleared by the next pass
PROJECT_KEY = "#project"


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
        run = RowPass(self.store, reader, project, db_file, ctx, now, v.chunk_rows, images,
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


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
