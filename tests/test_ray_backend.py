"""The Ray Data backend for bulk embedding (issue 14, item 1).

Real parts: a real local Ray cluster (``num_cpus=2``, no dashboard, localhost only) started by
a real driver subprocess (so a test can SIGKILL it, and so no Ray thread lives in pytest), the
tests' tiny random-init open_clip model on both paths, real image files (JPEG, PNG, corrupt,
empty), the real state DB and cache.  Every Ray process of a test runs under the test's own
``RAY_TMPDIR`` and must be gone when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import Ledger
from daemon.embedding.ray_backend import INSTALL_HINT, hand_to_ray
from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
from daemon.embedding.verify import verify_cache
from daemon.settings import EmbeddingSettings, Settings
from daemon.store import StateStore
from tests.embedding_helpers import make_images, tiny_embedder, with_embedding
from tests.ray_helpers import RAY_SETTINGS, wait_no_ray_processes

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "ray_helpers.py"
RUN_TIMEOUT_S = 600


@pytest.fixture
def ray_env() -> Iterator[dict[str, str]]:
    """The environment of a driver subprocess: its own short RAY_TMPDIR (Ray's sockets live
    there, and a path over ~100 bytes breaks them), offline, no usage report; no Ray process
    may outlive the test."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    try:
        yield env
    finally:
        left = wait_no_ray_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes outlived the test: {left}"


def _images(folder: Path, count: int) -> list[Path]:
    paths = make_images(folder, count)
    (folder / "20250101_900000_stage2_corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "20250101_900001_stage2_empty.png").write_bytes(b"")
    return paths


def _local(settings: Settings, image_root: Path, data: str) -> Settings:
    """The local path's run over the same files, in a data root of its own."""
    local = with_embedding(settings.with_data_root(settings.data_root.parent / data),
                           {"p": [image_root]}, **RAY_SETTINGS)
    store = StateStore(local.state_db)
    try:
        EmbeddingStage(local, store, embedder=tiny_embedder(local)).run(
            candidates_from_roots(local))
    finally:
        store.close()
    return local


def _facts(settings: Settings) -> dict[str, tuple[str | None, str | None, np.ndarray | None]]:
    """path -> (status, issue code, vector) as the ledger and cache hold them."""
    store = StateStore(settings.state_db)
    try:
        rows = Ledger(store).file_rows()
        embedder_ids = {v.embedder_id for v in Ledger(store).vector_rows()}
    finally:
        store.close()
    assert len(embedder_ids) <= 1
    cache = VectorCache(settings.cache_dir, next(iter(embedder_ids), ""))
    return {Path(r.path).name: (r.status, r.code,
                                cache.load(r.sha256) if r.status == "ok" and r.sha256 else None)
            for r in rows}


def _assert_same(ray: dict[str, tuple[str | None, str | None, np.ndarray | None]],
                 local: dict[str, tuple[str | None, str | None, np.ndarray | None]]) -> None:
    assert sorted(ray) == sorted(local)
    for name, (status, code, vec) in local.items():
        r_status, r_code, r_vec = ray[name]
        assert (r_status, r_code) == (status, code), name
        if vec is not None:
            assert r_vec is not None
            assert float(np.dot(vec, r_vec)) >= 0.9999, name


def _count(db: Path, sql: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or mid-migration
        return 0


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HELPER), *args], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, check=False)


@pytest.mark.slow
class TestRayMatchesLocal:
    """``trainingd embed --backend ray`` on a real local cluster gives the local path's result."""

    def test_cli_vectors_and_issues_equal_the_local_path(
            self, settings: Settings, tmp_path: Path, ray_env: dict[str, str]) -> None:
        """Every vector matches the local path's (cosine >= 0.9999), bad files get the same
        codes, --json prints one clean document, and a local run afterwards reuses it all."""
        pytest.importorskip("ray.data")
        images = tmp_path / "img"
        _images(images, 8)
        ray_settings = with_embedding(settings, {"p": [images]}, **RAY_SETTINGS)
        config = tmp_path / "config.toml"
        config.write_text(
            f'[paths]\ndata_root = "{settings.data_root}"\n'
            '[embedding]\nmodel = "trainingd-tiny"\npretrained = "none"\ndevice = "cpu"\n'
            'batch_size = 2\nray_local_cpus = 2\n'
            f'[projects.p]\nimage_roots = ["{images}"]\n')
        done = _run(["cli", str(config)], ray_env)
        assert done.returncode == 0, done.stderr[-3000:]
        doc = json.loads(done.stdout)
        assert (doc["embedded"], doc["failed"], doc["seen"]) == (8, 2, 10)
        assert sorted(i["code"] for i in doc["issues"]) == ["image_empty", "image_not_an_image"]
        local = _local(settings, images, "local")
        _assert_same(_facts(ray_settings), _facts(local))
        store = StateStore(ray_settings.state_db)
        try:
            again = EmbeddingStage(ray_settings, store, embedder=tiny_embedder(ray_settings)
                                   ).run(candidates_from_roots(ray_settings))
            assert (again.embedded, again.cached) == (0, 8)
            assert verify_cache(ray_settings, store).ok
        finally:
            store.close()


