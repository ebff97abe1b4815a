"""Access to the state DB.  One writer (the worker); every change in a ``BEGIN IMMEDIATE``
transaction; readers (``trainingd status``) open it read-only.

The state DB heals: everything in it is derived (from the source DBs, the vector cache's index,
the model registry's files), so a damaged one is never worth a stopped daemon.  The service opens
it with :meth:`StateStore.open_checked` (``PRAGMA quick_check``; a file that is not SQLite or
fails the check is moved aside as ``state.db.corrupt-<UTC time>`` with its ``-wal``/``-shm`` and
a new one is built), asks :meth:`StateStore.check_file` every health tick (the file at the path
is still the one we opened: a deleted or replaced state DB would otherwise take every write to
an unlinked inode), and calls :meth:`StateStore.heal` when it answers.  Corruption met during
work (SQLITE_CORRUPT, SQLITE_NOTADB) raises :class:`StoreCorruptError` and leaves a
``state.db.needs-rebuild`` marker, so the next start rebuilds even if ``quick_check`` passes.

This room knows tables, not rules: the validation engine decides what to write, and
:mod:`daemon.store.rebuild` decides what can be re-derived after a rebuild.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import StoreError
from daemon.fsutil import atomic_write_text
from daemon.records import Issue
from daemon.sqlite_ro import connect_read_only
from daemon.store.chunks import in_chunks
from daemon.store.embeddings import EmbeddingRepo
from daemon.store.images import ImageRepo
from daemon.store.migrations import MIGRATIONS
from daemon.store.training import TrainingRepo
from daemon.store.views import Figures
from daemon.timeparse import iso_utc

log = structlog.get_logger("store")

SCHEMA_KEY = "#schema"
#: SQLite primary result codes that mean "this file is damaged", not "try again later"
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_COMPANIONS = ("-wal", "-shm", "-journal")
MARKER_SUFFIX = ".needs-rebuild"
#: what a rebuild re-derives into a fresh store; returns counts for the log line
Rebuild = Callable[["StateStore"], dict[str, int]]


class StoreCorruptError(StoreError):
    """The state DB file is damaged or not SQLite at all: move it aside and rebuild it."""


def is_corruption(exc: BaseException) -> bool:
    """A damaged or foreign file, as opposed to busy, locked, read-only or missing."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc)
    return "malformed" in text or "not a database" in text


class _GuardedConnection(sqlite3.Connection):
    """A connection whose statements turn corruption into :class:`StoreCorruptError` (and tell
    the store), so no caller mistakes a damaged file for a bad row or a busy source."""

    on_corrupt: Callable[[str], None] | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._raise_if_corrupt(exc)
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._raise_if_corrupt(exc)
            raise

    def _raise_if_corrupt(self, exc: sqlite3.DatabaseError) -> None:
        if is_corruption(exc):
            if self.on_corrupt is not None:
                self.on_corrupt(str(exc))
            raise StoreCorruptError(f"state DB is damaged: {exc}") from exc


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


