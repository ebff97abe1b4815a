"""Similarity index bench (issue 14 item 3, issue 12): build and query of the index (a 4-bit PQ
scan with an exact re-rank, daemon/similar/index.py) at N random 512-d unit vectors, recall@10
against exact search on a sample, the index's own recall@10
on clustered CLIP-like vectors, and the near-duplicate search over clustered vectors
with planted copies.

Targets: build ratio 1M/100k <= 12, query p95 < 10 ms at 1M, recall@10 >= 0.95, clustered
200k near-duplicate search < 60 s with every planted pair found.  Prints one run's figures, the
machine and its load.  Times are printed twice: wall (what a person waits) and CPU (what the
process itself used: on a box shared with other work the wall time is inflated by the load,
the CPU time much less so); the build ratio is given for both.  ``--sizes``/``--clustered``
shrink the run on a busy box (say so when reporting).  ``--compare`` also builds the former
choice, faiss' HNSW graph (M=32, efConstruction 128, ef 2048), at the smallest size.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np

SAMPLE_ROWS = 1000  # rows of the clustered set checked against exact search

def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):
        v = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        out[s:s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _queries(rng: np.random.Generator, x: np.ndarray, queries: int) -> np.ndarray:
    """Stored vectors moved a little (cosine ~0.999): "what else looks like this image"."""
    q = x[rng.choice(len(x), queries, replace=False)] + 0.05 * _unit(rng, queries, x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _measure(search: Callable[[np.ndarray], list[int]], x: np.ndarray, q: np.ndarray
             ) -> dict[str, float]:
    """Single queries one at a time: wall and CPU p95, recall@10 against exact search.  The
    exact answers are computed first: a BLAS product between two queries leaves its threads
    spinning on the cores the next query needs."""
    truth = [set(np.argpartition(-(x @ v), 10)[:10].tolist()) for v in q]
    time.sleep(1.0)
    lat, cpu, hits = [], [], 0
    for i in range(len(q)):
        t0, c0 = time.perf_counter(), time.process_time()
        got = search(q[i:i + 1])
        cpu.append(time.process_time() - c0)
        lat.append(time.perf_counter() - t0)
        hits += len(set(got) & truth[i])
    return {"p50_ms": float(np.percentile(lat, 50)) * 1000,
            "p95_ms": float(np.percentile(lat, 95)) * 1000,
            "cpu_p95_ms": float(np.percentile(cpu, 95)) * 1000, "recall10": hits / (10 * len(q))}


def _index_case(x: np.ndarray, queries: int, seed: int) -> dict[str, float]:
    from daemon.similar.index import AnnIndex

    rng = np.random.default_rng(seed)
    n = len(x)
    t, c = time.perf_counter(), time.process_time()
    idx = AnnIndex(x.shape[1])
    idx.add(np.arange(n), x)
    build, build_cpu = time.perf_counter() - t, time.process_time() - c
    q = _queries(rng, x, queries)
    codes = idx.memory_bytes - n * x.shape[1] * 4
    before = _sweep_ms(codes)
    r = _measure(lambda v: idx.search(v, 10).keys[0].tolist(), x, q)
    sweep = (before + _sweep_ms(codes)) / 2  # the bandwidth around the queries
    return {"n": n, "build_s": build, "build_cpu_s": build_cpu, "sweep_ms": sweep,
            "index_mib": idx.memory_bytes / 2**20, "structure": idx.structure, **r}


def _sweep_ms(nbytes: int) -> float:
    """Median time of one pass over ``nbytes`` of memory (a float32 sum): what a scan of the
    codes costs at this moment's memory bandwidth.  The query time over it is a ratio that
    means something on a shared machine whose bandwidth varies with its neighbours' load."""
    if nbytes <= 0:
        return float("nan")
    block = np.ones(nbytes // 4, dtype=np.float32)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        block.sum()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def _compare_hnsw(x: np.ndarray, queries: int) -> None:
    """The former index, faiss IndexHNSWFlat M=32 / efConstruction 128 / ef 2048."""
    import faiss

    t, c = time.perf_counter(), time.process_time()
    idx = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = 128
    idx.add(x)
    build, build_cpu = time.perf_counter() - t, time.process_time() - c
    params = faiss.SearchParametersHNSW(efSearch=2048)
    r = _measure(lambda v: idx.search(v, 10, params=params)[1][0].tolist(), x,
                 _queries(np.random.default_rng(len(x)), x, queries))
    print(f"compare faiss HNSW M=32 efC 128 ef 2048, n={len(x)}: build {build:.1f} s (CPU "
          f"{build_cpu:.1f} s)  query p95 {r['p95_ms']:.2f} ms (CPU {r['cpu_p95_ms']:.2f} ms)  "
          f"recall@10 {r['recall10']:.3f}")


def _clustered(n: int, dim: int, planted: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
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
    # 40 bursts of 50 near-identical shots (cosine ~0.96-0.99 to each other): many pairs close
    # to the 0.97 threshold, so the sample's recall against exact search means something
    burst = np.repeat(_unit(rng, 40, dim), 50, axis=0)
    burst += 0.006 * rng.standard_normal(burst.shape, dtype=np.float32)
    x = np.concatenate([x, burst / np.linalg.norm(burst, axis=1, keepdims=True)])
    return x.astype(np.float32), want


def _clustered_case(x: np.ndarray, want: set[tuple[int, int]], cells: np.ndarray | None
                    ) -> dict[str, float]:
    from daemon.similar.pairs import PairSearch
    from daemon.training.units import near_duplicate_pairs

    rng = np.random.default_rng(12)
    st = PairSearch()
    t, c = time.perf_counter(), time.process_time()
    pairs = near_duplicate_pairs(x, 0.97, cells=cells, stats=st)
    took, took_cpu = time.perf_counter() - t, time.process_time() - c
    got = {tuple(map(int, p)) for p in pairs}
    # recall against exact search on a sample of rows
    rows = np.concatenate([rng.choice(len(x) - 2000, SAMPLE_ROWS, replace=False),
                           len(x) - 2000 + rng.choice(2000, SAMPLE_ROWS // 10, replace=False)])
    sims = x[rows] @ x.T
    truth = {(min(int(r), int(j)), max(int(r), int(j))) for r, row in zip(rows, sims, strict=True)
             for j in np.flatnonzero(row >= 0.97) if j != r}
    return {"n": len(x), "search_s": took, "search_cpu_s": took_cpu, "pairs": len(pairs),
            "planted_found": len(want & got) / len(want),
            "sample_found": len(truth & got), "sample_truth": len(truth),
            "cells": st.cells, "probes": st.probes, "structure": st.structure}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--clustered", type=int, default=200_000)
    ap.add_argument("--clustered-recall", type=int, default=50_000,
                    help="vectors of the clustered set whose index recall@10 is measured")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    from daemon.similar.index import FLAT_LIMIT, LIBRARY, PER_NEIGHBOUR, RERANK, subspaces

    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}; index "
          f"{LIBRARY}: exact up to {FLAT_LIMIT:,} vectors, above a 4-bit PQ scan "
          f"({subspaces(args.dim)} sub-quantisers) re-ranking max({RERANK}, {PER_NEIGHBOUR} k) "
          f"candidates exactly")
    cases = []
    for s in args.sizes.split(","):
        if not s:
            continue
        x = _unit(np.random.default_rng(int(s)), int(s), args.dim)
        r = _index_case(x, args.queries, int(s))
        cases.append(r)
        print(f"index n={r['n']:>8}: build {r['build_s']:7.1f} s (CPU {r['build_cpu_s']:7.1f} s)"
              f"  query p50 {r['p50_ms']:5.2f} ms, p95 {r['p95_ms']:6.2f} ms (CPU "
              f"{r['cpu_p95_ms']:5.2f} ms)  recall@10 "
              f"{r['recall10']:.3f}  index {r['index_mib']:.0f} MiB ({r['structure']})  load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        if r["sweep_ms"] == r["sweep_ms"]:  # the index scans codes (not exact): bandwidth
            codes_mb = r["n"] * subspaces(args.dim) / 2 / 1e6
            print(f"    one pass over the codes' {codes_mb:.0f} MB takes {r['sweep_ms']:.2f} ms "
                  f"now ({codes_mb / r['sweep_ms']:.1f} GB/s): query p50 = "
                  f"{r['p50_ms'] / r['sweep_ms']:.2f} x that pass, p95 = "
                  f"{r['p95_ms'] / r['sweep_ms']:.2f} x", flush=True)
        if args.compare and len(cases) == 1:
            _compare_hnsw(x, args.queries)
        del x
    if len(cases) >= 2:
        a, b = cases[0], cases[-1]
        print(f"build ratio {b['n']}/{a['n']}: wall {b['build_s'] / a['build_s']:.1f}, CPU "
              f"{b['build_cpu_s'] / a['build_cpu_s']:.1f} (n ratio {b['n'] / a['n']:.0f}; "
              f"target <= 12 at 1M/100k)")
    if args.clustered_recall:
        x, _ = _clustered(args.clustered_recall, args.dim, max(10, args.clustered_recall // 1000))
        r = _index_case(x, args.queries, 13)
        print(f"clustered index n={r['n']}: recall@10 {r['recall10']:.3f}  query p95 "
              f"{r['p95_ms']:.2f} ms (CPU {r['cpu_p95_ms']:.2f} ms)", flush=True)
    if args.clustered:
        from daemon.similar.index import AnnIndex

        x, want = _clustered(args.clustered, args.dim, max(10, args.clustered // 1000))
        t, c = time.perf_counter(), time.process_time()
        idx = AnnIndex(x.shape[1])  # the index over a cache holding these vectors
        idx.add(np.arange(len(x)), x)
        print(f"clustered n={len(x)}: index with its cells built in {time.perf_counter() - t:.1f}"
              f" s (CPU {time.process_time() - c:.1f} s)", flush=True)
        for cells in (idx.cells, None):
            r = _clustered_case(x, want, cells)
            print(f"clustered n={r['n']}: near-duplicate search over {r['structure']} "
                  f"{r['search_s']:.1f} s (CPU {r['search_cpu_s']:.1f} s) [target < 60 s], "
                  f"{r['pairs']} pairs, planted found {r['planted_found']:.3f}, exact search on "
                  f"{SAMPLE_ROWS} random rows + {SAMPLE_ROWS // 10} burst rows found "
                  f"{r['sample_truth']} pairs, {r['sample_found']} of them found; {r['cells']} "
                  f"cells, {r['probes']} probed; load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
