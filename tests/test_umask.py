"""Outputs honour the umask and ``status`` is read-only for any user (issue 9, item 6).

``mkstemp`` makes 0600 files whatever the umask, so the reviewer (another user) could not load
the models made for it, and ``trainingd status`` run by an operator said "not running" while
the daemon ran.  Here real processes run under umask 022 and 027 and every file and folder
they make is checked; ``status`` runs as a real other user (``nobody``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.demo.sample import write_sample_project
from tests.daemon_harness import Daemon, wait_until, write_config

REPO = Path(__file__).resolve().parents[1]
DEMO_ROWS = 52
NOBODY = 65534

#: run in a child under the umask: a model through the registry (and its promotion into the
#: reviewer's folder) and vectors through the content-addressed cache
CHILD = """
import sys
from pathlib import Path
from datetime import datetime, UTC
import numpy as np, torch
from daemon.settings import load_settings
from daemon.training import registry
from daemon.embedding.cache import VectorCache
s = load_settings(Path(sys.argv[1]))
meta = {"kind": "ranker", "version": 1, "file": "ranker_v1.pt"}
state = {"w": torch.zeros(3)}
registry.save_model(s.models_dir, "ranker", 1, state, meta)
rmeta = {**registry.reviewer_metadata(meta), "embedder_id": "x", "embedder_random": False}
registry.promote(s.models_dir, "ranker", 1, state, meta, datetime.now(UTC),
                 reviewer=(state, rmeta))
cache = VectorCache(s.cache_dir, "emb:umask")
cache.prepare()
sha = "c" * 64
cache.write_vectors([(sha, np.ones(4, dtype=np.float32) / 2)])
cache.append_index([{"hash": sha, "embedder_id": "emb:umask", "project": "demo",
                     "file_name": "x.png", "path": "/x.png", "time": "2025-01-01T00:00:00Z"}])
"""


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Children started inside inherit ``mask`` (set before their exec)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under ``root`` -> (mode, inode, size, mtime_ns)."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


class TestOutputsHonourTheUmask:
    """Every file and folder trainingd makes has the mode the umask gives."""

    @pytest.mark.slow
    @pytest.mark.parametrize(("mask", "file_mode", "dir_mode"),
                             [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
    def test_every_output_has_the_umask_mode(self, tmp_path: Path, mask: int, file_mode: int,
                                             dir_mode: int) -> None:
        """Trigger result, inspection report, heartbeat, state DB, model files (also the
        reviewer's copy), champion pointer, vectors and the cache index: 0644/0755 under umask
        022, 0640/0750 under 027; nothing is 0600."""
        write_sample_project(decisions(tmp_path), "demo", rows=40)
        config = write_config(tmp_path / "config.toml")
        before = set(tree(tmp_path))
        with umask(mask):
            d = Daemon(config)
        try:
            d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
            trigger = tmp_path / "data" / "triggers" / "inspect.json"
            trigger.write_text('{"project": "demo"}')
            result = trigger.parent / "done" / "inspect.json.result.json"
            wait_until(result.exists, what="the trigger's result")
            wait_until((tmp_path / "data" / "daemon" / "heartbeat.json").exists,
                       what="a heartbeat")
            # the state DB and its companions while the daemon runs
            db = tmp_path / "data" / "daemon" / "state.db"
            live = {p.name: stat.S_IMODE(p.stat().st_mode)
                    for p in db.parent.glob("state.db*")}
        finally:
            assert d.stop() == 0
        with umask(mask):
            child = subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=REPO,
                                   capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-3000:]

        # the decisions folder is the upstream's: what reading leaves there is item 2's test
        made = {k: v for k, v in tree(tmp_path).items() if k not in before
                and not k.startswith(("daemon-", "data/training/ai_training_decisions/"))
                and k != "data/triggers/done/inspect.json"}
        names = {Path(k).name for k in made}
        for expected in ("inspect.json.result.json", "heartbeat.json", "state.db",
                         "ranker_v1.pt", "ranker_v1_metadata.json", "ranker.pt",
                         "champions.json", "c" * 64 + ".npy", "processed_images.jsonl",
                         "embedder.json"):
            assert expected in names, expected
        assert any(n.startswith("ai_training_inspection_") for n in names)
        wrong = {k: oct(stat.S_IMODE(m)) for k, (m, *_rest) in made.items()
                 if stat.S_IMODE(m) != (dir_mode if stat.S_ISDIR(m) else file_mode)}
        assert wrong == {}
        assert live and set(live.values()) == {file_mode}, live


def _shared_home() -> Iterator[Path]:
    # pytest's tmp_path is 0700: another user could not even look inside
    home = Path(tempfile.mkdtemp(prefix="trainingd-anyuser-"))
    try:
        home.chmod(0o755)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


shared_home = pytest.fixture(_shared_home)


def status_as(uid: int | None, config: Path) -> subprocess.CompletedProcess[str]:
    """``trainingd status`` as a real process, as ``uid`` (None: as ourselves)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"})
    cmd = [sys.executable, "-m", "daemon", "status", "--config", str(config)]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=config.parent, capture_output=True, text=True, timeout=60,
                          env=env)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running as another user needs root and setpriv")


