"""Prediction throughput (issue 13, item 2): groups/s from cached vectors, and end to end from
new images against embedding alone.  Prints ratios measured in one run and names the machine.

1. Cached vectors: ``--groups`` groups of 2-4 images with 512-d vectors already in the cache
   and the state DB (as after ``trainingd embed``), a ViT-B-32-shaped residual ranker and crop
   net as champions; one ``predict_project`` pass over the whole project (grouping, content keys,
   .npy loads, scoring, the predictions DB) -> groups/s (target >= 2,000 on this CPU), and a
   second pass (all unchanged: the idempotent rerun).
2. End to end: ``--images`` new JPEG files in groups of 3; embedding alone
   (``EmbeddingStage.run``, fresh cache) vs a prediction pass that embeds them through the same
   stage and predicts (fresh cache, another data root) -> images/s of each and the ratio
   (target >= 0.85).  ViT-B-32 with random weights (no download), on ``--device``.

Each figure is printed in wall seconds and in CPU seconds of this process (all its threads:
torch's, the vector readers'), with the load average beside it: on a shared box the wall time
measures the neighbours too, the CPU time is the honest figure (groups per CPU-second).

Usage: python bench/predict_bench.py [--groups 20000] [--images 192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("stage1_generated", "stage1.5_face_swapped", "stage2_upscaled", "stage3_enhanced")
NOW = datetime(2025, 11, 1, 12, 0, tzinfo=UTC)


class Timer:
    """Wall and CPU seconds (``time.process_time``: every thread of this process) of a block."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def machine(device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() \
        else "no GPU used"
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__}, {gpu}")


def settings_for(root: Path, images: Path, device: str) -> Any:
    from daemon.settings import EmbeddingSettings, ProjectSettings, load_settings

    s = load_settings().with_data_root(root / "data")
    s = s.model_copy(update={
        "embedding": EmbeddingSettings(model="ViT-B-32", pretrained="none", device=device,
                                       batch_size=32),
        "projects": {"bench": ProjectSettings(image_roots=[images])},
        "training": s.training.model_copy(update={"device": device})})
    return s


def plant(models_dir: Path, embedder_id: str, dim: int = 512) -> None:
    import torch

    from daemon.training import registry
    from daemon.training.models import architecture, build

    torch.manual_seed(0)
    for kind, features, design in (("ranker", dim, "residual"), ("crop", dim + 2, "scorer")):
        model = build(kind, features, 0.0, design)
        meta = {"kind": kind, "version": 1, "embedder_id": embedder_id,
                "architecture": architecture(kind, features, 0.0, design),
                "hyperparameters": {"crop_use_stage": False}}
        registry.save_model(models_dir, kind, 1, model.state_dict(), meta)
        registry.promote(models_dir, kind, 1, model.state_dict(), meta, NOW)


