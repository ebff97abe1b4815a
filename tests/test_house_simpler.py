"""Issue 11, items 3-4 ("the house gets simpler"): the store is written through its public API
only (no room takes its private lock), a failed COMMIT never leaves a transaction open, and a
sidecar's image is found whatever the case of its suffix."""

from __future__ import annotations

import ast
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.store.db import StateStore

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 11, 1, 12, 0, 0, tzinfo=UTC)


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


def _kind_a_sidecar(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.decision"
    path.write_text(json.dumps({"group_id": "g1", "project_id": "demo", "needs_crop": True},
                               indent=2))
    return path


class TestImageBesideAnyCase:
    """A sidecar's image is found whatever the case of its suffix (data contract, section 2)."""

    @pytest.mark.parametrize("suffix", [".png", ".PNG", ".Png", ".pNg", ".JPEG", ".Jpg"])
    def test_sidecar_pass_finds_the_image_in_any_case(self, tmp_path: Path, suffix: str) -> None:
        """The sidecar pass reports no sidecar_image_missing for x.Png beside x.decision (it
        used to stat only the all-lower and all-upper spellings)."""
        from daemon.sidecar_record import SIDECAR_KEY, record_sidecars

        root = tmp_path / "images"
        sidecar = _kind_a_sidecar(root / "__crop", "20250709_101500_stage2_upscaled")
        (sidecar.parent / f"20250709_101500_stage2_upscaled{suffix}").write_bytes(b"x")
        store = StateStore(tmp_path / "state.db")
        try:
            record_sidecars(store, "demo", [str(sidecar)], [root], NOW)
            found = [i.code for i in store.issues("demo")]
            assert "sidecar_orphan" in found  # the pass did run and judged the sidecar
            assert "sidecar_image_missing" not in found
            assert store.conn.execute("SELECT count(*) FROM issues WHERE row_key = ?",
                                      (SIDECAR_KEY + str(sidecar),)).fetchone()[0] >= 1
        finally:
            store.close()

    def test_sidecar_pass_still_reports_a_missing_image(self, tmp_path: Path) -> None:
        """With no image of that stem in any case (only a .yaml companion), the issue stays."""
        from daemon.sidecar_record import record_sidecars

        root = tmp_path / "images"
        sidecar = _kind_a_sidecar(root / "__crop", "a_stage2_upscaled")
        (sidecar.parent / "a_stage2_upscaled.yaml").write_text("x: 1\n")
        (sidecar.parent / "b_stage2_upscaled.Png").write_bytes(b"x")
        store = StateStore(tmp_path / "state.db")
        try:
            record_sidecars(store, "demo", [str(sidecar)], [root], NOW)
            assert "sidecar_image_missing" in [i.code for i in store.issues("demo")]
        finally:
            store.close()

    def test_one_lookup_lists_a_folder_once(self, tmp_path: Path) -> None:
        """ImagesBeside finds x.Png, keeps its listing for the pass (an image written later is
        seen by the next pass's lookup), and prefers the lower-case name when both exist."""
        from daemon.files import ImagesBeside, find_image_beside

        (tmp_path / "x.Png").write_bytes(b"x")
        lookup = ImagesBeside()
        assert lookup.find(tmp_path, "x") == tmp_path / "x.Png"
        (tmp_path / "y.JpG").write_bytes(b"x")
        assert lookup.find(tmp_path, "y") is None
        assert ImagesBeside().find(tmp_path, "y") == tmp_path / "y.JpG"
        (tmp_path / "x.png").write_bytes(b"x")
        assert find_image_beside(tmp_path, "x") == tmp_path / "x.png"
        assert ImagesBeside().find(tmp_path / "missing", "x") is None
