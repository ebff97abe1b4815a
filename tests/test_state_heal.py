"""The state DB heals (issue 9, item 5): a damaged, foreign, truncated or deleted state DB is
moved aside and rebuilt with a loud log line, the daemon stays up, validation runs again, and
what cannot be re-derived from the sources (embedded vectors, training history) comes back from
the files that hold it, so no vector is computed twice."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.demo.sample import write_sample_project
from daemon.errors import StoreError
from daemon.settings import Settings, load_settings
from daemon.store.db import MARKER_SUFFIX, StateStore, StoreCorruptError
from daemon.store.rebuild import rebuild_derived
from daemon.validation import Validator
from tests.daemon_harness import Daemon, wait_until, write_config

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2025, 11, 1, 12, 0, 0, tzinfo=UTC)
#: sample project "demo" with 40 rows: 40 clean rows plus the planted faults
DEMO_ROWS = 52


class TinyModelDaemon(Daemon):
    """The real ``trainingd run``, with the tiny open_clip config registered first (random
    weights, CPU, built in a fraction of a second)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        environ.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        launch = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                  "from tests.embedding_helpers import register_tiny; register_tiny(); "
                  "from daemon import cli; sys.exit(cli.main(sys.argv[1:]))")
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launch, "run", "--config", str(config), "--log-format",
             "json"], stdout=self.log_file, stderr=subprocess.STDOUT, env=environ,
            cwd=config.parent)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    write_sample_project(tmp_path / "data" / "training" / "ai_training_decisions", "demo",
                         rows=40)
    return tmp_path


