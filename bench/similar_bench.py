"""Similarity index bench (issue 14 item 3, issue 12): build and query of the usearch HNSW
index at N random 512-d unit vectors, recall@10 against exact search on a sample, and the
near-duplicate search over clustered CLIP-like vectors with planted copies.

Targets: build ratio 1M/100k <= 12, query p95 < 10 ms at 1M, recall@10 >= 0.95, clustered
200k near-duplicate search < 60 s with every planted pair found.  Prints one run's figures and
the machine; ``--sizes``/``--clustered`` shrink the run on a busy box (say so when reporting).
``--compare`` also builds faiss-cpu HNSW and hnswlib at the smallest size (the choice's basis).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):
        v = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        out[s:s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _index_case(n: int, dim: int, queries: int) -> dict[str, float]:
    from daemon.similar.index import AnnIndex

    rng = np.random.default_rng(n)
    x = _unit(rng, n, dim)
    t = time.perf_counter()
    idx = AnnIndex(dim)
    idx.add(np.arange(n), x)
    build = time.perf_counter() - t
    q = x[rng.choice(n, queries, replace=False)] + 0.05 * _unit(rng, queries, dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    lat, hits = [], 0
    for i in range(queries):
        t0 = time.perf_counter()
        nb = idx.search(q[i:i + 1], 10)
        lat.append(time.perf_counter() - t0)
        truth = np.argpartition(-(x @ q[i]), 10)[:10]
        hits += len(set(nb.keys[0].tolist()) & set(truth.tolist()))
    return {"n": n, "build_s": build, "p95_ms": float(np.percentile(lat, 95)) * 1000,
            "recall10": hits / (10 * queries), "index_mib": idx.memory_bytes / 2**20}


def _clustered_case(n: int, dim: int, planted: int) -> dict[str, float]:
    from daemon.similar.pairs import PairSearch
    from daemon.training.units import near_duplicate_pairs

    rng = np.random.default_rng(11)
    centres = 2000
    per = (n - planted) // centres
    c = _unit(rng, centres, dim)
    x = np.repeat(c, per, axis=0)
    x += 0.02 * rng.standard_normal(x.shape, dtype=np.float32)  # members ~0.9 to each other
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(len(x), planted, replace=False)
    dup = x[src] + 0.004 * rng.standard_normal((planted, dim), dtype=np.float32)
    x = np.concatenate([x, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
    want = {(int(s), len(x) - planted + i) for i, s in enumerate(src)}
    st = PairSearch()
    t = time.perf_counter()
    pairs = near_duplicate_pairs(x, 0.97, stats=st)
    took = time.perf_counter() - t
    got = {tuple(map(int, p)) for p in pairs}
    # recall against exact search on a sample of rows
    rows = rng.choice(len(x), 300, replace=False)
    sims = x[rows] @ x.T
    truth = {(min(int(r), int(j)), max(int(r), int(j))) for r, row in zip(rows, sims, strict=True)
             for j in np.flatnonzero(row >= 0.97) if j != r}
    return {"n": len(x), "search_s": took, "pairs": len(pairs),
            "planted_found": len(want & got) / len(want),
            "sample_recall": len(truth & got) / max(1, len(truth)), "widened": st.widened,
            "completed": st.completed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--clustered", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}")
    cases = [_index_case(int(s), args.dim, args.queries) for s in args.sizes.split(",")]
    for r in cases:
        print(f"index n={r['n']:>8}: build {r['build_s']:7.1f} s  query p95 "
              f"{r['p95_ms']:6.2f} ms  recall@10 {r['recall10']:.3f}  index "
              f"{r['index_mib']:.0f} MiB")
    if len(cases) >= 2:
        a, b = cases[0], cases[-1]
        print(f"build ratio {b['n']}/{a['n']}: {b['build_s'] / a['build_s']:.1f} "
              f"(n ratio {b['n'] / a['n']:.0f}; target <= 12 at 1M/100k)")
    if args.clustered:
        r = _clustered_case(args.clustered, args.dim, max(10, args.clustered // 1000))
        print(f"clustered n={r['n']}: near-duplicate search {r['search_s']:.1f} s "
              f"[target < 60 s], {r['pairs']} pairs, planted found {r['planted_found']:.3f}, "
              f"recall vs exact on 300 rows {r['sample_recall']:.3f}, widened {r['widened']}, "
              f"completed exactly {r['completed']}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
