"""Shared fixtures: decision DBs written the way the reviewer writes them (WAL on, the writer's
connection still open while trainingd reads, rows UPDATEd later), and isolated settings.

Every file a test reads comes from the checkout (``fixture_path``: ``tests/fixtures/``, see its
README) or from a temp dir; a test that opens anything beside the checkout fails (outside_guard),
and so does one that leaves a thread or a child process running, or a SIGTERM/SIGINT/SIGHUP
handler changed (leak_guard).
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.decisions.schema import COLUMNS, INSERT_SQL, create_legacy_db, create_v3_db
from daemon.demo.sample import reviewer_row, row_tuple
from daemon.settings import Settings, load_settings
from daemon.store import StateStore
from daemon.validation import Validator
from tests import outside_guard
from tests.leak_guard import _nothing_left_running  # noqa: F401  (autouse: every test is guarded)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NOW = datetime(2025, 11, 1, 12, 0, 0, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GUARD = outside_guard.install()


def fixture_path(*parts: str) -> Path:
    """A file or folder under ``tests/fixtures/``; a missing one is an error that says where to
    look, never a silent fallback to a copy somewhere else."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"test fixture {path} is missing: tests/fixtures/README.md says "
                                "how each fixture is made (tests/fixtures/derive.py)")
    return path


@pytest.fixture(autouse=True)
def _nothing_read_beside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the test (at teardown) if it, or a fixture set up for it, opened a path beside the
    checkout, such as ../shared: that passes here and fails on every fresh clone."""
    GUARD.allow(tmp_path_factory.getbasetemp())
    yield
    seen = GUARD.take()
    if seen:
        listed = "\n".join(f"  {event}: {path}" for event, path in seen[:10])
        pytest.fail(f"read {len(seen)} path(s) beside the checkout {outside_guard.CHECKOUT}; "
                    f"copy what the test needs into tests/fixtures/ (see its README):\n{listed}",
                    pytrace=False)


class ReviewerDB:
    """A project DB with the reviewer's writer connection held open."""

    def __init__(self, path: Path, *, checks: bool = True, columns: tuple[str, ...] = COLUMNS,
                 primary_key: bool = True, wal: bool = True) -> None:
        self.path = path
        self.project = path.name.removesuffix(".db")
        self.rng = random.Random(1234)
        self.n = 0
        if checks:
            self.conn = create_v3_db(path, wal=wal)
        else:
            self.conn = create_legacy_db(path, columns=columns, primary_key=primary_key, wal=wal)
        self.columns = columns

    def row(self, **changes: Any) -> dict[str, Any]:
        """A clean live row (a finished crop or an approve), with ``changes`` applied."""
        data = reviewer_row(self.project, self.n, self.rng)
        self.n += 1
        data.update(changes)
        return data

    def insert(self, **changes: Any) -> dict[str, Any]:
        data = self.row(**changes)
        cols = [c for c in COLUMNS if c in self.columns]
        self.conn.execute(
            f"INSERT INTO ai_decisions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [data[c] for c in cols],
        )
        return data

    def insert_many(self, count: int, **changes: Any) -> list[dict[str, Any]]:
        rows = [self.row(**changes) for _ in range(count)]
        self.conn.execute("BEGIN")
        self.conn.executemany(INSERT_SQL, [row_tuple(r) for r in rows])
        self.conn.execute("COMMIT")
        return rows

    def update(self, group_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.conn.execute(f"UPDATE ai_decisions SET {sets} WHERE group_id = ?",
                          [*values.values(), group_id])

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def digest(self) -> dict[str, str]:
        """SHA-256 of the DB and its WAL: what 'byte-for-byte unchanged' means.  (The -shm
        wal-index is shared memory in which every reader, by design, marks its read position.)"""
        out = {}
        for suffix in ("", "-wal"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Embedded defaults with the runtime tree under tmp_path, whatever the environment."""
    for name in list(os.environ):
        if name.upper().startswith("TRAININGD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    s = load_settings().with_data_root(tmp_path / "data")
    s.decisions_dir.mkdir(parents=True)
    return s


@pytest.fixture
def make_db(settings: Settings) -> Iterator[Any]:
    opened: list[ReviewerDB] = []

    def factory(project: str = "mojo3", **kwargs: Any) -> ReviewerDB:
        db = ReviewerDB(settings.decisions_dir / f"{project}.db", **kwargs)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        db.close()


@pytest.fixture
def store(settings: Settings) -> Iterator[StateStore]:
    s = StateStore(settings.state_db)
    yield s
    s.close()


@pytest.fixture
def validator(store: StateStore, settings: Settings) -> Validator:
    return Validator(store, settings, clock=lambda: NOW)


def codes_for(store: StateStore, group_id: str) -> set[str]:
    return {i.code for i in store.issues() if i.group_id == group_id}