@pytest.fixture
def running() -> Iterator[list[Daemon]]:
    """Daemons a test starts; any still running at the end is killed."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def state_db(home: Path) -> Path:
    return home / "data" / "daemon" / "state.db"


def aside(db: Path, what: str = "corrupt") -> list[Path]:
    return sorted(db.parent.glob(f"{db.name}.{what}-*"))


def validated_rows(db: Path) -> int:
    store = StateStore(db, read_only=True)
    try:
        return int(store.row_figures("demo")["validated"])
    finally:
        store.close()


def checked(d: Daemon) -> list[dict[str, Any]]:
    return [r for r in d.records() if r.get("event") == "validation.project_checked"
            and r.get("project") == "demo"]


def real_state_db(home: Path) -> Path:
    """A real state DB of the sample project, validated in full and closed cleanly."""
    config = write_config(home / "config.toml")
    settings = load_settings(config)
    store = StateStore(settings.state_db)
    try:
        Validator(store, settings, clock=lambda: NOW).validate_all(full=True)
    finally:
        store.close()
    return settings.state_db


class TestStartup:
    """A damaged state DB at startup: moved aside, rebuilt, the daemon comes up and validates."""

    @pytest.mark.slow
    def test_garbage_bytes_with_a_garbage_wal(self, home: Path, running: list[Daemon]) -> None:
        """A state DB that is not SQLite at all is moved aside with its -wal, and every row is
        validated again into a new one."""
        db = state_db(home)
        db.parent.mkdir(parents=True)
        db.write_bytes(b"this is not a database " * 400)
        Path(f"{db}-wal").write_bytes(b"\x00garbage wal" * 100)
        d = Daemon(write_config(home / "config.toml"))
        running.append(d)
        rebuilt = d.wait_event("store.state_db_rebuilt")
        assert rebuilt["level"] == "error" and rebuilt["reason"].startswith("corrupt")
        d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
        d.wait_event("service.started")
        moved = aside(db)
        assert len(moved) == 2 and moved[1].name == moved[0].name + "-wal"
        assert moved[0].read_bytes().startswith(b"this is not a database")
        assert d.proc.poll() is None
        assert validated_rows(db) == DEMO_ROWS
        assert d.stop() == 0

    @pytest.mark.slow
    def test_truncated_real_state_db(self, home: Path, running: list[Daemon]) -> None:
        """A real state DB cut in half fails quick_check: it is kept aside byte for byte and the
        daemon validates the project again from scratch."""
        db = real_state_db(home)
        assert validated_rows(db) == DEMO_ROWS
        os.truncate(db, db.stat().st_size // 2)
        cut = db.read_bytes()
        d = Daemon(write_config(home / "config.toml"))
        running.append(d)
        rebuilt = d.wait_event("store.state_db_rebuilt")
        assert rebuilt["level"] == "error"
        d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
        moved = aside(db)
        assert len(moved) == 1 and moved[0].read_bytes() == cut
        assert validated_rows(db) == DEMO_ROWS
        assert d.stop() == 0


class TestWhileRunning:
    """The health tick notices a state DB deleted or replaced under the running daemon."""

    @pytest.mark.slow
    def test_deleted_state_db_is_rebuilt_and_written_again(
            self, home: Path, running: list[Daemon]) -> None:
        """Deleting state.db is detected by inode, a new one is built, and the reconcile writes
        every row into it (not into the unlinked file)."""
        d = Daemon(write_config(home / "config.toml"))
        running.append(d)
        d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
        db = state_db(home)
        db.unlink()
        rebuilt = d.wait_event("store.state_db_rebuilt", reason="deleted")
        assert rebuilt["level"] == "error"
        wait_until(lambda: len([r for r in checked(d) if r.get("rows_checked") == DEMO_ROWS])
                   >= 2, what="a second full validation")
        wait_until(lambda: validated_rows(db) == DEMO_ROWS, what="rows in the new state DB")
        assert d.proc.poll() is None
        assert d.stop() == 0
        # what the stopped daemon leaves is whole and complete
        assert validated_rows(db) == DEMO_ROWS

    @pytest.mark.slow
    def test_restored_backup_is_adopted(self, home: Path, running: list[Daemon]) -> None:
        """A healthy state DB moved over the live one (a restored backup) is used as it is."""
        d = Daemon(write_config(home / "config.toml"))
        running.append(d)
        d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
        db = state_db(home)
        backup = db.with_name("backup.db")
        src = sqlite3.connect(db)
        dst = sqlite3.connect(backup)
        src.backup(dst)
        src.close()
        dst.close()
        os.replace(backup, db)
        adopted = d.wait_event("store.state_db_adopted", reason="replaced")
        assert adopted["level"] == "error" and not aside(db, "corrupt")
        assert validated_rows(db) == DEMO_ROWS
        assert d.stop() == 0


class TestVectorsSurvive:
    """After a rebuild the vector cache's index restores the embedding ledger."""

    @pytest.mark.slow
    def test_no_vector_is_computed_again(self, home: Path, running: list[Daemon]) -> None:
        """A rebuilt state DB knows every embedded file (also one deleted since), and the next
        embedding run makes zero model calls."""
        from tests.embedding_helpers import make_images

        photos = home / "photos"
        images = make_images(photos, 6)
        config = write_config(home / "config.toml", "\n".join([
            "[embedding]", 'model = "trainingd-tiny"', 'pretrained = "none"', 'device = "cpu"',
            "batch_size = 4", "decode_workers = 1", ""]), image_roots={"demo": [photos]})
        d1 = TinyModelDaemon(config)
        running.append(d1)
        d1.wait_for(lambda r: r.get("event") == "embedding.run_finished"
                    and r.get("embedded") == 6, timeout=120, what="6 images embedded")
        assert d1.stop() == 0
        images[0].unlink()  # a rejected image, deleted after review: its vector must stay known
        db = state_db(home)
        db.write_bytes(b"scrambled by a bad disk " * 300)

        d2 = TinyModelDaemon(config)
        running.append(d2)
        rebuilt = d2.wait_event("store.state_db_rebuilt", timeout=60)
        assert rebuilt["rebuilt"]["vectors"] == 6 and rebuilt["rebuilt"]["embedded_files"] == 6
        finished = d2.wait_event("embedding.run_finished", timeout=120)
        assert finished["embedded"] == 0
        assert sum(r.get("images", 0) for r in d2.records()
                   if r.get("event") == "embedding.batch_embedded") == 0
        assert d2.stop() == 0
        store = StateStore(db, read_only=True)
        try:
            rows = {Path(r[0]).name: r[1] for r in store.conn.execute(
                "SELECT path, embed_status FROM images WHERE project = 'demo' "
                "AND embed_status IS NOT NULL")}
            vectors = store.conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        finally:
            store.close()
        assert rows[images[0].name] == "ok" and len(rows) == 6 and vectors == 6