class TestStatusForAnyUser:
    """``trainingd status`` works for any user who can read the data folder, and writes nothing."""

    @needs_root
    @pytest.mark.slow
    def test_other_user_sees_the_running_then_stopped_daemon(self, shared_home: Path) -> None:
        """As nobody: "running" with the project's figures while the daemon runs; "stopped"
        with the same figures after it stopped (no "attempt to write a readonly database");
        and nothing in the data folder is created or changed by either run."""
        with umask(0o022):
            write_sample_project(decisions(shared_home), "demo", rows=40)
            config = write_config(shared_home / "config.toml")
            d = Daemon(config)
        try:
            d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
            wait_until((shared_home / "data" / "daemon" / "heartbeat.json").exists,
                       what="a heartbeat")
            live = status_as(NOBODY, config)
            assert live.returncode == 0, live.stderr[-3000:]
            assert live.stdout.startswith("daemon: running"), live.stdout
            assert f"demo     {DEMO_ROWS}" in live.stdout, live.stdout
        finally:
            assert d.stop() == 0
        data = shared_home / "data"
        before = tree(data)
        stopped = status_as(NOBODY, config)
        assert stopped.returncode == 3, stopped.stderr[-3000:]  # LSB: not running
        assert stopped.stdout.startswith("daemon: stopped"), stopped.stdout
        assert f"demo     {DEMO_ROWS}" in stopped.stdout, stopped.stdout
        assert tree(data) == before

    @pytest.mark.slow
    def test_owner_status_on_a_stopped_daemon_leaves_no_trace(self, tmp_path: Path) -> None:
        """Even the daemon's own user, who could write, creates and changes nothing."""
        write_sample_project(decisions(tmp_path), "demo", rows=40)
        config = write_config(tmp_path / "config.toml")
        d = Daemon(config)
        try:
            d.wait_event("validation.project_checked", project="demo", rows_checked=DEMO_ROWS)
        finally:
            assert d.stop() == 0
        before = tree(tmp_path / "data")
        out = status_as(None, config)
        assert out.returncode == 3, out.stderr[-3000:]  # LSB: not running
        assert tree(tmp_path / "data") == before


class TestHeartbeatVerdicts:
    """What status says when the heartbeat cannot be read."""

    def test_unreadable_heartbeat_is_not_passed_off_as_not_running(self, tmp_path: Path) -> None:
        """A heartbeat that is not JSON names the problem instead of "not running"."""
        from daemon.service import heartbeat_path, read_heartbeat
        from daemon.settings import load_settings

        settings = load_settings(write_config(tmp_path / "config.toml"))
        path = heartbeat_path(settings)
        path.parent.mkdir(parents=True)
        path.write_text("[" * 50000)
        doc = read_heartbeat(settings)
        assert doc is not None and doc["verdict"].startswith("unknown")
