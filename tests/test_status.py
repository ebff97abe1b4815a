"""Issue 10, item 7: ``trainingd status`` for the GPU box, and a SIGHUP that reloads only what
changed.  A real daemon with the tiny open_clip model (tests/health_helpers.py), real images, a
champion written through the real registry, real SIGHUPs; the model loads are counted from the
daemon's own ``embedding.model_loaded`` log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.embedding.lifecycle import ModelState
from daemon.images import ImageIndex
from daemon.settings import load_settings
from daemon.status import _backlog, _model_lines, describe_event, last_event
from daemon.store import StateStore
from daemon.training import registry
from tests.daemon_harness import Record, wait_until, write_config
from tests.embedding_helpers import make_images
from tests.health_helpers import Launched, tiny_embedding_toml

REPO = Path(__file__).resolve().parents[1]
#: the --json keys: existing ones keep their meaning, new ones are added (never renamed)
STATUS_KEYS = {"daemon", "state_db", "decisions_dir", "projects", "embedder_id",
               "embedding_coverage", "audit_tokens", "problems", "health", "exit_code", "model",
               "backlog", "champions", "reviewer", "disk", "last_event"}
MODEL_KEYS = {"state", "since", "load_seconds", "error", "embedder_id", "loads", "device",
              "precision", "device_name", "memory_total_bytes", "memory_used_bytes",
              "memory_process_bytes"}


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    return subprocess.run([sys.executable, "-m", "daemon", "status", *extra, "--config",
                           str(config)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=config.parent)


def plant_champion(models_dir: Path) -> None:
    """A promoted ranker v1 with its reviewer export, through the real registry."""
    import torch

    meta = {"kind": "ranker", "version": 1, "created_at": "2025-10-24T10:00:00Z",
            "holdout_size": 42, "metrics": {"model": {"top1": 0.8125}}}
    state = {"w": torch.zeros(2, 2)}
    registry.save_model(models_dir, "ranker", 1, state, meta)
    rmeta = {**registry.reviewer_metadata(meta), "embedder_id": "ViT-B-32/openai",
             "embedder_random": False}
    registry.promote(models_dir, "ranker", 1, state, meta, datetime(2025, 10, 24, tzinfo=UTC),
                     reviewer=(state, rmeta))


def wait_new(d: Launched, start: int, event: str, timeout: float = 60, **facts: Any) -> Record:
    """The first record after the first ``start`` records with this event and these facts."""
    found: list[Record] = []

    def seen() -> bool:
        found.extend(r for r in d.records()[start:] if r.get("event") == event
                     and all(r.get(k) == v for k, v in facts.items()))
        return bool(found)

    wait_until(seen, timeout, f"{event} {facts} after record {start}")
    return found[0]


def loads(d: Launched) -> list[Record]:
    return [r for r in d.records() if r.get("event") == "embedding.model_loaded"]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[Launched, Path]]:
    (tmp_path / "data" / "training" / "ai_training_decisions").mkdir(parents=True)
    photos = tmp_path / "photos"
    make_images(photos, 6)
    config = write_config(tmp_path / "config.toml", tiny_embedding_toml(),
                          image_roots={"p": [photos]})
    plant_champion(load_settings(config).models_dir)
    d = Launched(config, "run")
    yield d, photos
    if d.proc.poll() is None:
        d.kill()


class TestStatusOnTheGpuBox:
    """Device, loading state, backlog, champions, reviewer files, disk and the last event."""

    @pytest.mark.slow
    def test_live_daemon_shows_device_model_backlog_and_champions(
            self, box: tuple[Launched, Path]) -> None:
        """After the daemon embedded the images: the device and precision it loaded the model
        with, "loaded in S s", backlog 0 with a rate, champion v1 with figure and n, the reviewer's
        files, cache bytes, and a last event in words."""
        d, _ = box
        d.wait_event("embedding.stage_ready", timeout=180)
        d.wait_for(lambda r: r.get("event") == "worker.task_done" and r.get("kind") == "embed"
                   and r.get("ok"), 120, "an embed task")

        def doc() -> dict[str, Any]:
            return dict(json.loads(status(d.config, "--json").stdout))

        wait_until(lambda: (doc()["daemon"] or {}).get("embedding_rate", {}).get(
            "images_per_second"), 60, "the recent rate in the heartbeat")
        proc = status(d.config, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert set(out) == STATUS_KEYS
        assert set(out["model"]) == MODEL_KEYS
        model = out["model"]
        assert model["state"] == "loaded" and model["loads"] == 1
        assert model["device"] == "cpu" and model["precision"] == "fp32"
        assert model["device_name"] and model["memory_total_bytes"] > 0
        assert model["load_seconds"] >= 0 and "random-init" in model["embedder_id"]
        assert out["backlog"]["images_waiting"] == 0 and out["backlog"]["eta_seconds"] == 0.0
        assert out["backlog"]["images_per_second"] > 0
        ranker = out["champions"]["ranker"]
        assert (ranker["version"], ranker["figure"], ranker["n"]) == (1, 0.8125, 42)
        assert ranker["trained_at"] == "2025-10-24T10:00:00Z" and out["champions"]["crop"] is None
        files = {f["name"]: f for f in out["reviewer"]["files"]}
        assert set(files) == {"ranker.pt", "ranker_metadata.json"}
        assert files["ranker.pt"]["version"] == 1 and files["ranker.pt"]["bytes"] > 0
        assert out["disk"]["cache"]["bytes"] > 0 and out["disk"]["models"]["files"] >= 4
        assert out["last_event"]["text"] and ":" not in out["last_event"]["text"].split(" ")[0]
        text = status(d.config).stdout
        for expected in ("model: loaded in", "device: cpu (", "precision fp32",
                         "embedding backlog: 0 image(s) waiting",
                         "ranker: v1 top1 0.8125 on n = 42",
                         "reviewer has (", "ranker.pt (v1", "disk: cache ", "last event: "):
            assert expected in text, text
        assert "triggers:-" not in text and "last event: none" not in text
        assert d.stop() == 0

    @pytest.mark.slow
    def test_backlog_counts_indexed_images_without_a_vector(
            self, box: tuple[Launched, Path]) -> None:
        """Images the index knows but the model has not embedded are the backlog; with the
        daemon stopped there is no rate, so no ETA."""
        d, photos = box
        d.wait_for(lambda r: r.get("event") == "worker.task_done" and r.get("kind") == "embed"
                   and r.get("ok"), 180, "an embed task")
        assert d.stop() == 0
        settings = load_settings(d.config)
        store = StateStore(settings.state_db)
        index = ImageIndex(store)
        with store.transaction():
            for path in make_images(photos / "later", 3, start_seed=100):
                index.observe("p", path, datetime.now(UTC))
        store.close()
        proc = status(d.config, "--json")
        out = json.loads(proc.stdout)
        assert proc.returncode == 3
        assert out["backlog"]["images_waiting"] == 3 and out["backlog"]["by_project"] == {"p": 3}
        assert out["backlog"]["eta_seconds"] is None
        assert "3 image(s) waiting; no recent rate" in status(d.config).stdout


class TestReloadOnlyWhatChanged:
    """SIGHUP compares old and new settings section by section."""

    @pytest.mark.slow
    def test_unchanged_then_batch_size_then_seed(self, box: tuple[Launched, Path]) -> None:
        """Unchanged config: changed=[], the watcher and jobs stay, the model stays (a new image
        is embedded with it).  batch_size only: the model stays.  random_seed: loaded again."""
        d, photos = box
        d.wait_for(lambda r: r.get("event") == "worker.task_done" and r.get("kind") == "embed"
                   and r.get("ok"), 180, "an embed task")
        assert len(loads(d)) == 1
        watchers = sum(r.get("event") == "watcher.started" for r in d.records())
        jobs = sum(r.get("event") == "jobs.registered" for r in d.records())

        start = len(d.records())
        d.signal(signal.SIGHUP)
        reloaded = wait_new(d, start, "service.reloaded")
        assert reloaded["changed"] == [] and not reloaded["watcher_restarted"]
        assert not reloaded["jobs_registered"]
        start = len(d.records())
        make_images(photos / "more", 1, start_seed=500)
        wait_new(d, start, "embedding.batch_embedded", images=1)
        wait_new(d, start, "worker.task_done", kind="embed", ok=True)
        assert len(loads(d)) == 1, "an unchanged reload loaded the model again"
        assert sum(r.get("event") == "watcher.started" for r in d.records()) == watchers
        assert sum(r.get("event") == "jobs.registered" for r in d.records()) == jobs

        start = len(d.records())
        d.config.write_text(d.config.read_text().replace("batch_size = 4", "batch_size = 8"))
        d.signal(signal.SIGHUP)
        wait_new(d, start, "service.reloaded", changed=["embedding"])
        wait_new(d, start, "embedding.model_kept")
        wait_new(d, start, "worker.task_done", kind="reconcile")
        assert len(loads(d)) == 1

        start = len(d.records())
        d.config.write_text(d.config.read_text().replace('device = "cpu"',
                                                         'device = "cpu"\nrandom_seed = 3'))
        d.signal(signal.SIGHUP)
        wait_new(d, start, "service.reloaded", changed=["embedding"])
        wait_until(lambda: len(loads(d)) == 2, 120, "the model loaded again")
        assert "seed3" in loads(d)[-1]["embedder_id"]
        assert d.stop() == 0


class TestStatusWords:
    """The pure parts: last event in words, model state lines, the ETA."""

    def test_last_event_in_words(self) -> None:
        """'validate:mojo3' 4 s ago reads as a decision DB change, 'triggers:-' as a trigger."""
        now = datetime(2025, 1, 1, 12, 0, 4, tzinfo=UTC)
        beat = {"last_event": "validate:mojo3", "last_event_at": "2025-01-01T12:00:00+00:00"}
        assert last_event(beat, now)["text"] == "decision DB mojo3 changed 4 s ago"  # type: ignore[index]
        assert describe_event("triggers", None) == "a trigger file arrived"
        assert describe_event("odd", "p") == "odd task for p"
        assert last_event(None, now) is None

    def test_model_states_read_well(self) -> None:
        """not loaded / loading since T / loaded in S s / failed: why."""
        def lines(state: ModelState) -> str:
            return "\n".join(_model_lines({"model": state.to_dict()}))

        assert "not loaded" in lines(ModelState())
        assert "loading since 2025-01-01T12:00:00Z" in lines(
            ModelState("loading", since="2025-01-01T12:00:00Z"))
        assert "loaded in 8.1 s" in lines(ModelState("loaded", since="x", load_seconds=8.1))
        assert "failed at x: weights missing" in lines(
            ModelState("failed", since="x", error="weights missing"))

    def test_eta_from_the_recent_rate(self) -> None:
        """100 images at 10 img/s: 10 s; no rate, or the daemon not running: unknown."""
        beat = {"embedding_rate": {"images_per_second": 10.0}}
        assert _backlog({"p": 100}, beat, "running")["eta_seconds"] == 10.0
        assert _backlog({"p": 100}, beat, "stopped")["eta_seconds"] is None
        assert _backlog({}, None, "running")["eta_seconds"] == 0.0
