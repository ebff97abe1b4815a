"""``trainingd demo``: a self-contained run on generated data, for a first look.

Builds a small sample project whose DB was written by an "older script" (no CHECKs) with one
row per known fault, a clean second project sharing one group_id with it, and the sibling files
that live processing must ignore; validates everything, shows the incremental path (new rows
and a crop finished in place cost only those rows), and writes the inspection report.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, datetime

from daemon.reports import build_inspection, write_inspection
from daemon.sample import INSERT_SQL, copy_row_into, reviewer_row, row_tuple, write_sample_project
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.validation import Validator, discover_projects


def run_demo(settings: Settings, *, rows: int, marker: str) -> int:
    import random

    root = settings.data_root
    root.mkdir(parents=True, exist_ok=True)
    (root / marker).write_text("made by trainingd demo; safe to delete\n")
    decisions = settings.decisions_dir
    demo_db, planted = write_sample_project(decisions, "demo", rows=rows)
    other_db, _ = write_sample_project(decisions, "studio", rows=max(10, rows // 5), seed=11,
                                       faults=False)
    copy_row_into(other_db, next(iter(planted)), demo_db)
    shutil.copy(other_db, decisions / "studio.db.backup-20251024_101500")
    shutil.copy(other_db, decisions / "studio_temp.db")

    store = StateStore(settings.state_db)
    validator = Validator(store, settings)
    print(f"demo data: {root}")
    print(f"planted faults in demo.db: {len(planted)} ({', '.join(sorted(set(planted.values())))})")
    print("\n1) first validation (every row is new):")
    results = validator.validate_all()
    for r in results:
        print(f"   {r.project}: {r.rows_checked}/{r.rows_total} rows checked, "
              f"{r.errors} error(s), {r.warnings} warning(s)")

    # the reviewer keeps working (its writer connection stays open, WAL mode) ...
    rng = random.Random(99)
    writer = sqlite3.connect(demo_db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    new = [reviewer_row("demo", 10_000 + n, rng, pending=n < 2) for n in range(5)]
    for row in new:
        writer.execute(INSERT_SQL, row_tuple(row))
    print("\n2) the reviewer adds 5 groups (2 of them wait for a crop):")
    for r in validator.validate_all():
        print(f"   {r.project}: {r.mode}, {r.rows_checked} row(s) checked of {r.rows_total}")
    # ... and the crop tool finishes one of the waiting crops, UPDATEing the row in place
    writer.execute(
        "UPDATE ai_decisions SET user_action = 'crop', final_crop_coords = ?, "
        "crop_timestamp = ? WHERE group_id = ?",
        (json.dumps([0.1, 0.1, 0.7, 0.7]), "2025-10-25T09:00:00Z", new[0]["group_id"]))
    print("\n3) the crop tool finishes one crop in place:")
    for r in validator.validate_all():
        print(f"   {r.project}: {r.mode}, {r.rows_checked} row(s) checked of {r.rows_total}")
    writer.close()

    now = datetime.now(UTC)
    sources = discover_projects(settings)
    report = build_inspection(sources, validator.validate_all(), store, now=now,
                              first_rows=settings.validation.report_first_rows)
    store.close()
    json_path, md_path = write_inspection(report, settings.summaries_dir, now)
    t = report["totals"]
    print(f"\n4) inspection: {t['rows']} rows, {t['errors']} error(s), {t['warnings']} "
          f"warning(s), {t['invalid_rows']} invalid row(s)")
    ignored = sorted(p.name for p in decisions.iterdir()
                     if not p.name.endswith(("-wal", "-shm", "-journal"))
                     and (p.suffix != ".db" or p.name.endswith("_temp.db")))
    print(f"   ignored for live processing: {', '.join(ignored)}")
    print("\noutputs:")
    print(f"   inspection report: {json_path}")
    print(f"   markdown twin:     {md_path}")
    print(f"   state DB:          {settings.state_db}")
    print(f"   decision DBs:      {decisions}")
    print(f"\nsee it again: TRAININGD_PATHS__DATA_ROOT={root} trainingd status")
    return 0
