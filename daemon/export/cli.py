"""``trainingd export embeddings``: the command-line face of :mod:`daemon.export.run`.

Parses arguments, opens the state DB read-only (invisible: no file of ours beside it, no lock a
running daemon waits on), picks the embedder (the one that wrote last, unless ``--embedder``),
runs the export and prints what it wrote.  Exit codes (Documents/OPERATIONS.md):

    0   done, including "nothing new" and rows skipped for a missing or damaged cache file
        (they are listed, with a code and what to do; ``trainingd embed --verify`` repairs)
    1   nothing to export from: no embeddings yet, or the state DB cannot be read
    75  another export is writing into the same folder now
    78  the folder cannot take this export (another embedder, format or project scope, not an
        export, changed by hand), an unknown --project, or pyarrow is not installed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.argtypes import positive_int
from daemon.errors import EXIT_TEMPFAIL, ConfigError, EmbeddingError
from daemon.settings import Settings


def add_export_parser(subparsers: Any, common: argparse.ArgumentParser
                      ) -> argparse.ArgumentParser:
    """Add ``export embeddings`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export", parents=[common], help="export cached embeddings for other tools",
        description="Write the cache's vectors in the layout clip-retrieval and "
                    "embedding-reader read; a second run adds only new vectors as new shards. "
                    "See Documents/EMBEDDINGS.md, Exports.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    e = what.add_parser("embeddings", parents=[common],
                        help="img_emb/img_emb_N.npy + metadata/metadata_N.parquet and a manifest")
    e.add_argument("--out", type=Path, required=True, help="the export folder (created)")
    e.add_argument("--project", action="append", default=[],
                   help="only this project (repeatable; held to the folder's manifest)")
    e.add_argument("--format", choices=("npy", "parquet"), default="npy",
                   help="npy: vectors in .npy shards beside metadata parquet (default); "
                        "parquet: vectors in an 'embedding' column of the parquet shards")
    e.add_argument("--embedder", help="export this embedder_id's vectors (default: the one "
                   "that wrote last)")
    e.add_argument("--shard-rows", type=positive_int, default=100_000, metavar="N",
                   help="rows per shard (default 100000)")
    e.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``trainingd export embeddings``; returns the exit code."""
    from daemon.embedding.ledger import META_EMBEDDER
    from daemon.export.run import ExportBusy, export_embeddings
    from daemon.store import StateStore
    from daemon.store.export_rows import known_projects

    if not settings.state_db.is_file():
        raise EmbeddingError(f"no state DB at {settings.state_db}: run `trainingd embed` (or "
                             "the daemon) first")
    store = StateStore(settings.state_db, read_only=True)
    try:
        embedder_id = args.embedder or store.get_meta(META_EMBEDDER)
        if not embedder_id:
            raise EmbeddingError("no embeddings yet: run `trainingd embed` (or the daemon) "
                                 "first")
        if args.project:
            known = known_projects(store) | set(settings.projects)
            unknown = sorted(set(args.project) - known)
            if unknown:
                raise ConfigError(f"--project: unknown project(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(sorted(known)) or 'none'})")
        try:
            result = export_embeddings(store, settings.cache_dir, args.out.resolve(),
                                       embedder_id=embedder_id, projects=args.project or None,
                                       fmt=args.format, shard_rows=args.shard_rows)
        except ExportBusy as exc:
            print(f"trainingd: {exc}", file=sys.stderr)
            return EXIT_TEMPFAIL
    finally:
        store.close()
    doc = {
        "out": str(result.out), "embedder_id": result.embedder_id, "format": result.format,
        "rows_before": result.rows_before, "rows_written": result.rows_written,
        "shards_written": [s.embeddings for s in result.shards],
        "leftovers_removed": result.orphans_removed,
        "skipped_total": result.skipped_total,
        "skipped": [s.to_dict() for s in result.skipped],
    }
    if args.json:
        json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    print(f"{result.out}: {result.rows_written} new row(s) in {len(result.shards)} shard(s), "
          f"{result.rows_before + result.rows_written} in all ({result.format}, "
          f"{result.embedder_id})")
    for s in result.skipped:
        print(f"  skipped {s.code}: {s.project} {s.path} ({s.value}): {s.message}")
    if result.skipped_total > len(result.skipped):
        print(f"  ... {result.skipped_total - len(result.skipped)} more skipped: use --json")
    return 0
