"""Ranker training time and peak memory on synthetic groups of 512-d embeddings, on CPU.

Each size runs in its own subprocess (so peak RSS is that size's alone).  Prints one line per
size and the ratios between them: the target is 20,000 groups in under 60 s, and memory growing
no faster than the data.

    .venv/bin/python bench/train_bench.py [--sizes 5000 20000 80000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time


def one(groups: int, epochs: int) -> dict[str, float]:
    import numpy as np

    from daemon.settings import TrainingSettings
    from daemon.training.dataset import RankerData
    from daemon.training.fit import fit_ranker

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports
    rng = np.random.default_rng(0)
    sizes = rng.choice([2, 3, 4], size=groups, p=[0.5, 0.25, 0.25])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    vectors = rng.standard_normal((int(offsets[-1]), 512), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = np.where(rng.random(groups) < 0.976, sizes - 1, 0).astype(np.int64)
    data = RankerData(vectors=vectors, offsets=offsets, picks=picks,
                      stages=np.zeros(len(vectors), np.float32),
                      ai_picks=np.full(groups, -1, np.int64), holdout=np.zeros(groups, bool),
                      projects=["bench"] * groups, group_ids=[f"g{i}" for i in range(groups)])
    data_mb = (vectors.nbytes + offsets.nbytes + picks.nbytes) / 2**20
    t0 = time.perf_counter()
    fit_ranker(data, TrainingSettings(epochs=epochs, device="cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"groups": groups, "images": int(offsets[-1]), "seconds": seconds,
            "data_mb": data_mb, "peak_rss_mb": peak / 1024, "rss_before_mb": rss_start / 1024}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    ap.add_argument("--epochs", type=int, default=15)  # the [training] epochs default
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.epochs)))
        return 0
    import torch

    print(f"ranker training, {args.epochs} epochs, CPU threads {torch.get_num_threads()}")
    results = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--epochs",
                              str(args.epochs)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['groups']:>7} groups ({r['images']} images): {r['seconds']:6.1f} s "
              f"train, peak RSS {r['peak_rss_mb']:7.0f} MB (data {r['data_mb']:.0f} MB)"
              + ("  [target < 60 s]" if n == 20000 else ""))
    for a, b in itertools.pairwise(results):
        grow = b["groups"] / a["groups"]
        extra_a = a["peak_rss_mb"] - a["rss_before_mb"]
        extra_b = b["peak_rss_mb"] - b["rss_before_mb"]
        print(f"{a['groups']} -> {b['groups']}: data x{grow:.1f}, time "
              f"x{b['seconds'] / a['seconds']:.2f}, memory above start x{extra_b / extra_a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