class StateStore:
    def __init__(self, path: Path | str, *, read_only: bool = False, check: bool = False
                 ) -> None:
        """``check`` (writable only): run ``PRAGMA quick_check`` and raise
        :class:`StoreCorruptError` on a damaged file (the service opens through
        :meth:`open_checked`, which heals; one-shot commands do not pay for a full scan)."""
        self.path = str(path)
        #: held by every transaction and by :meth:`heal`, which swaps the connection
        self._lock = threading.RLock()
        self._identity: tuple[int, int] | None = None
        #: why the store must be healed, once a statement met corruption
        self.problem: str | None = None
        #: the rooms' tables, each behind its repository (SQL lives in this package only)
        self.images = ImageRepo(self)
        self.embeddings = EmbeddingRepo(self)
        self.training = TrainingRepo(self)
        self.figures = Figures(self)
        try:
            if read_only:
                # invisible: no -wal/-shm of ours beside a state DB whose daemon stopped, and
                # readable by any user who can read the data folder, even a read-only one
                self.conn = connect_read_only(path, timeout_seconds=5)
            else:
                self._open_writable(check=check)
        except sqlite3.DatabaseError as exc:
            kind = StoreCorruptError if is_corruption(exc) else StoreError
            raise kind(f"state DB {self.path}: {exc}") from exc

    @property
    def conn(self) -> sqlite3.Connection:
        # waits while :meth:`heal` swaps the connection, so no caller gets a closed one
        with self._lock:
            return self._conn

    @conn.setter
    def conn(self, value: sqlite3.Connection) -> None:
        self._conn = value

    def _open_writable(self, *, check: bool) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                               check_same_thread=False, factory=_GuardedConnection)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a crash of the process never loses a commit; a power cut
            # may lose the last ones, which the next run re-derives from the sources.
            conn.execute("PRAGMA synchronous = NORMAL")
            if check:
                verdict = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
                if verdict != ["ok"]:
                    raise StoreCorruptError(f"state DB {self.path} failed quick_check: "
                                            + "; ".join(verdict[:5]))
            self._conn = conn
            self.migrate()
        except BaseException:
            conn.close()
            raise
        conn.on_corrupt = self._flag_corrupt
        self._identity = _file_identity(self.path)

    # -- healing --------------------------------------------------------------------------------

    @classmethod
    def open_checked(cls, path: Path | str, *, rebuild: Rebuild | None = None) -> StateStore:
        """The service's open: a damaged state DB (or one marked during work) is moved aside
        and a new one built and filled by ``rebuild``, with a loud log line; the daemon starts
        either way.  Errors that are not damage (permissions, disk) still raise StoreError."""
        marker = Path(str(path) + MARKER_SUFFIX)
        try:
            flagged: str | None = marker.read_text(errors="replace").strip() or "no detail"
        except OSError:
            flagged = None
        foreign = _foreign_header(str(path))
        if flagged is None and foreign is None:
            try:
                return cls(path, check=True)
            except StoreCorruptError as exc:
                reason = f"corrupt: {exc}"
        elif foreign is not None:
            # decided before SQLite opens it: SQLite would delete a -wal beside a foreign file
            reason = f"corrupt: {foreign}"
        else:
            reason = f"corrupt: marked during work: {flagged}"
        moved = _move_aside(str(path), "corrupt", main=True)
        store = cls(path, check=True)
        store._finish_heal(reason, moved, rebuild, adopted=False)
        return store

    def check_file(self) -> str | None:
        """``None`` while the file at the path is the one we opened and no statement met
        corruption; else why the store must be healed ("corrupt: ...", "deleted",
        "replaced").  Cheap (one ``stat``): the service asks every health tick."""
        if self.problem is not None:
            return self.problem
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None  # cannot tell now; asked again next tick
        return None if (st.st_dev, st.st_ino) == self._identity else "replaced"

    def heal(self, reason: str, rebuild: Rebuild | None = None) -> dict[str, Any]:
        """Close, move aside what must not be used (the damaged file, or the ``-wal``/``-shm``
        our deleted file left at the path, which SQLite would otherwise replay into a new
        file), reopen, and rebuild what can be re-derived.  A replacement that passes
        ``quick_check`` (an operator restored a backup) is adopted as it is.  Waits for the
        transaction in flight; callers that held the old connection get an error once."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            corrupt = reason.startswith("corrupt")
            moved = _move_aside(self.path, "corrupt" if corrupt else "orphaned", main=corrupt)
            self.problem = None
            self._identity = None
            adopted = reason == "replaced"
            try:
                self._open_writable(check=True)
            except StoreCorruptError:
                adopted = False
                moved += _move_aside(self.path, "corrupt", main=True)
                self._open_writable(check=True)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"state DB {self.path}: {exc}") from exc
            return self._finish_heal(reason, moved, rebuild, adopted=adopted)

    def _finish_heal(self, reason: str, moved: list[str], rebuild: Rebuild | None, *,
                     adopted: bool) -> dict[str, Any]:
        counts: dict[str, int] = {}
        if rebuild is not None:
            try:
                counts = rebuild(self)
            except Exception as exc:  # the store works without: validation re-derives its part
                log.exception("store.rebuild_failed", db=self.path, error=repr(exc))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + MARKER_SUFFIX)
        event = "store.state_db_adopted" if adopted else "store.state_db_rebuilt"
        log.error(event, db=self.path, reason=reason, moved_aside=moved, rebuilt=counts,
                  action="validation state is re-derived by a full reconcile")
        return {"reason": reason, "moved_aside": moved, "adopted": adopted, "rebuilt": counts}

    def _flag_corrupt(self, detail: str) -> None:
        if self.problem is not None:
            return
        self.problem = f"corrupt: {detail}"
        log.error("store.state_db_corrupt", db=self.path, error=detail,
                  action="moved aside and rebuilt by the service")
        if self.path != ":memory:":
            # survives the crash this may cause: the next start rebuilds even if quick_check
            # happens to pass
            with contextlib.suppress(OSError):
                atomic_write_text(Path(self.path + MARKER_SUFFIX), detail + "\n")

    # -- lifecycle ------------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending named migrations, each in its own transaction; return their names."""
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {r[0] for r in self.conn.execute("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                for statement in _split_sql(sql):
                    self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, datetime('now'))", (name,)
                )
            applied.append(name)
            log.info("store.migration_applied", name=name, db=self.path)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls everything back."""
        with self._lock:  # a heal waits for the transaction in flight
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # SQLite may have rolled back already (disk full, corruption): keep the cause
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

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


def _foreign_header(path: str) -> str | None:
    """Why a non-empty file is not SQLite at all, judged by its 16-byte magic, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None  # missing (a new DB) or unreadable: SQLite's open says which
    if not head or head == b"SQLite format 3\x00":
        return None
    return f"not an SQLite file (starts with {head[:16]!r})"


def _file_identity(path: str) -> tuple[int, int] | None:
    if path == ":memory:" or path.startswith("file:"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _move_aside(path: str, what: str, *, main: bool) -> list[str]:
    """Rename ``path`` (if ``main``) and its companions to ``<path>.<what>-<UTC time><suffix>``;
    never overwrites an earlier one."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tag, n = f"{what}-{stamp}", 1
    while any(os.path.lexists(f"{path}.{tag}{s}") for s in ("", *_COMPANIONS)):
        n += 1
        tag = f"{what}-{stamp}-{n}"
    moved = []
    for suffix in ("", *_COMPANIONS) if main else _COMPANIONS:
        target = f"{path}.{tag}{suffix}"
        try:
            os.replace(path + suffix, target)
        except FileNotFoundError:
            continue
        moved.append(target)
    return moved


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script, split where SQLite's own tokenizer says a statement
    is complete (so ';' inside comments or literals is safe)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements
