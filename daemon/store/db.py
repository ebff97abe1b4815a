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

This room owns the connection, not the tables: the validation engine's tables are in
:mod:`daemon.store.row_tables` (inherited, so callers ask the store), the other rooms' behind the
repositories it holds, what counts as damage in :mod:`daemon.store.damage`, and
:mod:`daemon.store.rebuild` decides what can be re-derived after a rebuild.  Nobody outside
takes the store's lock: :meth:`StateStore.transaction` and :meth:`StateStore.end_open_transaction`
are the public ways to write and to clean up after a failed write.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.errors import StoreError, StoreRebuiltError
from daemon.fsutil import atomic_write_text
from daemon.sqlite_ro import connect_read_only
from daemon.store.damage import (
    MARKER_SUFFIX,
    GuardedConnection,
    StoreCorruptError,
    file_identity,
    foreign_header,
    is_corruption,
    move_aside,
)
from daemon.store.embeddings import EmbeddingRepo
from daemon.store.images import ImageRepo
from daemon.store.migrations import MIGRATIONS
from daemon.store.row_tables import Checkpoint, RowState, RowTables
from daemon.store.training import TrainingRepo
from daemon.store.views import Figures

log = structlog.get_logger("store")

SCHEMA_KEY = "#schema"
#: what a rebuild re-derives into a fresh store; returns counts for the log line
Rebuild = Callable[["StateStore"], dict[str, int]]

__all__ = ["MARKER_SUFFIX", "SCHEMA_KEY", "Checkpoint", "HealOutcome", "Rebuild", "RowState",
           "StateStore", "StoreCorruptError", "is_corruption"]


@dataclass(frozen=True, slots=True)
class HealOutcome:
    """What :meth:`StateStore.heal` did: why, which files it moved aside, whether the file at
    the path was adopted as it was (a restored backup), and what the rebuild re-derived."""

    reason: str
    moved_aside: tuple[str, ...]
    adopted: bool
    rebuilt: dict[str, int] = field(default_factory=dict)


class StateStore(RowTables):
    """The state DB: one writable connection (or a read-only one), its transactions, its
    migrations and its healing; the tables live in the repositories it holds."""

    def __init__(self, path: Path | str, *, read_only: bool = False, check: bool = False
                 ) -> None:
        """``check`` (writable only): run ``PRAGMA quick_check`` and raise
        :class:`StoreCorruptError` on a damaged file (the service opens through
        :meth:`open_checked`, which heals; one-shot commands do not pay for a full scan)."""
        self.path = str(path)
        #: held by every transaction and by :meth:`heal`, which swaps the connection
        self._lock = threading.RLock()
        self._identity: tuple[int, int] | None = None
        #: bumped by every :meth:`heal`: a pass that began before it must not write into the
        #: new DB what it derived from the old one (:meth:`transaction` ``generation=``)
        self.generation = 0
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
                               check_same_thread=False, factory=GuardedConnection)
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
        self._identity = file_identity(self.path)

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
        foreign = foreign_header(str(path))
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
        moved = move_aside(str(path), "corrupt", main=True)
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

    def heal(self, reason: str, rebuild: Rebuild | None = None) -> HealOutcome:
        """Close, move aside what must not be used (the damaged file, or the ``-wal``/``-shm``
        our deleted file left at the path, which SQLite would otherwise replay into a new
        file), reopen, and rebuild what can be re-derived.  A replacement that passes
        ``quick_check`` (an operator restored a backup) is adopted as it is.  Waits for the
        transaction in flight; callers that held the old connection get an error once."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            corrupt = reason.startswith("corrupt")
            moved = move_aside(self.path, "corrupt" if corrupt else "orphaned", main=corrupt)
            self.problem = None
            self._identity = None
            self.generation += 1
            adopted = reason == "replaced"
            try:
                self._open_writable(check=True)
            except StoreCorruptError:
                adopted = False
                moved += move_aside(self.path, "corrupt", main=True)
                self._open_writable(check=True)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"state DB {self.path}: {exc}") from exc
            return self._finish_heal(reason, moved, rebuild, adopted=adopted)

    def _finish_heal(self, reason: str, moved: list[str], rebuild: Rebuild | None, *,
                     adopted: bool) -> HealOutcome:
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
        return HealOutcome(reason, tuple(moved), adopted, counts)

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
    def transaction(self, *, generation: int | None = None) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls everything back, and so does a
        ``COMMIT`` that fails (disk full), so no transaction is ever left open behind it.

        ``generation``: the :attr:`generation` the caller read its inputs in; a heal since then
        raises :class:`StoreRebuiltError` before anything is written (checked under the lock a
        heal takes, so no heal slips in between the check and the commit)."""
        with self._lock:  # a heal waits for the transaction in flight
            if generation is not None and generation != self.generation:
                raise StoreRebuiltError(
                    f"state DB {self.path} was rebuilt (generation {generation} -> "
                    f"{self.generation}) while this pass ran")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (disk full, corruption): keep the cause
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                raise

    def end_open_transaction(self) -> bool:
        """Roll back a transaction left open on the connection (a failed ``COMMIT`` outside
        :meth:`transaction` would make every later ``BEGIN`` fail, even after space returns).
        Waits for the transaction in flight, so another lane's is never the one rolled back.
        True when one was rolled back."""
        with self._lock:
            if not self._conn.in_transaction:
                return False
            self._conn.execute("ROLLBACK")
            return True

    def close(self) -> None:
        self._conn.close()

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
