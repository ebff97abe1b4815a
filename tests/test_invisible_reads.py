"""Reading is invisible (issue 9, item 2 and the read-only half of item 6).

Reading an upstream decision DB, or our state DB from a read-only command, must create, change or
leave no file beside it, and must work in a folder we may only read.  Everything here is real: DBs
in WAL mode written and closed (or held open) by real writer processes, a real read-only bind
mount, a real second user.  Folder state is compared as every entry's (inode, size, mtime_ns,
mode, uid), so a file created, replaced, touched or re-owned shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.decisions.reader import SourceReader
from daemon.decisions.schema import COLUMNS, TABLE
from daemon.settings import Settings
from daemon.sqlite_ro import ReadOnlyDB, connect_read_only
from daemon.store import StateStore
from daemon.validation import Validator
from tests.conftest import NOW, ReviewerDB

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
SERVICE_USER = 4243  # trainingd's own user in the multi-user tests (any unused uid works)
REVIEWERS = 4242  # the group that shares the decisions folder
FileState = dict[str, tuple[int, int, int, int, int]]

#: A writer in its own process: ``argv``: db path, then a JSON plan.  It reports the inodes of
#: the -wal/-shm it leaves (they are its files, not ours) and can hold the DB open until stdin
#: closes.
WRITER = r"""
import json, os, sqlite3, sys
path, plan = sys.argv[1], json.loads(sys.argv[2])
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
if plan.get("no_autocheckpoint"):
    conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("BEGIN IMMEDIATE")
every = plan.get("update_every")
if every:
    conn.execute("UPDATE ai_decisions SET batch_number = batch_number + 1000000, "
                 "directory = directory || '/v2' WHERE rowid % ? = 0", (every,))
copies = plan.get("insert_copies", 0)
if copies:
    cols = [c for c in plan["columns"] if c != "group_id"]
    conn.execute(f"INSERT INTO ai_decisions (group_id, {', '.join(cols)}) "
                 f"SELECT group_id || '-copy', {', '.join(cols)} FROM ai_decisions "
                 "WHERE rowid <= ?", (copies,))
conn.execute("COMMIT")
if plan.get("checkpoint"):
    busy, _, _ = conn.execute(f"PRAGMA wal_checkpoint({plan['checkpoint']})").fetchone()
    assert busy == 0, "checkpoint was blocked"
left = {s: os.stat(path + s).st_ino for s in ("-wal", "-shm") if os.path.exists(path + s)}
print(json.dumps(left), flush=True)
if plan.get("hold"):
    sys.stdin.read()
conn.close()
"""


def folder_state(folder: Path) -> FileState:
    out: FileState = {}
    for entry in os.scandir(folder):
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid)
    return out


def closed_db(path: Path, rows: int) -> ReviewerDB:
    """A v3 DB in WAL mode whose writer wrote ``rows`` rows and closed (no -wal left)."""
    db = ReviewerDB(path)
    for start in range(0, rows, 5000):
        db.insert_many(min(5000, rows - start))
    db.close()
    assert sorted(os.listdir(path.parent)).count(path.name + "-wal") == 0
    return db


def all_rows(path: Path) -> dict[int, tuple[Any, ...]]:
    """The table as the test's own reference sees it: an immutable read of the main file, to be
    used only when no -wal holds anything the main file lacks."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        return {r[0]: r for r in conn.execute(f"SELECT rowid, {', '.join(COLUMNS)} FROM {TABLE}")}
    finally:
        conn.close()


def as_user(uid: int, gid: int) -> list[str]:
    """A command prefix that runs as ``uid`` with primary and only group ``gid``."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={gid}"]


def start_writer(path: Path, *, user: tuple[int, int] | None = None, **plan: Any
                 ) -> subprocess.Popen[str]:
    plan.setdefault("columns", list(COLUMNS))
    prefix = [] if user is None else as_user(*user)
    return subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(path), json.dumps(plan)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def writer_report(proc: subprocess.Popen[str]) -> dict[str, int]:
    """The writer's first line (what it left behind); fails with its stderr if it died."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        pytest.fail(f"writer failed (exit {proc.returncode}): {proc.stderr.read()}")
    report: dict[str, int] = json.loads(line)
    return report


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""


def need_root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a read-only bind mount and a second user are made with "
                    "mount(8) and setpriv(1)")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@contextlib.contextmanager
