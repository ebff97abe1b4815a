"""Ranker training time and peak memory, and the near-duplicate search time, on CPU.

Training runs the real path (``daemon.training.core._ranker``): the three sides, both ranker
designs with epochs picked on the validation side, the baselines and the paired promotion test
(``registry.decide_promotion``).  Each size runs in its own subprocess (so peak RSS is that
size's alone); CPU seconds are printed beside the wall time (on a shared box the wall time
says more about the neighbours).  Targets (issue 12): 20,000 groups in under 60 s (0.6 of it:
36 s, for headroom), memory growing no faster than the data, and the near-duplicate search
over 200,000 512-d vectors at cosine 0.97 in under 60 s (random unit vectors plus 1,000 planted
pairs at cosine 0.97-0.999; recall is printed).

    .venv/bin/python bench/train_bench.py [--sizes 5000 20000 80000] [--epochs 15] [--vectors N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time


def one(groups: int, epochs: int) -> dict[str, float]:
    import tempfile
    from pathlib import Path

    import numpy as np

    from daemon.settings import load_settings
    from daemon.training import core
    from daemon.training.dataset import RankerData

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports
    rng = np.random.default_rng(0)
    sizes = rng.choice([2, 3, 4], size=groups, p=[0.5, 0.25, 0.25])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    vectors = rng.standard_normal((int(offsets[-1]), 512), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = np.where(rng.random(groups) < 0.976, sizes - 1, 0).astype(np.int64)
    data = RankerData(vectors=vectors, offsets=offsets, picks=picks,
                      stages=np.concatenate([np.arange(k, dtype=np.float32) for k in sizes]),
                      ai_picks=np.full(groups, -1, np.int64), holdout=np.zeros(groups, bool),
                      projects=["bench"] * groups, group_ids=[f"g{i}" for i in range(groups)])
    data_mb = (vectors.nbytes + offsets.nbytes + picks.nbytes) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        base = load_settings().with_data_root(Path(tmp) / "data")
        settings = base.model_copy(update={"training": base.training.model_copy(
            update={"epochs": epochs, "device": "cpu"})})
        settings._base_dir = base.base_dir
        t0, c0 = time.perf_counter(), time.process_time()
        res = core._ranker(settings, data, lambda: False, None, "bench")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    decision = res["decision"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"groups": groups, "images": int(offsets[-1]), "seconds": seconds, "cpu": cpu,
            "epochs_run": {d: c["epochs_run"] for d, c in res["candidates"].items()},
            "data_mb": data_mb, "peak_rss_mb": peak / 1024, "rss_before_mb": rss_start / 1024,
            "validation": res["validation_size"], "test": res["holdout_size"],
            "promoted": bool(decision.promoted), "test_n": decision.n_test,
            "comparisons": len(decision.comparisons)}


def near_dup(n: int) -> dict[str, float]:
    import numpy as np

    from daemon.training.units import lsh_miss_bound, near_duplicate_pairs

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 512), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = min(1000, n // 2)
    src, dst = np.split(rng.choice(n, 2 * k, replace=False), 2)
    cos = rng.uniform(0.97, 0.999, k).astype(np.float32)
    noise = rng.standard_normal((k, 512), dtype=np.float32)
    noise -= (noise * x[src]).sum(1, keepdims=True) * x[src]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos**2)[:, None] * noise
    t0 = time.perf_counter()
    pairs = near_duplicate_pairs(x, 0.97)
    seconds = time.perf_counter() - t0
    found = {(int(a), int(b)) for a, b in pairs}
    planted = {(min(int(a), int(b)), max(int(a), int(b))) for a, b in zip(src, dst, strict=True)}
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    false = int(sum(float(xn[a] @ xn[b]) < 0.97 for a, b in found))
    return {"vectors": n, "seconds": seconds, "found": len(found), "planted": k,
            "recall": len(found & planted) / k, "false": false,
            "miss_bound": lsh_miss_bound(0.97)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    ap.add_argument("--epochs", type=int, default=15)  # the [training] epochs default
    ap.add_argument("--vectors", type=int, default=200_000)  # near-duplicate search size
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--near", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.epochs)))
        return 0
    if args.near:
        print(json.dumps(near_dup(args.near)))
        return 0
    import torch

    print(f"ranker training (train/validation/test sides, residual + scorer designs, paired "
          f"promotion test), {args.epochs} epochs, CPU threads {torch.get_num_threads()}; "
          f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    results = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--epochs",
                              str(args.epochs)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['groups']:>7} groups ({r['images']} images): {r['seconds']:6.1f} s "
              f"train+validate+test (CPU {r['cpu']:.1f} s; epochs run "
              f"{', '.join(f'{d} {e}' for d, e in r['epochs_run'].items())}), "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"(data {r['data_mb']:.0f} MB), sides val {r['validation']} / test {r['test']}, "
              f"promoted {r['promoted']} (n={r['test_n']}, {r['comparisons']} paired tests)"
              + (f"  [target < 60 s: {'met' if r['seconds'] < 60 else 'MISSED'}]"
                 if n == 20000 else ""))
    for a, b in itertools.pairwise(results):
        grow = b["groups"] / a["groups"]
        extra_a = a["peak_rss_mb"] - a["rss_before_mb"]
        extra_b = b["peak_rss_mb"] - b["rss_before_mb"]
        print(f"{a['groups']} -> {b['groups']}: data x{grow:.1f}, time "
              f"x{b['seconds'] / a['seconds']:.2f}, memory above start x{extra_b / extra_a:.2f}")
    if args.vectors:
        out = subprocess.run([sys.executable, __file__, "--near", str(args.vectors)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"near-duplicate search, {r['vectors']} x 512-d at cosine >= 0.97: "
              f"{r['seconds']:6.1f} s, {r['found']} pairs, planted recall "
              f"{r['recall']:.4f} of {r['planted']}, {r['false']} false, miss bound "
              f"{r['miss_bound']:.1e}  [target < 60 s: "
              f"{'met' if r['seconds'] < 60 else 'MISSED'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
