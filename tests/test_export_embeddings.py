"""``trainingd export embeddings`` (issue 14, item 2): the export is read back whole by the
readers people use (embedding-reader; pyarrow + numpy), grows by new shards only, refuses
folders it cannot extend, skips damaged vectors with a reason, and survives a kill mid-shard."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.codes import CODES
from daemon.export.layout import ExportRefused
from daemon.export.run import ExportBusy, _folder_lock, export_embeddings
from daemon.settings import Settings
from daemon.store import StateStore
from tests.export_helpers import (
    DIM,
    EMBEDDER,
    OTHER_EMBEDDER,
    ROOT,
    add_images,
    cli,
    expected_by_key,
    exported_by_key,
    read_npy_export,
    tree,
)

pa = pytest.importorskip("pyarrow")
er = pytest.importorskip("embedding_reader")

Images = dict[tuple[str, str], tuple[str, np.ndarray]]


def run_export(settings: Settings, out: Path, **kw: Any) -> Any:
    kw.setdefault("embedder_id", EMBEDDER)
    kw.setdefault("projects", None)
    kw.setdefault("fmt", "npy")
    store = StateStore(settings.state_db, read_only=True)
    try:
        return export_embeddings(store, settings.cache_dir, out, **kw)
    finally:
        store.close()


def assert_export_equals(out: Path, images: Images) -> None:
    vectors, rows = read_npy_export(out)
    got, want = exported_by_key(vectors, rows), expected_by_key(images)
    assert sorted(got) == sorted(want)
    for key, vec in want.items():
        assert np.array_equal(got[key], vec), key


def read_with_embedding_reader(reader: Any, columns: list[str]
                               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    blocks, rows = [], []
    for emb, meta in reader(batch_size=7, show_progress=False):
        blocks.append(np.array(emb))
        rows.extend(meta[columns].to_dict("records"))
    return np.concatenate(blocks), rows


@pytest.fixture
def images(settings: Settings) -> Images:
    found = add_images(settings, list(range(40)))
    # the same bytes in another project: one vector, two rows
    found.update(add_images(settings, [100, 101], project="other", sha_seed={100: 3}))
    return found


class TestReadBack:
    """Every vector and every metadata row come back through the readers people use."""

    def test_embedding_reader_parquet_npy_reads_every_vector_and_row(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """embedding-reader's parquet_npy pairs each img_emb_N.npy with metadata_N.parquet."""
        out = tmp_path / "export"
        result = run_export(settings, out, shard_rows=16)
        assert [s.rows for s in result.shards] == [16, 16, 10]
        cols = ["image_path", "sha256", "project", "file_name", "stage", "width", "height",
                "embedder_id"]
        reader = er.EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                                    metadata_folder=str(out / "metadata"), meta_columns=cols)
        assert (reader.count, reader.dimension) == (42, DIM)
        vectors, rows = read_with_embedding_reader(reader, cols)
        got = exported_by_key(vectors, rows)
        want = expected_by_key(images)
        assert sorted(got) == sorted(want)
        for key, vec in want.items():
            assert np.array_equal(got[key], vec)
        shared = "/images/other/img_100_stage2_upscaled.jpg"
        row = next(r for r in rows if r["image_path"] == shared)
        assert row == {"image_path": shared,
                       "sha256": images[("other", row["image_path"])][0], "project": "other",
                       "file_name": "img_100_stage2_upscaled.jpg", "stage": 2.0,
                       "width": 740, "height": 480, "embedder_id": EMBEDDER}

    def test_pyarrow_and_numpy_read_every_vector_and_row(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """Each shard is a plain float32 (rows, dim) .npy aligned with its parquet rows."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16)
        assert_export_equals(out, images)
        block = np.load(out / "img_emb" / "img_emb_00000.npy", allow_pickle=False)
        assert (block.dtype, block.shape) == (np.float32, (16, DIM))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["embedder_id"] == EMBEDDER and manifest["rows"] == 42
        assert [s["rows"] for s in manifest["shards"]] == [16, 16, 10]

    def test_embedding_reader_npy_counts_every_vector(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """embedding-reader's plain npy reader (vectors only) sees the same 42 rows."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16)
        reader = er.EmbeddingReader(str(out / "img_emb"), file_format="npy")
        vectors = np.concatenate([e for e, _ in reader(batch_size=10, show_progress=False)])
        want, _ = read_npy_export(out)
        assert np.array_equal(vectors, want)

    def test_parquet_format_holds_vectors_in_the_parquet(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """--format parquet: embedding-reader's parquet reader finds vectors and rows."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16, fmt="parquet")
        assert not (out / "metadata").exists()
        cols = ["image_path", "sha256", "project"]
        reader = er.EmbeddingReader(str(out / "img_emb"), file_format="parquet",
                                    embedding_column="embedding", meta_columns=cols)
        vectors, rows = read_with_embedding_reader(reader, cols)
        got, want = exported_by_key(vectors, rows), expected_by_key(images)
        assert sorted(got) == sorted(want)
        for key, vec in want.items():
            assert np.array_equal(got[key], vec)

    def test_project_scope_exports_only_that_project(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """--project other exports only its two rows."""
        out = tmp_path / "export"
        run_export(settings, out, projects=["other"])
        assert_export_equals(out, {k: v for k, v in images.items() if k[0] == "other"})


class TestIncremental:
    """A second run adds new shards for new vectors only and never rewrites old ones."""

    def test_second_run_adds_only_new_shards(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """New images (one with bytes already exported under another name) go to new shards;
        the first run's files keep their inode, time and bytes."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16)
        before = tree(out)
        images.update(add_images(settings, [200, 201, 202, 203], sha_seed={200: 5}))
        result = run_export(settings, out, shard_rows=16)
        assert (result.rows_before, result.rows_written) == (42, 4)
        after = tree(out)
        for name, seen in before.items():
            if name != "manifest.json":
                assert after[name] == seen, name
        assert sorted(set(after) - set(before)) == ["img_emb/img_emb_00003.npy",
                                                    "metadata/metadata_00003.parquet"]
        assert_export_equals(out, images)

    def test_nothing_new_writes_nothing(self, settings: Settings, images: Images,
                                        tmp_path: Path) -> None:
        """A run with no new vectors leaves every file as it was, the manifest included."""
        out = tmp_path / "export"
        run_export(settings, out)
        before = tree(out)
        result = run_export(settings, out)
        assert result.rows_written == 0
        assert tree(out) == before

    def test_changed_bytes_of_a_path_are_a_new_row(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """A path whose bytes changed gets a row for its new vector; the old row stays."""
        out = tmp_path / "export"
        run_export(settings, out)
        changed = add_images(settings, [7], sha_seed={7: 9007})
        result = run_export(settings, out)
        assert result.rows_written == 1
        vectors, rows = read_npy_export(out)
        got = exported_by_key(vectors, rows)
        (project, path), (sha, vec) = next(iter(changed.items()))
        assert np.array_equal(got[(sha, project, path)], vec)
        assert (images[(project, path)][0], project, path) in got

    def test_export_reads_state_db_and_cache_without_changing_them(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """The state DB folder and the cache keep every file, byte and time (no -wal/-shm)."""
        state_before = tree(settings.state_db.parent)
        cache_before = tree(settings.cache_dir)
        run_export(settings, tmp_path / "export")
        assert tree(settings.state_db.parent) == state_before
        assert tree(settings.cache_dir) == cache_before

    def test_export_beside_a_running_daemons_open_state_db(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """With the daemon's writer connection open (WAL), the export reads every row and
        leaves the writer's files as they were; rows committed later go to the next run."""
        writer = StateStore(settings.state_db)
        try:
            companions = sorted(p.name for p in settings.state_db.parent.iterdir())
            run_export(settings, tmp_path / "export")
            assert sorted(p.name for p in settings.state_db.parent.iterdir()) == companions
            assert_export_equals(tmp_path / "export", images)
            images.update(add_images(settings, [600, 601]))
            assert run_export(settings, tmp_path / "export").rows_written == 2
        finally:
            writer.close()
        assert_export_equals(tmp_path / "export", images)


class TestRefusals:
    """A folder the export cannot extend is refused with a reason, and left as it was."""

    def test_changed_embedder_is_refused(self, settings: Settings, images: Images,
                                         tmp_path: Path) -> None:
        """Vectors of another embedder never join an export (not comparable)."""
        out = tmp_path / "export"
        run_export(settings, out)
        add_images(settings, [300, 301], embedder_id=OTHER_EMBEDDER)
        before = tree(out)
        with pytest.raises(ExportRefused, match="not comparable"):
            run_export(settings, out, embedder_id=OTHER_EMBEDDER)
        assert tree(out) == before

    @pytest.mark.parametrize(("change", "words"), [
        ({"fmt": "parquet"}, "--format npy export"),
        ({"projects": ["mojo3"]}, "every project"),
    ])
    def test_other_format_or_scope_is_refused(self, settings: Settings, images: Images,
                                              tmp_path: Path, change: dict[str, Any],
                                              words: str) -> None:
        """Format and project scope are held to the manifest."""
        out = tmp_path / "export"
        run_export(settings, out)
        before = tree(out)
        with pytest.raises(ExportRefused, match=words):
            run_export(settings, out, **change)
        assert tree(out) == before

    @pytest.mark.parametrize("content", [
        b"{not json", b"[]", b"[" * 100_000, b'{"version": 1, "format": "npy"}',
        b'{"version": 1, "format": "npy", "projects": null, "embedder_id": "x", '
        b'"shards": [{"index": -1}]}',
        json.dumps({"version": 1, "format": "npy", "projects": None, "embedder_id": EMBEDDER,
                    "shards": [{"index": 0, "rows": 5, "embeddings": "../../etc/passwd",
                                "metadata": None, "distinct_hashes": 5, "first_key": [],
                                "last_key": [], "written_at": "x"}]}).encode(),
        b'{"version": 1, "format": "npy", "projects": null, "embedder_id": "x", "dim": "' +
        b"9" * 5000 + b'", "shards": []}',
    ], ids=["torn", "list", "deep", "missing-keys", "bad-shard", "escaping-path", "huge-dim"])
    def test_damaged_manifest_is_refused(self, settings: Settings, images: Images,
                                         tmp_path: Path, content: bytes) -> None:
        """A damaged manifest (torn, wrong shape, too deep, escaping paths) refuses the export
        with a reason and writes nothing: its shards cannot be told from leftovers."""
        out = tmp_path / "export"
        out.mkdir()
        (out / "manifest.json").write_bytes(content)
        before = tree(out)
        with pytest.raises(ExportRefused, match="damaged"):
            run_export(settings, out)
        assert tree(out) == before

    def test_folder_that_is_not_an_export_is_refused(self, settings: Settings, images: Images,
                                                     tmp_path: Path) -> None:
        """A folder with files but no manifest (a clip-retrieval export, photos) is not ours."""
        out = tmp_path / "export"
        (out / "img_emb").mkdir(parents=True)
        (out / "img_emb" / "img_emb_0.npy").write_bytes(b"theirs")
        with pytest.raises(ExportRefused, match="not a trainingd export"):
            run_export(settings, out)
        assert [p.name for p in (out / "img_emb").iterdir()] == ["img_emb_0.npy"]

    def test_out_that_is_a_file_is_refused(self, settings: Settings, images: Images,
                                           tmp_path: Path) -> None:
        """--out naming a file is refused, the file kept."""
        out = tmp_path / "export"
        out.write_text("a file")
        with pytest.raises(ExportRefused, match="not a folder"):
            run_export(settings, out)
        assert out.read_text() == "a file"

    def test_shard_changed_by_hand_is_refused(self, settings: Settings, images: Images,
                                              tmp_path: Path) -> None:
        """A listed shard with other rows than the manifest says is refused, not extended."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16)
        meta = out / "metadata" / "metadata_00001.parquet"
        meta.unlink()
        add_images(settings, [400])
        with pytest.raises(ExportRefused, match="changed by hand"):
            run_export(settings, out, shard_rows=16)
        assert not (out / "img_emb" / "img_emb_00003.npy").exists()

    def test_second_export_into_the_same_folder_waits_its_turn(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """While one export holds the folder, another is refused as busy (exit 75)."""
        out = tmp_path / "export"
        out.mkdir()
        with _folder_lock(out):
            with pytest.raises(ExportBusy):
                run_export(settings, out)
            proc = cli(settings, "--out", str(out))
        assert proc.returncode == 75, proc.stderr
        assert not (out / "manifest.json").exists()


class TestBadVectors:
    """A missing or damaged cache file leaves its row out with a code; the rest is exported."""

    @pytest.mark.parametrize(("damage", "code"), [
        ("missing", "export_vector_missing"),
        ("truncated", "export_vector_damaged"),
        ("float64", "export_vector_shape"),
        ("not_unit", "export_vector_not_unit"),
        ("nan", "export_vector_not_unit"),
        ("fifo", "export_vector_unreadable"),
        ("folder", "export_vector_unreadable"),
    ])
    def test_damaged_vector_is_skipped_with_its_code(
            self, settings: Settings, images: Images, tmp_path: Path, damage: str,
            code: str) -> None:
        """The one damaged row is skipped with its code and path; every other row exported."""
        from daemon.embedding.cache import VectorCache

        project, path = ("mojo3", "/images/mojo3/img_11_stage2_upscaled.jpg")
        sha = images[(project, path)][0]
        npy = VectorCache(settings.cache_dir, EMBEDDER).vector_path(sha)
        npy.unlink()
        if damage == "truncated":
            npy.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'")
        elif damage == "float64":
            np.save(npy, np.ones(DIM) / np.sqrt(DIM))
        elif damage == "not_unit":
            np.save(npy, np.full(DIM, 2.0, dtype=np.float32))
        elif damage == "nan":
            np.save(npy, np.full(DIM, np.nan, dtype=np.float32))
        elif damage == "fifo":
            os.mkfifo(npy)
        elif damage == "folder":
            npy.mkdir()
        out = tmp_path / "export"
        result = run_export(settings, out)
        assert result.skipped_total == 1
        skipped = result.skipped[0]
        assert (skipped.code, skipped.project, skipped.path) == (code, project, path)
        assert skipped.message
        assert CODES[code].room == "export"
        assert_export_equals(out, {k: v for k, v in images.items() if k != (project, path)})


def _temps(out: Path) -> list[Path]:
    return [p for d in ("img_emb", "metadata") if (out / d).is_dir()
            for p in (out / d).glob(".*.tmp")]


class TestKillSafety:
    """A killed export leaves no half shard listed, and the next run completes the export."""

    @pytest.mark.slow
    def test_sigkill_mid_shard_then_rerun_exports_every_row_once(
            self, settings: Settings, tmp_path: Path) -> None:
        """SIGKILL while a shard's temp files exist: the manifest lists only whole shards,
        readers see whole shards only, and the next run removes the leftovers and finishes."""
        images = add_images(settings, list(range(1500)))
        out = tmp_path / "export"
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "export", "embeddings", "--out", str(out),
             "--shard-rows", "100"], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("TRAININGD_")},
                 "TRAININGD_PATHS__DATA_ROOT": str(settings.data_root)})
        caught = False
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if _temps(out):
                    os.kill(proc.pid, signal.SIGSTOP)
                    if _temps(out):  # stopped with a shard half written: kill it there
                        caught = True
                        break
                    os.kill(proc.pid, signal.SIGCONT)
        finally:
            proc.kill()
            proc.wait()
        assert caught, "the export finished before a shard could be caught mid-write"
        assert _temps(out), "the half-written shard's temp files are left by the kill"
        manifest = json.loads((out / "manifest.json").read_text())
        listed = {s["embeddings"] for s in manifest["shards"]}
        assert len(listed) < 15
        for shard in manifest["shards"]:
            block = np.load(out / shard["embeddings"], allow_pickle=False)
            assert block.shape == (shard["rows"], DIM)
        result = run_export(settings, out, shard_rows=100)
        assert result.rows_before + result.rows_written == 1500
        assert _temps(out) == []
        assert_export_equals(out, images)

    def test_leftover_of_a_kill_between_renames_is_removed(
            self, settings: Settings, images: Images, tmp_path: Path) -> None:
        """A metadata shard renamed before its vectors (kill in between) is unlisted: readers
        never pair it, and the next run removes it and writes the shard again."""
        out = tmp_path / "export"
        run_export(settings, out, shard_rows=16)
        leftover = out / "metadata" / "metadata_00003.parquet"
        leftover.write_bytes((out / "metadata" / "metadata_00002.parquet").read_bytes())
        reader = er.EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                                    metadata_folder=str(out / "metadata"),
                                    meta_columns=["sha256"])
        assert reader.count == 42
        images.update(add_images(settings, [500]))
        result = run_export(settings, out, shard_rows=16)
        assert (result.orphans_removed, result.rows_written) == (1, 1)
        assert_export_equals(out, images)


class TestCommand:
    """The command line: exit codes, JSON output, and files as readable as the umask says."""

    def test_cli_writes_files_with_the_umask_mode(self, settings: Settings, images: Images,
                                                  tmp_path: Path) -> None:
        """Under umask 027 every file the export writes is 0640 (mkstemp alone makes 0600)."""
        out = tmp_path / "export"
        proc = cli(settings, "--out", str(out), "--json", umask=0o027)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert (doc["rows_written"], doc["skipped_total"]) == (42, 0)
        files = [p for p in out.rglob("*") if p.is_file() and p.name != ".export.lock"]
        assert len(files) == 3
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o640, p

    def test_cli_without_embeddings_exits_1(self, settings: Settings, tmp_path: Path) -> None:
        """No state DB yet: exit 1 with a sentence naming what to run first."""
        proc = cli(settings, "--out", str(tmp_path / "export"))
        assert proc.returncode == 1
        assert "trainingd embed" in proc.stderr

    @pytest.mark.slow
    def test_cli_refusal_exits_78(self, settings: Settings, images: Images,
                                  tmp_path: Path) -> None:
        """A refused folder (other format) and an unknown --project exit 78 with a reason."""
        out = tmp_path / "export"
        assert cli(settings, "--out", str(out)).returncode == 0
        proc = cli(settings, "--out", str(out), "--format", "parquet")
        assert proc.returncode == 78 and "--format npy export" in proc.stderr
        proc = cli(settings, "--out", str(tmp_path / "x"), "--project", "nosuch")
        assert proc.returncode == 78 and "nosuch" in proc.stderr
