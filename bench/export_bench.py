"""Embedding export at scale: time and peak memory of ``trainingd export embeddings``.

Builds a synthetic vector cache and state DB (512-d unit vectors, one ``.npy`` per content hash
in the cache's real layout, ledger rows inserted in bulk), in two projects: ``small`` holds
``--small`` rows (default 100k), ``big`` the rest up to ``--rows`` (default 1M).  Then, each in
its own subprocess through the real command line, in one run:

  export --project small  (100k rows)   wall time, peak RSS
  export of every project (1M rows)     wall time (target < 60 s), peak RSS
  RSS ratio 1M / 100k                   (target ~1: memory is flat, vectors stream by shard)
  incremental re-export after 1,000 new rows   wall time, rows written (1,000), shards (1)

The cache files were just written, so they are read from the page cache (as on a box that
embeds and exports the same day); a cold read off disk is bounded by the disk.

Usage: python bench/export_bench.py [--rows 1000000] [--small 100000] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 512
EMBEDDER = "ViT-B-32:random-init-seed0:pp1-draft"
BUILD_CHUNK = 20_000


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {cpu}, {len(os.sched_getaffinity(0))} cores usable, "
            f"{mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}")


def build(data_root: Path, rows: int, small: int, start: int = 0) -> None:
    """Rows ``start..rows-1``: vectors as the cache writes them, ledger rows in bulk."""
    import numpy as np

    from daemon.embedding.cache import VectorCache, vector_bytes
    from daemon.images import parse_stage
    from daemon.settings import load_settings
    from daemon.store import StateStore

    settings = load_settings().with_data_root(data_root)
    cache = VectorCache(settings.cache_dir, EMBEDDER)
    cache.prepare()
    store = StateStore(settings.state_db)
    rng = np.random.default_rng(start)
    stamp = "2026-12-01T12:00:00Z"
    try:
        for lo in range(start, rows, BUILD_CHUNK):
            hi = min(rows, lo + BUILD_CHUNK)
            vecs = rng.standard_normal((hi - lo, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            images, embeddings = [], []
            for i, vec in zip(range(lo, hi), vecs, strict=True):
                sha = hashlib.sha256(f"bench image {i}".encode()).hexdigest()
                path = cache.vector_path(sha)
                path.parent.mkdir(exist_ok=True)
                # synthetic cache: the bytes the cache writes, without its per-file fsync
                path.write_bytes(vector_bytes(vec))
                project = "small" if i < small else "big"
                name = f"20261201_{i:06d}_stage2_upscaled.jpg"
                images.append((project, f"/images/{project}/{name}", name, 100_000 + i, i, sha,
                               parse_stage(name), stamp, None, "ok", 2048, 2048, stamp))
                embeddings.append((sha, EMBEDDER, DIM, 2048, 2048, stamp))
            with store.transaction() as conn:
                conn.executemany(
                    "INSERT INTO images (project, path, file_name, size, mtime_ns, sha256, "
                    "stage, seen_at, gone_at, embed_status, width, height, embedded_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", images)
                conn.executemany("INSERT OR IGNORE INTO embeddings (sha256, embedder_id, dim, "
                                 "width, height, created_at) VALUES (?,?,?,?,?,?)", embeddings)
            print(f"  built {hi:,} / {rows:,} rows", end="\r", flush=True)
        store.set_meta("embedding.embedder_id", EMBEDDER)
    finally:
        store.close()
    print()


def export(data_root: Path, out: Path, *args: str
           ) -> tuple[float, float, float, dict[str, object]]:
    """One export through the command line in a child: (wall s, CPU s, peak RSS MiB, JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAININGD_")}
    env["TRAININGD_PATHS__DATA_ROOT"] = str(data_root)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "export", "embeddings", "--log-level", "warning",
         "--out", str(out), "--json", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"export failed with exit {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, json.loads(stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--work", type=Path, help="where the synthetic data goes (default: a temp "
                    "folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export_bench-", dir=args.work))
    print(f"machine: {machine()}")
    print(f"work folder: {work}")
    try:
        data_root = work / "data"
        t0 = time.perf_counter()
        build(data_root, args.rows, args.small)
        print(f"synthetic cache + state DB: {args.rows:,} x {DIM}-d vectors built in "
              f"{time.perf_counter() - t0:.1f} s")
        print(f"load average before the exports: {os.getloadavg()[0]:.1f} "
              f"(wall time on a shared machine counts others' work; CPU time does not)")
        small_s, small_cpu, small_rss, small_doc = export(data_root, work / "export-small",
                                                          "--project", "small")
        n = int(str(small_doc["rows_written"]))
        print(f"export {n:>9,} rows (--project small): {small_s:6.1f} s wall, "
              f"{small_cpu:5.1f} s CPU, {n / small_s:,.0f} rows/s, peak RSS {small_rss:.0f} MiB")
        big_s, big_cpu, big_rss, big_doc = export(data_root, work / "export-all")
        n = int(str(big_doc["rows_written"]))
        print(f"export {n:>9,} rows (every project): {big_s:6.1f} s wall, {big_cpu:5.1f} s CPU, "
              f"{n / big_s:,.0f} rows/s, peak RSS {big_rss:.0f} MiB "
              f"(target < 60 s: {'met' if big_s < 60 else 'MISSED'})")
        print(f"peak RSS ratio {args.rows // 1000}k / {args.small // 1000}k rows: "
              f"{big_rss / small_rss:.2f} (target ~1: flat)")
        build(data_root, args.rows + 1000, args.small, start=args.rows)
        inc_s, inc_cpu, inc_rss, inc_doc = export(data_root, work / "export-all")
        shards = inc_doc["shards_written"]
        assert isinstance(shards, list)
        print(f"incremental re-export: {inc_doc['rows_written']} new rows in {len(shards)} new "
              f"shard(s) beside {inc_doc['rows_before']} exported, {inc_s:.1f} s wall, "
              f"{inc_cpu:.1f} s CPU, peak RSS {inc_rss:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