def read_only_bind(source: Path, mountpoint: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``mountpoint`` (a real ro bind mount), unmounted after."""
    need_root_tools("mount", "umount")
    mountpoint.mkdir(parents=True, exist_ok=True)
    bound = subprocess.run(["mount", "--bind", str(source), str(mountpoint)],
                           capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"mount --bind is not permitted here: {bound.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(mountpoint)],
                            capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"remount,ro,bind is not permitted here: {ro.stderr.strip()}")
        probe = mountpoint / ".write-probe"
        with pytest.raises(OSError):
            probe.touch()
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=True)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder a second user can reach (pytest's own tmp tree is 0700 to root)."""
    base = Path(tempfile.mkdtemp(prefix="trainingd-invisible-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def read_everything(reader: SourceReader) -> list[Any]:
    """Every public query of the reader, once."""
    lo, hi, n = reader.snapshot()
    rows = [r for chunk in reader.iter_rows(0, hi, 7) for r in chunk]
    gids = [r[1] for r in rows]
    return [(lo, hi, n), rows, reader.rows_by_group_id(gids[:5]),
            reader.rows_by_rowid([1, 2, hi]), reader.group_ids_at([lo, hi]),
            reader.counts_by("user_action"), reader.first_rows(3), reader.schema.kind]


class TestWriterClosed:
    """A WAL DB whose writer has closed: our reads leave the folder exactly as it was."""

    def test_source_reader_queries_leave_folder_untouched(self, settings: Settings) -> None:
        """Every SourceReader query on a closed WAL DB leaves listing and stats unchanged."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 40)
        before = folder_state(path.parent)
        with SourceReader(path) as reader:
            found = read_everything(reader)
            assert folder_state(path.parent) == before  # not even while open
        assert found[0] == (1, 40, 40) and len(found[1]) == 40
        assert folder_state(path.parent) == before

    def test_validator_leaves_folder_untouched(
        self, settings: Settings, store: StateStore
    ) -> None:
        """A full validation of a closed WAL DB creates no -wal/-shm and touches no file."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 60)
        before = folder_state(path.parent)
        validator = Validator(store, settings, clock=lambda: NOW)
        (result,) = validator.validate_all(full=True)
        assert (result.rows_total, result.rows_checked, result.errors) == (60, 60, 0)
        assert folder_state(path.parent) == before

    def test_writer_of_another_user_can_still_write_after_our_read(
        self, shared_tmp: Path
    ) -> None:
        """The service user reads a shared DB; the reviewer (another user) can still write."""
        need_root_tools("setpriv")
        folder = shared_tmp / "decisions"
        folder.mkdir()
        path = folder / "mojo3.db"
        closed_db(path, 10)
        # a setgid folder of the reviewers' group; the DB writable by the reviewer only (SQLite
        # gives a -wal/-shm it creates the DB's mode, so ours would be read-only to the reviewer)
        for p, mode in ((folder, 0o2775), (path, 0o644)):
            os.chown(p, NOBODY, REVIEWERS)
            os.chmod(p, mode)
        read = ("import sys; from pathlib import Path; "
                "from daemon.decisions.reader import SourceReader\n"
                "with SourceReader(Path(sys.argv[1])) as r: print(r.snapshot())")
        proc = subprocess.run(
            [*as_user(SERVICE_USER, REVIEWERS), sys.executable, "-c", read, str(path)],
            capture_output=True, text=True, timeout=60, cwd=shared_tmp,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "(1, 10, 10)"
        writer = start_writer(path, user=(NOBODY, REVIEWERS), insert_copies=3)
        writer_report(writer)  # was: "attempt to write a readonly database"
        finish(writer)
        assert sorted(os.listdir(folder)) == ["mojo3.db"]  # its files went as it closed
        with SourceReader(path) as reader:
            assert reader.snapshot() == (1, 13, 13)


class TestReadOnlyFolder:
    """A decisions folder we may only read (a real read-only bind mount) validates normally."""

    def test_closed_writer_db_validates(self, settings: Settings, store: StateStore,
                                        tmp_path: Path) -> None:
        """A WAL DB with its writer closed, behind a ro mount, is validated, not db_unreadable."""
        upstream = tmp_path / "upstream"
        upstream.mkdir()
        closed_db(upstream / "mojo3.db", 30)
        before = folder_state(upstream)
        with read_only_bind(upstream, settings.decisions_dir):
            (result,) = Validator(store, settings, clock=lambda: NOW).validate_all()
        assert (result.mode, result.rows_total, result.rows_checked) == ("incremental", 30, 30)
        assert "db_unreadable" not in store.issue_codes()
        assert folder_state(upstream) == before

    def test_open_writer_db_reads_through_its_wal(self, settings: Settings, store: StateStore,
                                                  tmp_path: Path) -> None:
        """With a writer holding the DB open (rows only in its -wal), a ro mount reads them."""
        upstream = tmp_path / "upstream"
        upstream.mkdir()
        path = upstream / "mojo3.db"
        closed_db(path, 30)
        writer = start_writer(path, no_autocheckpoint=True, insert_copies=12, hold=True)
        try:
            left = writer_report(writer)
            assert set(left) == {"-wal", "-shm"}
            before = folder_state(upstream)
            with read_only_bind(upstream, settings.decisions_dir):
                with SourceReader(settings.decisions_dir / "mojo3.db") as reader:
                    assert reader.layout == "wal"
                    assert reader.snapshot() == (1, 42, 42)
                (result,) = Validator(store, settings, clock=lambda: NOW).validate_all()
            assert (result.rows_total, result.rows_checked) == (42, 42)
            assert folder_state(upstream) == before
        finally:
            finish(writer)


class TestWriterStartsMidRead:
    """An upstream writer in another process starting while we read: no torn or lost rows."""

    @pytest.mark.slow
    def test_iter_rows_across_a_writer_that_checkpoints_and_closes(
        self, settings: Settings
    ) -> None:
        """Chunks read before the writer are the old rows, after it the new; a repeat is whole."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 50_000)
        old = all_rows(path)
        db_ino = path.stat().st_ino
        reader = SourceReader(path)
        try:
            assert reader.layout == "immutable"
            _, hi, _ = reader.snapshot()
            chunks = reader.iter_rows(0, hi, 1000)
            first = next(chunks)
            writer = start_writer(path, update_every=97, insert_copies=500,
                                  checkpoint="TRUNCATE")
            left = writer_report(writer)
            finish(writer)
            rest = [r for chunk in chunks for r in chunk]
            assert reader.layout == "wal"  # the fence saw the writer and reopened through it
            new = all_rows(path)  # the TRUNCATE checkpoint put everything in the main file
            assert len(new) == 50_500 and new != old
            assert [r for r in first] == [old[r[0]] for r in first]
            assert rest == [new[r[0]] for r in rest] and len(rest) == hi - len(first)
            again = [r for chunk in reader.iter_rows(0, 10**9, 1000) for r in chunk]
            assert again == [new[k] for k in sorted(new)]
            assert reader.snapshot() == (1, 50_500, 50_500)
        finally:
            reader.close()
        with SourceReader(path) as fresh:
            assert [r for c in fresh.iter_rows(0, 10**9, 5000) for r in c] == sorted(
                new.values())
        # only the writer's own files may be beside the DB (our guard kept it from deleting
        # them on close, as any reader does): same names, same inodes it reported
        leftover = {name: st[0] for name, st in folder_state(path.parent).items()}
        assert leftover == {"mojo3.db": db_ino, **{f"mojo3.db{s}": i for s, i in left.items()}}

    def test_read_redone_when_writer_checkpoints_during_it(self, settings: Settings) -> None:
        """A writer that commits, checkpoints and closes inside one immutable read: redone."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 3000)
        calls = []

        def read_two_halves(conn: sqlite3.Connection) -> list[Any]:
            calls.append(1)
            head = conn.execute(f"SELECT rowid, * FROM {TABLE} WHERE rowid <= 1500").fetchall()
            if len(calls) == 1:
                writer = start_writer(path, update_every=7, insert_copies=100,
                                      checkpoint="TRUNCATE")
                writer_report(writer)
                finish(writer)
            tail = conn.execute(f"SELECT rowid, * FROM {TABLE} WHERE rowid > 1500").fetchall()
            return head + tail

        with ReadOnlyDB(path) as db:
            assert db.layout == "immutable"
            got = db.read(read_two_halves)
            assert len(calls) == 2 and db.reopened == 1 and db.layout == "wal"
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            assert got == conn.execute(f"SELECT rowid, * FROM {TABLE}").fetchall()
        finally:
            conn.close()
        assert len(got) == 3100


class TestOtherLayouts:
    """The cases where reading in place would have to create a file, and rollback journals."""

    def test_wal_without_shm_is_read_from_a_private_copy(self, settings: Settings,
                                                          tmp_path: Path) -> None:
        """A -wal without its -shm is read from a copy in our scratch folder, which goes."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 20)
        writer = start_writer(path, no_autocheckpoint=True, insert_copies=5, hold=True)
        writer_report(writer)
        wal = Path(f"{path}-wal").read_bytes()
        finish(writer)  # it checkpoints and deletes both files; put back only the -wal
        Path(f"{path}-wal").write_bytes(wal)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        before = folder_state(path.parent)
        with SourceReader(path, scratch_dir=scratch) as reader:
            assert reader.layout == "copy" and reader.snapshot() == (1, 25, 25)
            assert len(os.listdir(scratch)) == 1
        assert folder_state(path.parent) == before and os.listdir(scratch) == []

    def test_rollback_journal_db_is_read_in_place(self, settings: Settings) -> None:
        """A DB in rollback-journal mode is read with mode=ro, which creates nothing."""
        path = settings.decisions_dir / "mojo3.db"
        db = ReviewerDB(path, wal=False)
        db.insert_many(8)
        db.close()
        before = folder_state(path.parent)
        with SourceReader(path) as reader:
            assert reader.layout == "rollback" and reader.snapshot() == (1, 8, 8)
        assert folder_state(path.parent) == before

    def test_hot_journal_is_busy_not_unreadable(self, settings: Settings, store: StateStore
                                                ) -> None:
        """A hot journal only its writer may roll back makes the project busy, not broken."""
        path = settings.decisions_dir / "mojo3.db"
        db = ReviewerDB(path, wal=False)
        db.insert_many(3000)
        db.close()
        crash = ("import os, sqlite3, sys\n"
                 "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                 "c.execute('PRAGMA cache_size = 1'); c.execute('BEGIN')\n"
                 "c.execute(\"UPDATE ai_decisions SET directory = directory || 'x'\")\n"
                 "os.kill(os.getpid(), 9)\n")
        subprocess.run([sys.executable, "-c", crash, str(path)], check=False, timeout=60)
        assert Path(f"{path}-journal").stat().st_size > 0
        before = folder_state(path.parent)
        quick = settings.model_copy(update={"sources": settings.sources.model_copy(
            update={"busy_retry_seconds": 0.2})})
        (result,) = Validator(store, quick, clock=lambda: NOW).validate_all()
        assert (result.mode, result.schema_kind) == ("skipped", "busy")
        assert "db_unreadable" not in store.issue_codes()
        assert folder_state(path.parent) == before

    def test_fifo_named_like_a_db_does_not_hang(self, settings: Settings, store: StateStore
                                                ) -> None:
        """A FIFO named like a DB is unreadable at once, never a blocked open."""
        os.mkfifo(settings.decisions_dir / "mojo3.db")
        with pytest.raises(sqlite3.OperationalError, match="not a regular file"):
            ReadOnlyDB(settings.decisions_dir / "mojo3.db")


class TestReadOnlyStateStore:
    """``trainingd status``, training and the summary read the state DB without a trace."""

    @staticmethod
    def stopped_state_db(settings: Settings, store: StateStore, make_db: Any) -> Path:
        make_db().insert_many(25)
        Validator(store, settings, clock=lambda: NOW).validate_all()
        store.close()  # the daemon stopped: its -wal/-shm are gone
        folder = settings.state_db.parent
        assert sorted(os.listdir(folder)) == ["state.db"]
        return folder

    def test_stopped_daemon_state_db_leaves_no_file(
        self, settings: Settings, store: StateStore, make_db: Any
    ) -> None:
        """Every read of a read-only StateStore leaves the state folder exactly as it was."""
        folder = self.stopped_state_db(settings, store, make_db)
        before = folder_state(folder)
        ro = StateStore(settings.state_db, read_only=True)
        try:
            (cp,) = ro.checkpoints()
            assert cp.row_count == 25 and ro.row_figures("mojo3")["validated"] == 25
            assert ro.issues() == [] and ro.get_meta("nothing") is None
            assert len(list(ro.conn.execute("SELECT row_key FROM row_state"))) == 25
        finally:
            ro.close()
        assert folder_state(folder) == before

    def test_works_in_read_only_folder(
        self, settings: Settings, store: StateStore, make_db: Any, tmp_path: Path
    ) -> None:
        """A state DB behind a read-only bind mount opens and answers."""
        folder = self.stopped_state_db(settings, store, make_db)
        before = folder_state(folder)
        with read_only_bind(folder, tmp_path / "ro-state") as view:
            ro = StateStore(view / "state.db", read_only=True)
            try:
                assert ro.checkpoint("mojo3") is not None
                assert ro.row_figures("mojo3")["validated"] == 25
            finally:
                ro.close()
        assert folder_state(folder) == before

    def test_status_by_another_user_after_daemon_stopped(
        self, shared_tmp: Path, make_db: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``trainingd status`` as another user who may read the data folder exits 0, no trace."""
        need_root_tools("setpriv")
        from daemon.settings import load_settings

        monkeypatch.chdir(shared_tmp)
        settings = load_settings().with_data_root(shared_tmp / "data")
        settings.decisions_dir.mkdir(parents=True)
        store = StateStore(settings.state_db)
        db = ReviewerDB(settings.decisions_dir / "mojo3.db")
        db.insert_many(5)
        db.close()
        Validator(store, settings, clock=lambda: NOW).validate_all()
        store.close()
        for root, dirs, files in os.walk(shared_tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        before = folder_state(settings.state_db.parent)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        env.update(TRAININGD_PATHS__DATA_ROOT=str(settings.data_root), HOME=str(shared_tmp),
                   PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [*as_user(NOBODY, NOBODY), sys.executable, "-m", "daemon", "status", "--json"],
            capture_output=True, text=True, timeout=120, env=env, cwd=shared_tmp)
        assert proc.returncode == 3, proc.stderr  # no daemon: LSB "not running"
        (project,) = json.loads(proc.stdout)["projects"]
        assert (project["project"], project["rows"], project["validated"]) == ("mojo3", 5, 5)
        assert folder_state(settings.state_db.parent) == before

    def test_connection_face_serves_rows_like_a_cursor(self, tmp_path: Path) -> None:
        """fetchone, fetchall, fetchmany and iteration of a fenced statement behave as sqlite3."""
        path = tmp_path / "t.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (a)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5)])
        conn.commit()
        conn.close()
        ro = connect_read_only(path)
        try:
            cur = ro.execute("SELECT a FROM t ORDER BY a")
            assert cur.fetchone() == (0,) and cur.fetchmany(2) == [(1,), (2,)]
            assert list(cur) == [(3,), (4,)] and cur.fetchone() is None
            assert ro.execute("SELECT count(*) FROM t WHERE a > ?", (2,)).fetchall() == [(2,)]
        finally:
            ro.close()
        assert os.listdir(tmp_path) == ["t.db"]


class TestInProcessLocks:
    """Our descriptors never drop a lock another SQLite connection in this process holds."""

    @pytest.mark.parametrize("layout", ["wal", "immutable"])
    def test_closing_a_reader_keeps_an_in_process_writers_lock(
        self, settings: Settings, layout: str
    ) -> None:
        """After our reader closes, an in-process writer still holds its SHARED lock, so a
        second process closing cannot delete the -wal/-shm under it (a POSIX close drops
        every lock of the process on the file; SQLite's own close defers for this reason)."""
        path = settings.decisions_dir / "mojo3.db"
        closed_db(path, 10)
        if layout == "immutable":
            reader = SourceReader(path)
            assert reader.layout == "immutable"
        writer = ReviewerDB(path)  # this process: WAL, SHARED lock held while connected
        writer.rng, writer.n = random.Random(99), 1000  # rows unlike the first ten
        try:
            writer.insert_many(2)
            if layout == "wal":
                reader = SourceReader(path)
                assert reader.layout == "wal"
            assert reader.snapshot()[2] in (10, 12)
            reader.close()
            other = start_writer(path, insert_copies=1)  # another process opens, then closes
            writer_report(other)
            finish(other)
            assert os.path.exists(f"{path}-wal") and os.path.exists(f"{path}-shm")
            writer.insert_many(1)
        finally:
            writer.close()
        assert all_rows(path).keys() == set(range(1, 15))
