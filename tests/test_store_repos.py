"""The store owns its tables (issue 11, item 3): one chunking helper, one ``images`` table made
by a named migration that loses no row of ``embed_files``, and no SQL on the state DB outside
``daemon/store/``."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.store import StateStore
from daemon.store.chunks import IN_CHUNK, in_chunks
from daemon.store.embeddings import FileRow
from daemon.store.migrations import MIGRATIONS

NOW = datetime(2025, 7, 8, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


class TestInChunks:
    @pytest.mark.parametrize(("n", "chunks"), [(0, 0), (1, 1), (499, 1), (500, 1), (501, 2),
                                              (10_000, 20)])
    def test_boundaries(self, n: int, chunks: int) -> None:
        """Every id comes back once, in order, in chunks of at most 500 with matching marks."""
        parts = list(in_chunks(range(n)))
        assert len(parts) == chunks
        assert [i for part, _ in parts for i in part] == list(range(n))
        assert all(len(part) <= IN_CHUNK and marks == ",".join("?" * len(part))
                   for part, marks in parts)

    def test_bad_size(self) -> None:
        """A chunk size below 1 is refused instead of looping for ever."""
        with pytest.raises(ValueError, match="at least 1"):
            list(in_chunks([1], 0))

    def test_state_db_query_over_10k_keys(self, tmp_path: Path) -> None:
        """The store answers for 10k row keys at once (more than any SQLite variable limit)."""
        store = StateStore(tmp_path / "state.db")
        try:
            rows = [(f"k{i}", None, i, i, 0, 0, "approve", 0) for i in range(10_000)]
            with store.transaction():
                store.upsert_rows("p", rows, NOW)
            assert len(store.row_states("p", [r[0] for r in rows])) == 10_000
            assert store.row_states("p", []) == {}
        finally:
            store.close()


# -- the images merge -------------------------------------------------------------------------

#: the writes of the image index and the embedding ledger as they were before 0005
OLD_INDEX = ("INSERT INTO images (project, path, file_name, size, mtime_ns, sha256, stage, "
             "seen_at, gone_at) VALUES (?,?,?,?,?,?,?,?,?)")
OLD_LEDGER = ("INSERT OR REPLACE INTO embed_files (project, path, file_name, size, mtime_ns, "
              "sha256, status, code, message, width, height, updated_at) "
              "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
OLD_COVERAGE = (
    "SELECT project, count(*) FROM (SELECT project, file_name FROM images "
    "UNION SELECT project, file_name FROM embed_files) GROUP BY project")
SHA = {n: f"{n:064x}" for n in range(1, 8)}
T0 = "2025-07-01T00:00:00Z"


def _old_state_db(path: Path) -> None:
    """A state DB built by the previous schema (migrations 0001-0004), filled the old way."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    for name, sql in MIGRATIONS[:4]:
        conn.executescript(sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (name,))
    d = "/img/p/"
    conn.executemany(OLD_INDEX, [
        # both rooms, same bytes
        ("p", d + "a_stage2_upscaled.png", "a_stage2_upscaled.png", 10, 100, SHA[1], 2.0, T0,
         None),
        # both rooms, the index saw newer bytes since the stage read them (hash cleared)
        ("p", d + "b.png", "b.png", 20, 200, None, None, T0, None),
        # embedded, then deleted after review
        ("p", d + "c.png", "c.png", 30, 300, SHA[3], None, T0, T0),
        # only the index knows it (waiting)
        ("p", d + "d.png", "d.png", 40, 400, None, None, T0, None),
    ])
    conn.executemany(OLD_LEDGER, [
        ("p", d + "a_stage2_upscaled.png", "a_stage2_upscaled.png", 10, 100, SHA[1], "ok",
         None, None, 64, 32, T0),
        ("p", d + "b.png", "b.png", 19, 199, SHA[2], "ok", None, None, 8, 8, T0),
        ("p", d + "c.png", "c.png", 30, 300, SHA[3], "ok", None, None, 8, 8, T0),
        # only the stage knows these: a failed read and one restored from the cache index
        ("p", d + "e_stage3_enhanced.png", "e_stage3_enhanced.png", 5, 50, None, "failed",
         "image_corrupt", "cannot identify image", None, None, T0),
        ("q", "/img/q/f.png", "f.png", None, None, SHA[6], "ok", None, None, 8, 8, T0),
    ])
    conn.executemany("INSERT INTO embeddings VALUES (?,?,?,?,?,?)",
                     [(SHA[n], "e1", 4, 8, 8, T0) for n in (1, 2, 3, 6)])
    conn.close()


