"""Issue 11, items 3-4 ("the house gets simpler"): the store is written through its public API
only (no room takes its private lock), a failed COMMIT never leaves a transaction open, and a
sidecar's image is found whatever the case of its suffix."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest

from daemon.store.db import StateStore

ROOT = Path(__file__).resolve().parent.parent


def _failing_commit(store: StateStore) -> None:
    """Arm a deferred foreign key so the next COMMIT fails for real (SQLite keeps the
    transaction open after such a COMMIT)."""
    store.conn.execute("PRAGMA foreign_keys = ON")
    store.conn.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    store.conn.execute("CREATE TEMP TABLE child (pid INTEGER REFERENCES parent(id) "
                       "DEFERRABLE INITIALLY DEFERRED)")


class TestStorePublicApi:
    """Callers never need the store's private lock or connection."""

    def test_no_room_outside_the_store_touches_its_private_lock(self) -> None:
        """No module outside daemon/store/ reads ``store._lock`` or ``store._conn``."""
        found = []
        for path in sorted((ROOT / "daemon").rglob("*.py")):
            if path.parent.name == "store":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr in ("_lock", "_conn")
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "store"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        assert found == []

    def test_a_failed_commit_rolls_back_on_its_own(self, tmp_path: Path) -> None:
        """A COMMIT that fails inside transaction() leaves no transaction open, so the next
        transaction starts and what the failed one wrote is gone."""
        store = StateStore(tmp_path / "state.db")
        try:
            _failing_commit(store)
            with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
                store.set_meta("lost", "1")
                conn.execute("INSERT INTO child VALUES (7)")
            assert not store.conn.in_transaction
            with store.transaction():
                store.set_meta("kept", "1")
            assert (store.get_meta("lost"), store.get_meta("kept")) == (None, "1")
        finally:
            store.close()

    def test_end_open_transaction_rolls_back_what_a_raw_commit_left(self, tmp_path: Path
                                                                     ) -> None:
        """A transaction left open outside transaction() is rolled back by the public call,
        and a second call finds nothing to do."""
        store = StateStore(tmp_path / "state.db")
        try:
            _failing_commit(store)
            store.conn.execute("BEGIN IMMEDIATE")
            store.conn.execute("INSERT INTO child VALUES (7)")
            with pytest.raises(sqlite3.IntegrityError):
                store.conn.execute("COMMIT")
            assert store.conn.in_transaction
            assert store.end_open_transaction() is True
            assert store.end_open_transaction() is False
            with store.transaction():
                store.set_meta("k", "v")
            assert store.get_meta("k") == "v"
        finally:
            store.close()

    def test_heal_returns_a_typed_outcome(self, tmp_path: Path) -> None:
        """heal() says what it did in a frozen record, not a dict."""
        from daemon.store.db import HealOutcome

        db = tmp_path / "state.db"
        store = StateStore.open_checked(db)
        try:
            db.unlink()
            outcome = store.heal("deleted")
            assert isinstance(outcome, HealOutcome)
            assert (outcome.reason, outcome.adopted) == ("deleted", False)
        finally:
            store.close()