def cached(groups: int, device: str) -> None:
    import numpy as np

    from daemon.embedding.cache import VectorCache
    from daemon.embedding.ledger import FileRow, Ledger, VectorRow
    from daemon.predict.run import predict_project
    from daemon.store import StateStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        s = settings_for(Path(tmp), Path(tmp) / "images", device)
        store = StateStore(s.state_db)
        emb_id = "ViT-B-32:bench"
        cache = VectorCache(s.cache_dir, emb_id)
        cache.prepare()
        files, vecs, items = [], [], []
        for g in range(groups):
            size = (2, 3, 3, 4)[g % 4]
            stages = (0, 1, 2, 3)[-size:] if size == 4 else (0, 2, 3)[:size]
            stamp = f"2025{1 + g // 100000:02d}{1 + g // 4000 % 28:02d}_{g // 100 % 24:02d}" \
                    f"{g % 100 // 2:02d}{(g % 2) * 20:02d}"
            for i, st in enumerate(stages):
                name = f"{stamp}_{STAGES[st]}.png"
                sha = f"{g:010d}{i:02d}".rjust(64, "0")
                v = rng.standard_normal(512).astype(np.float32)
                items.append((sha, v / np.linalg.norm(v)))
                files.append(FileRow("bench", f"/bench/f{g // 500}/{name}", name, 1, 1, sha, "ok",
                                     width=1024, height=1024))
                vecs.append(VectorRow(sha, emb_id, 512, 1024, 1024))
        # set-up only: the files as the cache lays them out, without the per-file fsync of
        # VectorCache.write_vectors (60,000 fsyncs would dominate the bench's wall time)
        for sha, v in items:
            path = cache.vector_path(sha)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, v)
        Ledger(store).record(files, vecs, NOW, emb_id)
        plant(s.models_dir, emb_id)
        print(f"cached vectors: set up, {load()}")
        with Timer() as t1:
            first = predict_project(s, store, "bench", NOW)
        print(f"cached vectors: {first.predicted} groups ({len(files)} images) predicted in "
              f"{t1.wall:.2f} s wall = {first.groups / t1.wall:,.0f} groups/s (target >= 2,000:"
              f" ratio {first.groups / t1.wall / 2000:.2f}); {t1.cpu:.2f} CPU s = "
              f"{first.groups / t1.cpu:,.0f} groups per CPU-second; {load()}")
        with Timer() as t2:
            again = predict_project(s, store, "bench", NOW)
        print(f"cached vectors, rerun, all unchanged ({again.unchanged}): {t2.wall:.2f} s wall ="
              f" {first.groups / t2.wall:,.0f} groups/s; {t2.cpu:.2f} CPU s = "
              f"{first.groups / t2.cpu:,.0f} groups per CPU-second; {load()}")
        store.close()


def make_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((768, 768), Image.BILINEAR))
    for i in range(count):
        g, k = divmod(i, 3)
        arr = np.clip(big.astype(np.int16) + rng.integers(-12, 12, big.shape), 0, 255)
        name = f"20250705_{g // 60 % 24:02d}{g % 60:02d}{k:02d}_{STAGES[(0, 2, 3)[k]]}.jpg"
        Image.fromarray(arr.astype(np.uint8)).save(folder / name, quality=90)


def end_to_end(count: int, device: str) -> None:
    from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
    from daemon.images import ImageIndex
    from daemon.predict.run import predict_project
    from daemon.store import StateStore

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, count)
        rates, cpu_rates = {}, {}
        for label in ("warm-up", "embedding only", "predict end to end"):
            s = settings_for(Path(tmp) / label.replace(" ", "_"), images, device)
            store = StateStore(s.state_db)
            stage = EmbeddingStage(s, store)
            _ = stage.embedder
            if label == "predict end to end":
                plant(s.models_dir, stage.embedder.embedder_id)
                ImageIndex(store).scan("bench", [images], NOW)
                with Timer() as t:
                    res = predict_project(s, store, "bench", NOW, stage=lambda st=stage: st)
                assert res.embedded == count, res
                print(f"  predicted {res.predicted} groups, embedded {res.embedded}")
            else:
                with Timer() as t:
                    ran = stage.run(candidates_from_roots(s, "bench"))
                assert ran.embedded == count, ran
            rates[label], cpu_rates[label] = count / t.wall, count / t.cpu
            store.close()
            if label != "warm-up":
                print(f"{label}: {count} images in {t.wall:.2f} s wall = {rates[label]:.1f} "
                      f"images/s; {t.cpu:.2f} CPU s = {cpu_rates[label]:.1f} images per "
                      f"CPU-second; {load()}")
    ratio = rates["predict end to end"] / rates["embedding only"]
    cpu_ratio = cpu_rates["predict end to end"] / cpu_rates["embedding only"]
    print(f"end to end / embedding only = {ratio:.2f} by wall time, {cpu_ratio:.2f} by CPU "
          "time (target >= 0.85)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=20000)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    from daemon.logs import configure_logging

    configure_logging("warning", "console")
    print(f"machine: {machine(args.device)}")
    cached(args.groups, args.device)
    end_to_end(args.images, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
