"""Backfill speed and memory: rows/s on the real crop log, and peak RSS flat as the input grows.

Prints (1) rows/s for converting the legacy crop log (the shipped subset by default) with
--execute into a temp folder and (2) the peak RSS of a backfill of a synthetic 1,000,000-line
crop CSV against a 100,000-line one, each run in its own subprocess, with their ratio
(target: ~1.0, streaming).
Not part of the test suite; takes a couple of minutes.  Usage: ``python bench/backfill_bench.py``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from daemon.backfill import BackfillOptions, run_backfill, write_report

ROOT = Path(__file__).resolve().parents[1]
# the shipped subset (tests/fixtures/README.md says how it was derived); pass the full legacy
# log as the first argument where a copy is at hand
CROP_LOG = ROOT / "tests" / "fixtures" / "legacy" / "select_crop_log_subset.csv"
HEADER = ("session_id,set_id,directory,image_count,chosen_index,chosen_path,crop_x1,crop_y1,"
          "crop_x2,crop_y2,timestamp,image_0_path,image_0_stage,width_0,height_0,"
          "image_1_path,image_1_stage,width_1,height_1\n")


def convert(csv_path: Path, work: Path) -> tuple[int, float]:
    """Backfill ``csv_path`` with --execute into ``work``; return (lines, seconds)."""
    opts = BackfillOptions(csv_paths=(csv_path,), out_dir=work / "backfill",
                           execute=True, project="mojo1", project_from="fixed")
    started = time.perf_counter()
    with run_backfill(opts) as outcome:
        write_report(opts, outcome, work / "summaries", datetime.now(UTC))
        lines = outcome.converted + outcome.rejected
    return lines, time.perf_counter() - started


def write_synthetic(path: Path, rows: int) -> None:
    """A crop log of ``rows`` distinct images: pixel boxes, two images per group."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(HEADER)
        for n in range(rows):
            t = base + timedelta(seconds=2 * n)
            s1 = f"mojo1/{t:%Y%m%d_%H%M%S}_stage1_generated.png"
            s3 = f"mojo1/{t + timedelta(seconds=1):%Y%m%d_%H%M%S}_stage3_enhanced.png"
            side = 1000 + n % 2000
            fh.write(f"2025-10-08 14:46:56,s{n},mojo1,2,1,{s3},{n % 50}.0,{n % 70}.0,"
                     f"{n % 50 + side}.0,{n % 70 + side}.0,{t:%Y-%m-%dT%H:%M:%S}.000000Z,"
                     f"{s1},stage1_generated,1024,1024,{s3},stage3_enhanced,3072,3072\n")


def peak_rss_kib() -> int:
    """VmHWM of this process (Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(csv_path: Path, work: Path) -> None:
    lines, seconds = convert(csv_path, work)
    print(f"{lines} {seconds:.3f} {peak_rss_kib()}")


def measure(rows: int, tmp: Path) -> tuple[int, float, int]:
    csv_path = tmp / f"synthetic_{rows}.csv"
    write_synthetic(csv_path, rows)
    work = tmp / f"work_{rows}"
    out = subprocess.run([sys.executable, __file__, "--child", str(csv_path), str(work)],
                         check=True, capture_output=True, text=True).stdout.splitlines()[-1].split()
    csv_path.unlink()
    return int(out[0]), float(out[1]), int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, type=Path, metavar=("CSV", "WORK"))
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    args = parser.parse_args()
    # one log line per file would interleave with the figures
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp_s:
        tmp = Path(tmp_s)
        best = min(convert(CROP_LOG, tmp / f"real{i}")[1] for i in range(3))
        lines = sum(1 for _ in CROP_LOG.open(encoding="utf-8")) - 1
        print(f"real crop log: {lines} lines in {best:.3f} s (best of 3, --execute): "
              f"{lines / best:,.0f} rows/s")
        small = measure(args.small, tmp)
        big = measure(args.big, tmp)
        for n, secs, rss in (small, big):
            print(f"synthetic {n:>9,} lines: {secs:7.1f} s, {n / secs:,.0f} rows/s, "
                  f"peak RSS {rss / 1024:.1f} MiB")
        print(f"peak RSS ratio {big[0]:,} / {small[0]:,} lines: {big[2] / small[2]:.2f} "
              "(target ~1.0: memory flat)")


if __name__ == "__main__":
    main()