class TestImagesMerge:
    def test_migration_keeps_every_row(self, tmp_path: Path) -> None:
        """0005 folds embed_files into images: every path of both, the stage's verdicts, the
        same coverage and fates as before, and the old table gone."""
        db = tmp_path / "state.db"
        _old_state_db(db)
        old = sqlite3.connect(db)
        old_seen = dict(old.execute(OLD_COVERAGE).fetchall())
        old_files = {(r[0], r[1]): r for r in old.execute("SELECT * FROM embed_files")}
        old_paths = {r for r in old.execute(
            "SELECT project, path FROM images UNION SELECT project, path FROM embed_files")}
        old.close()

        store = StateStore(db)
        try:
            tables = {r[0] for r in store.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "embed_files" not in tables
            assert {(r[0], r[1]) for r in store.conn.execute(
                "SELECT project, path FROM images")} == old_paths
            for (project, path), r in old_files.items():
                row = store.embeddings.file_row(project, path)
                assert row == FileRow(project, path, r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                      r[9], r[10])
            assert store.embeddings.file_row("p", "/img/p/d.png") is None
            cover = store.embeddings.coverage("e1")
            assert {p: c["seen"] for p, c in cover.items()} == old_seen
            assert cover["p"] == {"seen": 5, "embedded": 3, "failed": 1}
            assert store.embeddings.fates("e1") == {
                "p": {"embedded": 3, "failed": 0, "waiting": 1, "lost": 1},
                "q": {"embedded": 1, "failed": 0, "waiting": 0, "lost": 0}}
            assert store.embeddings.shas_for("p", ["a_stage2_upscaled.png", "b.png", "c.png",
                                                   "d.png"]) == {
                "a_stage2_upscaled.png": SHA[1], "b.png": SHA[2], "c.png": SHA[3]}
            # rows the index never saw are kept but not counted as on disk, with their stage
            assert store.conn.execute(
                "SELECT stage, gone_at IS NOT NULL FROM images WHERE file_name = "
                "'e_stage3_enhanced.png'").fetchone() == (3.0, 1)
            assert store.embeddings.backlog("e1") == {"p": 1}
        finally:
            store.close()

    def test_index_change_clears_the_stage_verdict(self, tmp_path: Path) -> None:
        """Other bytes at a path forget the hash and verdict, so the stage reads them again."""
        store = StateStore(tmp_path / "state.db")
        try:
            f = FileRow("p", "/x/a.png", "a.png", 10, 100, SHA[1], "ok", width=8, height=8)
            store.embeddings.record([f], [], NOW, "e1")
            with store.transaction():
                store.images.upsert_seen("p", "/x/a.png", "a.png", 10, 100, None, NOW)
            assert store.embeddings.file_row("p", "/x/a.png") == f
            with store.transaction():
                store.images.upsert_seen("p", "/x/a.png", "a.png", 11, 101, None, NOW)
            assert store.embeddings.file_row("p", "/x/a.png") is None
            assert store.embeddings.shas_for("p", ["a.png"]) == {}
        finally:
            store.close()


# -- no SQL on the state DB outside the store -------------------------------------------------

#: modules outside daemon/store/ that may run SQL, and why
ALLOWED = {
    "daemon/sqlite_ro.py": "the read-only connection factory itself (source DBs)",
    "daemon/decisions/reader.py": "reads upstream decision DBs, never the state DB",
    "daemon/decisions/schema.py": "creates and inspects upstream-format decision DBs",
    "daemon/backfill/run.py": "writes its own scratch DB (cross-line state, issue lists)",
    "daemon/backfill/options.py": "reads the issue lists back from the run's scratch DB",
    "daemon/backfill/output.py": "writes new v3 decision DBs (upstream format)",
    "daemon/sample.py": "writes demo decision DBs (upstream format)",
    "daemon/simulator.py": "plays the upstream reviewer writing its decision DB",
    "daemon/demo/sample.py": "writes demo decision DBs (upstream format)",
    "daemon/demo/simulator.py": "plays the upstream reviewer writing its decision DB",
    "daemon/predict/store.py": "trainingd's own predictions DB (ai_data/predictions/<project>.db), "
                               "never the state DB",
    "daemon/training/audit.py": "token ledger: store.training.token_day/add_tokens are ready; "
                                "the file is being reworked for issue 12, move it then",
    "daemon/training/dataset.py": "one read of row_state; the file is being reworked for "
                                  "issue 12 (leak-proof splits), move it then",
}
_SQL = re.compile(r"\.(execute|executemany|executescript)\(|store\.conn\b|"
                  r"transaction\(\) as ")


class TestStoreOwnsItsSQL:
    def test_no_sql_outside_the_store(self) -> None:
        """No module outside daemon/store/ runs SQL unless the allow-list says why."""
        found = []
        for path in sorted((ROOT / "daemon").rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("daemon/store/") or rel in ALLOWED:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _SQL.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
        assert found == []

    def test_one_chunk_loop(self) -> None:
        """The chunked IN (...) loop is written once: every other room calls in_chunks."""
        loops = [p.relative_to(ROOT).as_posix() for p in (ROOT / "daemon").rglob("*.py")
                 if re.search(r"range\(0, len\(\w+\), _?\w*CHUNK", p.read_text())]
        assert loops == []
