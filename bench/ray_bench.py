"""Ray local vs the local path on the same 500 JPEGs: the overhead of the engine (issue 14).

The files are embed_bench's: 2048x2048 JPEGs (q90) of real sample photos (scikit-image) or
photo-like synthetic pictures, each made unique by a few bytes after its end marker.  The model
is ViT-B-32 with random weights (no download) on the CPU, or ``--device cuda``.

Prints, in one run, on this machine:
  the local path (EmbeddingStage.run, model already loaded: files -> vectors in a fresh cache),
  the Ray path on a local cluster of this box already started (embed_with_ray: decode tasks,
  one model actor, the driver writing the same cache and ledger), after its first batch
  arrived (the local figure excludes its model load too) and as a whole,
  their ratios Ray/local (target >= 0.8 for the first), and the cluster's start time, paid
  once per run (a backfill of millions of images pays these once; printed, not hidden).

Usage: python bench/ray_bench.py [--files 500] [--batch 32] [--device cpu|cuda] [--cpus N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from embed_bench import bench_settings, end_to_end, write_files  # noqa: E402


def ray_run(paths: list[Path], batch: int, device: str) -> tuple[float, float, int]:
    """Files -> vectors with the Ray backend, in a fresh cache; (img/s of the whole run, img/s
    after the first batch arrived (actor start and model load excluded, as the local
    figure excludes its model load), vectors written)."""
    from daemon.embedding.cli import embed_with_ray
    from daemon.records import ImageCandidate
    from daemon.store import StateStore

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        settings = bench_settings(Path(tmp), batch, device)
        store = StateStore(settings.state_db)  # type: ignore[attr-defined]
        from daemon.embedding.ray_backend import driver_embedder

        driver = driver_embedder(settings)  # type: ignore[arg-type]  # the driver's CPU copy
        first: list[tuple[float, int]] = []

        def seen(done: int, total: int) -> None:
            if done and not first:
                first.append((time.perf_counter(), done))

        start = time.perf_counter()
        result = embed_with_ray(settings, store,  # type: ignore[arg-type]
                                [ImageCandidate("bench", p.name, p) for p in paths],
                                embedder=driver, progress=seen)
        end = time.perf_counter()
        store.close()
    t1, n1 = first[0]
    return len(paths) / (end - start), (len(paths) - n1) / (end - t1), result.embedded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cpus", type=int, default=0, help="local cluster CPUs (0: all usable)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    cpus = args.cpus or len(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    print(f"machine: {len(os.sched_getaffinity(0))} usable cores, "
          f"{torch.cuda.get_device_name(0) if gpus else 'no GPU used'}; torch {torch.__version__}"
          f", ray {ray.__version__}; ViT-B-32 random init on {args.device}, batch {args.batch}")
    with tempfile.TemporaryDirectory(prefix="ray-bench-files-") as tmp:
        paths = write_files(Path(tmp), "jpeg", args.files)
        local_rate, _ = end_to_end(paths, args.batch, device=args.device)
        print(f"local path: {local_rate:.2f} img/s ({len(paths)} JPEGs -> vectors in cache)")
        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        start_s = time.perf_counter() - t0
        try:
            ray_rate, steady, written = ray_run(paths, args.batch, args.device)
        finally:
            ray.shutdown()
    assert written == len(paths), written
    print(f"ray local cluster ({cpus} CPUs, {gpus} GPUs): {steady:.2f} img/s after the first "
          f"batch; {ray_rate:.2f} img/s with the actor's start and model load")
    print(f"ratio ray/local: {steady / local_rate:.2f} (target >= 0.8); with the actor's "
          f"start and model load: {ray_rate / local_rate:.2f}")
    whole = len(paths) / (len(paths) / ray_rate + start_s)
    print(f"cluster start: {start_s:.1f} s once per run; with it: {whole:.2f} img/s "
          f"({whole / local_rate:.2f} of local at {len(paths)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
