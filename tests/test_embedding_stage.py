"""The embedding stage end to end with the tiny real model: the content-addressed cache, bad
images as issues, a kill -9 mid-batch, verify, the vector source and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from daemon.embedding.cache import VectorCache
from daemon.embedding.cli import add_embed_parser, cmd_embed, coverage
from daemon.embedding.lookup import CacheVectorSource
from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
from daemon.embedding.verify import verify_cache
from daemon.records import ImageCandidate
from daemon.settings import Settings
from daemon.store import StateStore
from tests.embedding_helpers import (
    CountingEmbedder,
    jpeg_bytes,
    make_images,
    photo,
    save,
    tiny_embedder,
    with_embedding,
)

HELPER = Path(__file__).with_name("embedding_helpers.py")


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    folders = {"alpha": tmp_path / "img alpha", "beta": tmp_path / "img beta"}
    for f in folders.values():
        f.mkdir()
    return folders


@pytest.fixture
def esettings(settings: Settings, roots: dict[str, Path]) -> Settings:
    return with_embedding(settings, {k: [v] for k, v in roots.items()})


@pytest.fixture
def embedder(esettings: Settings) -> CountingEmbedder:
    return tiny_embedder(esettings)


@pytest.fixture
def stage(esettings: Settings, store: StateStore, embedder: CountingEmbedder) -> EmbeddingStage:
    return EmbeddingStage(esettings, store, embedder=embedder)


def index_lines(s: Settings) -> list[dict[str, object]]:
    text = (s.cache_dir / "processed_images.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


class TestCache:
    def test_embeds_once_and_follows_the_convention(
            self, stage: EmbeddingStage, esettings: Settings, roots: dict[str, Path],
            embedder: CountingEmbedder) -> None:
        """Every image gets one float32 unit vector; a second run makes no model call."""
        make_images(roots["alpha"] / "sub dir", 6)
        first = stage.run(candidates_from_roots(esettings))
        assert (first.seen, first.embedded, first.failed) == (6, 6, 0)
        cache = VectorCache(esettings.cache_dir, embedder.embedder_id)
        vecs = [np.load(p) for p in cache.iter_vector_files()]
        assert len(vecs) == 6 and all(v.dtype == np.float32 and v.shape == (32,) for v in vecs)
        np.testing.assert_allclose([np.linalg.norm(v) for v in vecs], 1.0, atol=1e-5)
        lines = index_lines(esettings)
        assert {k for line in lines for k in line} == {
            "hash", "embedder_id", "project", "file_name", "path", "width", "height", "stage",
            "time"}
        assert {line["stage"] for line in lines} == {2.0}
        calls = embedder.calls
        again = stage.run(candidates_from_roots(esettings))
        assert (again.cached, again.embedded, embedder.calls) == (6, 0, calls)

    def test_rename_and_move_cost_zero_model_calls(
            self, stage: EmbeddingStage, esettings: Settings, store: StateStore,
            roots: dict[str, Path], embedder: CountingEmbedder) -> None:
        """A renamed and moved file is found by content: no model call, new name resolvable."""
        (path,) = make_images(roots["alpha"], 1)
        stage.run(candidates_from_roots(esettings))
        images = embedder.images
        target = roots["alpha"] / "__selected" / "20250101_000000_stage3_enhanced.jpg"
        target.parent.mkdir()
        path.rename(target)
        result = stage.run(candidates_from_roots(esettings))
        assert (result.moved, result.embedded, embedder.images) == (1, 0, images)
        source = CacheVectorSource(esettings, store)
        got = source.vectors_for("alpha", [target.name, path.name, "unknown.png"])
        assert set(got) == {target.name, path.name}
        np.testing.assert_array_equal(got[target.name], got[path.name])
        assert index_lines(esettings)[-1]["path"] == str(target)
        # both names resolve (the old one may still be named by a decision row)
        assert coverage(store, esettings)["alpha"] == {"seen": 2, "embedded": 2, "failed": 0}

    def test_deleted_file_keeps_its_vector(
            self, stage: EmbeddingStage, esettings: Settings, store: StateStore,
            roots: dict[str, Path]) -> None:
        """An embedded image deleted after review still resolves; it is not an issue."""
        (path,) = make_images(roots["alpha"], 1)
        cands = candidates_from_roots(esettings)
        stage.run(cands)
        path.unlink()
        result = stage.run(cands)
        assert (result.cached, result.failed, result.issues) == (1, 0, ())
        assert set(CacheVectorSource(esettings, store).vectors_for("alpha", [path.name])) == {
            path.name}

    def test_same_bytes_in_two_projects_embedded_once(
            self, stage: EmbeddingStage, esettings: Settings, store: StateStore,
            roots: dict[str, Path], embedder: CountingEmbedder) -> None:
        """Identical files in two projects cost one model input; both resolve to it."""
        (path,) = make_images(roots["alpha"], 1)
        (roots["beta"] / path.name).write_bytes(path.read_bytes())
        result = stage.run(candidates_from_roots(esettings))
        assert (result.embedded, result.moved, embedder.images) == (1, 1, 1)
        source = CacheVectorSource(esettings, store)
        a, b = source.vectors_for("alpha", [path.name]), source.vectors_for("beta", [path.name])
        np.testing.assert_array_equal(a[path.name], b[path.name])
        assert coverage(store, esettings) == {"alpha": {"seen": 1, "embedded": 1, "failed": 0},
                                              "beta": {"seen": 1, "embedded": 1, "failed": 0}}

    def test_priority_zero_first_and_limit(
            self, esettings: Settings, store: StateStore, roots: dict[str, Path],
            embedder: CountingEmbedder) -> None:
        """Images of newly validated rows (priority 0) are embedded before the backlog."""
        s = with_embedding(esettings, batch_size=1)
        stage = EmbeddingStage(s, store, embedder=embedder)
        paths = make_images(roots["alpha"], 4)
        cands = [ImageCandidate("alpha", p.name, p, 0 if i == 3 else 1)
                 for i, p in enumerate(paths)]
        result = stage.run(cands, limit=2)
        assert (result.embedded, result.seen) == (2, 2)
        assert [line["file_name"] for line in index_lines(s)] == [paths[3].name, paths[0].name]

    def test_should_stop_between_batches(
            self, esettings: Settings, store: StateStore, roots: dict[str, Path],
            embedder: CountingEmbedder) -> None:
        """A stop request ends the run after a whole batch; the next run finishes the rest."""
        s = with_embedding(esettings, batch_size=2, queue_batches=1)
        stage = EmbeddingStage(s, store, embedder=embedder)
        make_images(roots["alpha"], 6)
        result = stage.run(candidates_from_roots(s), should_stop=lambda: embedder.calls >= 1)
        assert result.stopped and result.embedded == 2 and len(index_lines(s)) == 2
        rest = stage.run(candidates_from_roots(s))
        assert (rest.cached, rest.embedded) == (2, 4) and embedder.images == 6

    def test_torn_index_line_is_repaired(
            self, esettings: Settings, store: StateStore, roots: dict[str, Path],
            embedder: CountingEmbedder) -> None:
        """A half-written last index line (a crash mid-append) is cut and the run goes on."""
        make_images(roots["alpha"], 2)
        EmbeddingStage(esettings, store, embedder=embedder).run(candidates_from_roots(esettings))
        index = esettings.cache_dir / "processed_images.jsonl"
        with index.open("ab") as fh:
            fh.write(b'{"hash": "abc", "embedder_')
        make_images(roots["alpha"], 1, start_seed=50)
        fresh = EmbeddingStage(esettings, store, embedder=embedder)
        fresh.run(candidates_from_roots(esettings))
        assert index.read_bytes().endswith(b"\n") and len(index_lines(esettings)) == 3
        assert verify_cache(esettings, store).ok


    def test_vector_written_before_a_crash_is_adopted(
            self, stage: EmbeddingStage, esettings: Settings, store: StateStore,
            roots: dict[str, Path], embedder: CountingEmbedder) -> None:
        """A .npy whose batch never committed (crash after the write) is used, not recomputed."""
        import hashlib

        (path,) = make_images(roots["alpha"], 1)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        cache = VectorCache(esettings.cache_dir, embedder.embedder_id)
        unit = np.eye(32, dtype=np.float32)[3]
        cache.write_vectors([(sha, unit)])
        result = stage.run(candidates_from_roots(esettings))
        assert (result.embedded, result.moved, embedder.calls) == (0, 1, 0)
        got = CacheVectorSource(esettings, store).vectors_for("alpha", [path.name])
        np.testing.assert_array_equal(got[path.name], unit)
        assert verify_cache(esettings, store).ok


class TestBadImages:
    def test_every_bad_kind_is_an_issue_and_the_batch_goes_on(
            self, tmp_path: Path, store: StateStore, settings: Settings,
            roots: dict[str, Path]) -> None:
        """Each bad file gets its exact code; the good files of the same batch are embedded."""
        root = roots["alpha"]
        s = with_embedding(settings, {"alpha": [root]}, batch_size=16, max_image_pixels=20_000)
        emb = tiny_embedder(s)
        good = make_images(root, 2)
        (root / "zero.png").write_bytes(b"")
        data = jpeg_bytes(photo(120, 90))
        (root / "cut.jpg").write_bytes(data[: len(data) // 2])
        png = save(photo(120, 90), root / "cut.png").read_bytes()
        (root / "cut.png").write_bytes(png[: len(png) // 2])
        (root / "text.png").write_text("not an image at all")
        save(photo(160, 150), root / "warn bomb.png")  # 24,000 px: Pillow's warning range
        save(photo(300, 300), root / "bomb.png")  # 90,000 px: Pillow's error range
        (root / "folder.png").mkdir()  # exists, cannot be read as a file
        cands = candidates_from_roots(s)
        cands.append(ImageCandidate("alpha", "gone.png", root / "gone.png"))
        cands.append(ImageCandidate("alpha", "folder.png", root / "folder.png"))
        result = EmbeddingStage(s, store, embedder=emb).run(cands)
        codes = {Path(i.db_file).name: i.code for i in result.issues}
        assert codes == {
            "zero.png": "image_empty", "cut.jpg": "image_truncated",
            "cut.png": "image_truncated", "text.png": "image_not_an_image",
            "warn bomb.png": "image_too_large", "bomb.png": "image_too_large",
            "folder.png": "image_unreadable", "gone.png": "image_vanished"}
        assert result.embedded == 2 and result.failed == 8
        assert {line["file_name"] for line in index_lines(s)} == {p.name for p in good}
        assert coverage(store, s)["alpha"] == {"seen": 10, "embedded": 2, "failed": 8}
        stored = store.conn.execute(
            "SELECT file_name, embed_code FROM images WHERE embed_status = 'failed'").fetchall()
        assert dict(stored) == codes

        # unchanged failures are not read again; a changed file is retried and embedded
        again = EmbeddingStage(s, store, embedder=emb).run(cands)
        assert again.skipped_failed == 6 and again.failed == 2  # vanished/unreadable retried
        save(photo(100, 80, seed=9), root / "cut.png")
        fixed = EmbeddingStage(s, store, embedder=emb).run(cands)
        assert fixed.embedded == 1 and "cut.png" not in {Path(i.db_file).name
                                                         for i in fixed.issues}

    def test_touched_but_identical_failure_is_not_decoded_again(
            self, store: StateStore, esettings: Settings, roots: dict[str, Path],
            embedder: CountingEmbedder) -> None:
        """A bad file whose mtime changed but whose bytes did not stays a skipped failure."""
        path = roots["alpha"] / "text.png"
        path.write_text("still not an image")
        stage = EmbeddingStage(esettings, store, embedder=embedder)
        assert stage.run(candidates_from_roots(esettings)).failed == 1
        os.utime(path, ns=(1, 1))
        again = stage.run(candidates_from_roots(esettings))
        assert (again.failed, again.skipped_failed, again.issues) == (0, 1, ())

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; "
                        "the folder-named-like-an-image case covers image_unreadable")
    def test_permission_denied_is_unreadable(
            self, stage: EmbeddingStage, roots: dict[str, Path]) -> None:
        """A file without read permission is image_unreadable."""
        path = save(photo(), roots["alpha"] / "locked.png")
        path.chmod(0)
        result = stage.run([ImageCandidate("alpha", path.name, path)])
        assert [i.code for i in result.issues] == ["image_unreadable"]


class TestCrash:
    def test_kill_9_mid_batch_leaves_a_consistent_cache(
            self, tmp_path: Path, settings: Settings, store: StateStore) -> None:
        """SIGKILL while embedding: no torn .npy, no index line without its file, and the
        restart embeds only what had no vector."""
        images = tmp_path / "photos here"
        make_images(images, 24)
        data_root = settings.data_root
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(data_root), str(images), "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": ""})
        index = settings.cache_dir / "processed_images.jsonl"
        try:
            wait_for(lambda: index.is_file() and index.read_bytes().count(b"\n") >= 4, 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        s = with_embedding(settings, {"p": [images]}, batch_size=2)
        emb = tiny_embedder(s)
        cache = VectorCache(s.cache_dir, emb.embedder_id)
        before = {p.stem for p in cache.iter_vector_files()}
        assert 4 <= len(before) < 24
        for p in cache.iter_vector_files():
            vec = np.load(p)  # whole: a torn file would not load
            assert vec.shape == (32,)
        for line in [json.loads(x) for x in index.read_bytes().splitlines(keepends=True)
                     if x.endswith(b"\n")]:
            assert cache.has(str(line["hash"]))
        result = EmbeddingStage(s, store, embedder=emb).run(candidates_from_roots(s))
        after = {p.stem for p in cache.iter_vector_files()}
        assert len(after) == 24 and result.embedded == 24 - len(before) == emb.images
        # vectors found on disk were committed (cached) or are adopted (moved), not recomputed
        assert result.cached + result.moved == len(before)
        report = verify_cache(s, store)
        assert report.ok, report.mismatches


class TestVerify:
    def test_planted_mismatches_are_all_reported(
            self, stage: EmbeddingStage, esettings: Settings, store: StateStore,
            roots: dict[str, Path], embedder: CountingEmbedder) -> None:
        """verify reports each kind of disagreement between cache, index, DB and files."""
        paths = make_images(roots["alpha"], 5)
        stage.run(candidates_from_roots(esettings))
        assert verify_cache(esettings, store).ok
        cache = VectorCache(esettings.cache_dir, embedder.embedder_id)
        vectors = list(cache.iter_vector_files())
        vectors[0].unlink()  # -> vector_missing + index_line_without_vector
        np.save(vectors[1], np.full(32, 0.5, dtype=np.float32))  # -> vector_invalid
        stray = cache.folder / "ff" / ("f" * 64 + ".npy")
        stray.parent.mkdir(exist_ok=True)
        np.save(stray, np.eye(32, dtype=np.float32)[0])  # -> vector_not_in_db
        (cache.folder / "ff" / ".x.npy.tmp").write_bytes(b"half")  # -> temp_file_left
        with (esettings.cache_dir / "processed_images.jsonl").open("a") as fh:
            fh.write("garbage\n")  # -> index_line_invalid
        save(photo(50, 50, seed=99), paths[2])  # -> file_changed
        paths[3].unlink()  # deleted images are counted, not reported
        report = verify_cache(esettings, store)
        kinds = sorted(m.kind for m in report.mismatches)
        assert kinds == sorted(["vector_missing", "index_line_without_vector", "vector_invalid",
                                "vector_not_in_db", "temp_file_left", "index_line_invalid",
                                "file_changed"])
        assert report.files_gone == 1


class TestCli:
    def _parse(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        add_embed_parser(sub, argparse.ArgumentParser(add_help=False))
        return parser.parse_args(["embed", *argv])

    def test_embed_then_verify(self, esettings: Settings, roots: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
        """`trainingd embed --project P` embeds that project; `--verify` then passes."""
        make_images(roots["alpha"], 3)
        make_images(roots["beta"], 2, start_seed=10)
        assert cmd_embed(self._parse("--project", "alpha"), esettings) == 0
        out = capsys.readouterr().out
        assert "3 image(s) seen: 3 embedded" in out and "random-init" in out
        assert cmd_embed(self._parse("--verify"), esettings) == 0
        assert "verify: OK" in capsys.readouterr().out
        store = StateStore(esettings.state_db)
        try:
            cov = coverage(store, esettings)
        finally:
            store.close()
        assert cov["alpha"] == {"seen": 3, "embedded": 3, "failed": 0}
        assert cov["beta"] == {"seen": 0, "embedded": 0, "failed": 0}

    def test_bad_arguments(self, esettings: Settings,
                           capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown project exits 2; --limit must be positive."""
        assert cmd_embed(self._parse("--project", "nope"), esettings) == 2
        assert "projects.nope" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            self._parse("--limit", "0")


class TestHostileIndexLines:
    """A damaged line in the cache's index is one bad line, never an exception."""

    def test_deep_and_huge_lines_read_as_bad_lines(self, tmp_path: Path) -> None:
        """Deep JSON and a 5,000-digit number read as ``None`` between two good lines."""
        from daemon.embedding.cache import read_index

        index = tmp_path / "processed_images.jsonl"
        index.write_bytes(b'{"a": 1}\n' + b"[" * 100_000 + b"\n" + b"9" * 5000 + b"\n"
                          + b'{"b": 2}\n')
        assert list(read_index(index)) == [(1, {"a": 1}), (2, None), (3, None), (4, {"b": 2})]
