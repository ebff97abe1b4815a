"""A state DB healed while a validation pass is running (issue 9, found by the 20-minute soak).

The soak deleted the state DB at 660 s while the fast lane was validating: the heal rebuilt an
empty DB and queued a reconcile, but the pass in flight went on writing its checkpoint (read from
the old DB: max_rowid ~660) into the new one.  The reconcile then saw a checkpoint, validated
incrementally from rowid 660, and rows 1-660 never got a row_state again: "validated 540 of
1201", through two more restarts.  Here the heal happens at a seam the validator offers (its
per-chunk progress call), with a real WAL source DB whose writer is still open.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.validation import Validator, discover_projects

NOW = datetime(2025, 11, 1, 12, 0, 0, tzinfo=UTC)


def _small_chunks(settings: Settings) -> Settings:
    v = settings.validation.model_copy(update={"chunk_rows": 100})
    return settings.model_copy(update={"validation": v})


def _held(store: StateStore, project: str) -> int:
    return store.row_figures(project)["validated"]


class TestHealDuringAPass:
    def test_a_pass_in_flight_writes_nothing_into_the_rebuilt_db(
        self, settings: Settings, make_db: object, store: StateStore
    ) -> None:
        """The pass that read the old DB's checkpoint stops at its next write; the reconcile
        the heal queues then validates every row into the new DB."""
        db = make_db("mojo3")  # type: ignore[operator]
        db.insert_many(300)
        s = _small_chunks(settings)
        first = Validator(store, s, clock=lambda: NOW)
        first.validate_all()
        assert _held(store, "mojo3") == 300
        db.insert_many(450)  # the next pass reads these in 5 chunks

        healed: list[int] = []

        def heal_once() -> None:
            if not healed:  # the soak's fault: the file is deleted under the running daemon
                os.unlink(s.state_db)
                assert store.check_file() == "deleted"
                store.heal("deleted")
                healed.append(1)

        racing = Validator(store, s, clock=lambda: NOW, progress=heal_once)
        (result,) = racing.validate_all()
        assert healed, "the seam was never called: the test proves nothing"
        assert (result.mode, result.schema_kind) == ("skipped", "rebuilt")
        checkpoint = store.checkpoint("mojo3")
        assert checkpoint is None, f"a stale checkpoint reached the new DB: {checkpoint}"

        # what the heal queues: a reconcile pass (verify on)
        (again,) = Validator(store, s, clock=lambda: NOW).validate_all(verify=True)
        assert again.rows_total == 750
        assert _held(store, "mojo3") == 750
        cp = store.checkpoint("mojo3")
        assert cp is not None and cp.row_count == 750

    def test_a_pass_after_the_heal_writes_normally(
        self, settings: Settings, make_db: object, store: StateStore
    ) -> None:
        """The generation guard refuses only passes that began before the heal."""
        db = make_db("mojo3")  # type: ignore[operator]
        db.insert_many(120)
        os.unlink(settings.state_db)
        store.heal("deleted")
        (result,) = Validator(store, settings, clock=lambda: NOW).validate_all()
        assert result.mode == "incremental" and result.rows_total == 120
        assert _held(store, "mojo3") == 120


class TestReconcileProvesTheCheckpoint:
    def test_rows_missing_behind_the_checkpoint_are_validated_again(
        self, settings: Settings, make_db: object, store: StateStore
    ) -> None:
        """Whatever left the checkpoint above rows the state DB lacks (the race above, a restored
        backup, a hand edit), the reconcile pass notices and checks every row again."""
        db = make_db("mojo3")  # type: ignore[operator]
        db.insert_many(200)
        v = Validator(store, settings, clock=lambda: NOW)
        v.validate_all()
        keys = [k for (k,) in store.conn.execute(
            "SELECT row_key FROM row_state WHERE project = 'mojo3' ORDER BY src_rowid LIMIT 80")]
        with store.transaction():
            store.delete_rows("mojo3", keys)
        assert _held(store, "mojo3") == 120

        (plain,) = v.validate_all()  # an event-driven pass trusts the checkpoint
        assert plain.mode == "incremental" and _held(store, "mojo3") == 120

        (checked,) = v.validate_all(verify=True)
        assert checked.mode == "full"
        assert "checkpoint covers 200" in (checked.reason or "")
        assert _held(store, "mojo3") == 200


def test_discover_finds_the_project(settings: Settings, make_db: object) -> None:
    """The tests above validate the project the reviewer's DB names (guards a silent no-op)."""
    make_db("mojo3")  # type: ignore[operator]
    assert [p.project for p in discover_projects(settings)] == ["mojo3"]
    assert Path(settings.decisions_dir, "mojo3.db").exists()