class TestStoreHealing:
    """StateStore's own healing, in process."""

    def _filled(self, path: Path, rows: int = 5000) -> None:
        store = StateStore(path)
        with store.transaction():
            store.upsert_rows("p", [(f"g{i}", f"g{i}", i, i, 0, 0, "approve", 0)
                                    for i in range(rows)], NOW)
        store.close()

    def test_corruption_met_during_work_raises_and_marks(self, tmp_path: Path) -> None:
        """A damaged page read during work raises StoreCorruptError (not a plain sqlite error),
        the store reports it to the health tick, and a marker makes the next start rebuild."""
        db = tmp_path / "state.db"
        self._filled(db)
        size = db.stat().st_size
        with db.open("r+b") as fh:
            fh.seek(size // 2 // 4096 * 4096)
            fh.write(b"\xff" * 4096)
        store = StateStore(db)
        with pytest.raises(StoreCorruptError):
            store.conn.execute("SELECT count(*), sum(digest) FROM row_state").fetchall()
        assert (store.check_file() or "").startswith("corrupt")
        assert Path(f"{db}{MARKER_SUFFIX}").is_file()
        store.close()
        healed = StateStore.open_checked(db)
        try:
            assert healed.row_figures("p")["validated"] == 0 and len(aside(db)) == 1
            assert not Path(f"{db}{MARKER_SUFFIX}").exists()
        finally:
            healed.close()

    def test_heal_while_open_swaps_to_a_new_file(self, tmp_path: Path) -> None:
        """heal("deleted") closes the unlinked file, moves its orphaned -wal/-shm aside (SQLite
        would replay them into the new file) and reopens at the path."""
        db = tmp_path / "state.db"
        store = StateStore.open_checked(db)
        try:
            with store.transaction():
                store.set_meta("k", "v")
            db.unlink()
            assert store.check_file() == "deleted"
            result = store.heal("deleted")
            assert not result.adopted and store.check_file() is None
            assert store.get_meta("k") is None
            with store.transaction():
                store.set_meta("k", "new")
        finally:
            store.close()
        reader = StateStore(db, read_only=True)
        try:
            assert reader.get_meta("k") == "new"
        finally:
            reader.close()

    def test_an_unopenable_path_is_not_mistaken_for_damage(self, tmp_path: Path) -> None:
        """A path SQLite cannot open (here a folder) raises StoreError and nothing is moved."""
        db = tmp_path / "state.db"
        db.mkdir()
        with pytest.raises(StoreError) as info:
            StateStore.open_checked(db)
        assert not isinstance(info.value, StoreCorruptError)
        assert db.is_dir() and not aside(db)


class TestRebuildSources:
    """What a rebuild re-derives from files."""

    def test_training_history_comes_back_from_the_registry(self, settings: Settings) -> None:
        """Every model's metadata becomes a finished run, so the retrain policy knows when it
        last trained (not due within min_interval_hours) instead of "never"."""
        import torch

        from daemon.training import policy, registry

        models = settings.models_dir
        for version, promoted in ((1, True), (2, False)):
            registry.save_model(models, "ranker", version, {"w": torch.zeros(2)}, {
                "kind": "ranker", "version": version, "file": f"ranker_v{version}.pt",
                "created_at": (NOW - timedelta(hours=3 - version)).isoformat(),
                "promoted": promoted, "promotion_reason": "why", "metrics": {"top1": 0.5}})
        store = StateStore(settings.state_db)
        try:
            counts = rebuild_derived(store, settings)
            assert counts["training_runs"] == 2
            history = policy.run_history(store)
            assert [(h.version, h.status) for h in history] == [
                (1, "promoted"), (2, "not_promoted")]
            cfg = settings.training.model_copy(update={"min_new_labels": 1})
            s2 = settings.model_copy(update={"training": cfg})
            with store.transaction():
                store.upsert_rows("p", [("g1", "g1", 1, 1, 0, 0, "approve", 0)], NOW)
            decision = policy.retrain_decision(store, s2, "ranker", NOW)
            assert not decision.due and "minimum interval" in decision.reason
            assert rebuild_derived(store, settings)["training_runs"] == 0  # idempotent
        finally:
            store.close()

    def test_bad_index_lines_are_skipped_and_counted(self, settings: Settings) -> None:
        """Lines that are not objects, name no vector file or have bad fields never stop the
        rebuild; the good ones are restored."""
        import numpy as np

        from daemon.embedding.cache import VectorCache

        cache = VectorCache(settings.cache_dir, "emb:1")
        cache.prepare()
        good, missing = "a" * 64, "b" * 64
        cache.write_vectors([(good, np.ones(8, dtype=np.float32) / np.sqrt(8))])
        line = {"hash": good, "embedder_id": "emb:1", "project": "p", "file_name": "x.png",
                "path": "/img/x.png", "width": 3, "height": 2, "time": "2025-01-01T00:00:00Z"}
        cache.append_index([line, {**line, "hash": missing}, {**line, "project": 7}])
        with cache.index_path.open("a") as fh:
            fh.write("[" * 5000 + "\n" + "not json\n")
        store = StateStore(settings.state_db)
        try:
            counts = rebuild_derived(store, settings)
            assert counts["vectors"] == 1 and counts["index_lines_without_vector"] == 1
            assert counts["index_lines_skipped"] == 3
            dim = store.conn.execute("SELECT dim FROM embeddings").fetchone()[0]
            assert dim == 8 and store.get_meta("embedding.embedder_id") == "emb:1"
        finally:
            store.close()