@pytest.mark.slow
class TestRayKilledMidway:
    """A Ray run killed with SIGKILL in the middle resumes with no lost or doubled vector."""

    def test_sigkill_then_daemon_handover_resumes(
            self, settings: Settings, tmp_path: Path, ray_env: dict[str, str]) -> None:
        """The driver is killed after some batches are written; the daemon's stage (backlog
        over ray_min_backlog, ray_address set) hands the rest to Ray and every file ends with
        exactly one vector, equal to the local path's."""
        pytest.importorskip("ray.data")
        images = tmp_path / "img"
        paths = make_images(images, 16)
        ray_settings = with_embedding(settings, {"p": [images]}, **RAY_SETTINGS)
        db = ray_settings.state_db
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), "embed", str(settings.data_root), str(images), "1.0"],
            env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while _count(db, "SELECT count(*) FROM embeddings") < 2:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "no batch was written in time"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        written = _count(db, "SELECT count(*) FROM embeddings")
        assert 2 <= written < len(paths), "the kill did not land mid-way"
        # no wait for the killed cluster: its raylet and GCS die with the driver (Ray's fate
        # sharing), its agents within ~2 minutes (the fixture checks); a new run starts afresh
        done = _run(["daemon", str(settings.data_root), str(images)], ray_env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "backend=ray" in done.stdout  # the run_finished line: Ray did the work
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["seen"] == len(paths)
        assert result["embedded"] + result["moved"] + result["cached"] == len(paths)
        assert _count(db, "SELECT count(*) FROM embeddings") == len(paths)
        assert _count(db, "SELECT count(DISTINCT path) FROM images WHERE embed_status = 'ok'"
                      ) == len(paths)
        npy = list(settings.cache_dir.rglob("*.npy"))
        assert len(npy) == len(paths) == len({p.name for p in npy})
        _assert_same(_facts(ray_settings), _facts(_local(settings, images, "local")))
        store = StateStore(ray_settings.state_db)
        try:
            assert verify_cache(ray_settings, store).ok
        finally:
            store.close()


class TestWithoutRay:
    """Without the [ray] extra nothing changes, and --backend ray says how to install it."""

    def test_backend_ray_without_the_extra_exits_78_naming_the_install(
            self, tmp_path: Path) -> None:
        """`trainingd embed --backend ray` where ray cannot be imported: exit 78, the pip
        command on stderr, nothing embedded."""
        images = tmp_path / "img"
        make_images(images, 2)
        config = tmp_path / "config.toml"
        config.write_text(f'[paths]\ndata_root = "{tmp_path / "data"}"\n'
                          f'[projects.p]\nimage_roots = ["{images}"]\n')
        code = ("import sys; sys.modules['ray'] = None\n"
                "from daemon.cli import main\n"
                f"sys.exit(main(['embed', '--backend', 'ray', '--config', {str(config)!r}]))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              check=False, cwd=ROOT)
        assert done.returncode == 78, done.stderr[-2000:]
        assert INSTALL_HINT in done.stderr
        assert not list((tmp_path / "data").rglob("*.npy"))

    def test_the_daemon_hands_over_only_a_large_backlog_with_an_address(self) -> None:
        """No address: never; an address: only a backlog larger than ray_min_backlog."""
        plain = EmbeddingSettings()
        assert not hand_to_ray(plain, 10**9)
        cluster = EmbeddingSettings(ray_address="auto", ray_min_backlog=100)
        assert not hand_to_ray(cluster, 100)
        assert hand_to_ray(cluster, 101) == ("ray" in sys.modules
                                             or _importable("ray"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
