"""Incremental validation cost vs DB size, and full-validation throughput.

Builds a 1,000,000-row and a 1,000-row decision DB (canonical v3, WAL, reviewer-like rows, each
with the same backlog of 200 crops waiting for their final box), validates both fully, then
appends 1,000 new rows to each, several rounds, and times the incremental validation of those
rows.  Prints the median times, their ratio (target <= 1.5) and the full-validation throughput
(target >= 50,000 rows/s on the 2-core dev machine).  Ratios from one run: the machine is shared.

    python bench/validate_bench.py [--big 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.decisions.schema import INSERT_SQL, create_v3_db
from daemon.demo.sample import synthetic_rows
from daemon.logs import configure_logging
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.validation import ProjectSource, Validator

BACKLOG_ROWS = 1000  # the tail of each DB, in which every 5th row is a pending crop


def build(path: Path, rows: int) -> sqlite3.Connection:
    conn = create_v3_db(path)
    clean = rows - BACKLOG_ROWS
    batch = 50_000
    for start in range(0, clean, batch):
        conn.execute("BEGIN")
        conn.executemany(INSERT_SQL, synthetic_rows(path.stem, start, min(batch, clean - start)))
        conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.executemany(INSERT_SQL, synthetic_rows(path.stem, clean, BACKLOG_ROWS, pending_every=5))
    conn.execute("COMMIT")
    return conn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(validation={"full_reconcile_minutes": 1e9}).with_data_root(Path(tmp))
        settings.decisions_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        dbs = {}
        for name, rows in (("big", args.big), ("small", args.small)):
            dbs[name] = (build(settings.decisions_dir / f"{name}.db", rows), rows)
        built_s = time.perf_counter() - t0
        print(f"built DBs: {args.big:,} and {args.small:,} rows in {built_s:.1f} s")

        store = StateStore(settings.state_db)
        validator = Validator(store, settings)
        t0 = time.perf_counter()
        result = validator.validate_project(ProjectSource("big", settings.project_db("big")))
        full_s = time.perf_counter() - t0
        assert result.rows_checked == args.big, result
        print(f"full validation: {args.big:,} rows in {full_s:.2f} s = "
              f"{args.big / full_s:,.0f} rows/s (target >= 50,000)")
        validator.validate_project(ProjectSource("small", settings.project_db("small")))

        times: dict[str, list[float]] = {"big": [], "small": []}
        for r in range(args.rounds):
            for name, (conn, rows) in dbs.items():
                start = rows + r * args.new
                conn.execute("BEGIN")
                conn.executemany(INSERT_SQL, synthetic_rows(name, start, args.new, seed=r + 1,
                                                            pending_every=50))
                conn.execute("COMMIT")
                t0 = time.perf_counter()
                res = validator.validate_project(ProjectSource(name, settings.project_db(name)))
                times[name].append(time.perf_counter() - t0)
                assert res.mode == "incremental" and res.rows_checked == args.new, res
        big, small = statistics.median(times["big"]), statistics.median(times["small"])
        print(f"incremental validation of {args.new:,} new rows (median of {args.rounds}): "
              f"{args.big:,}-row DB {big * 1000:.1f} ms, {args.small:,}-row DB "
              f"{small * 1000:.1f} ms, ratio {big / small:.2f} (target <= 1.5)")
        for conn, _ in dbs.values():
            conn.close()
        store.close()


if __name__ == "__main__":
    main()
