"""``trainingd similar PATH|HASH [-k 10] [--json]``: the most similar cached images.

Answers from the similarity index of the embedder that wrote last (the state DB's record),
after adding what the cache holds beyond the saved index, and saves the index when that
changed it.  It never embeds: a file must have been embedded (``trainingd embed`` or the
daemon) to be asked about.  Each neighbour is printed with its cosine and the files the state
DB knows for its content hash, and marked a near duplicate when its cosine reaches
``training.near_duplicate_cosine``: the threshold at which the split joins two groups into one
unit (one threshold for this command, the split and the report).

Exit codes (Documents/OPERATIONS.md): 0 answered; 1 not found (no embeddings yet, a file or
hash with no cached vector); 78 configuration (handled by :mod:`daemon.cli`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import structlog

from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import META_EMBEDDER
from daemon.files import sha256_file
from daemon.settings import Settings
from daemon.similar.persist import SimilarIndex
from daemon.store.db import StateStore

log = structlog.get_logger("similar")
EXIT_NOT_FOUND = 1
_HEX = re.compile(r"[0-9a-f]{64}")


def _k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1..1000: {value}")
    return value


def add_similar_parser(subparsers: Any, common: argparse.ArgumentParser
                       ) -> argparse.ArgumentParser:
    """Add ``similar`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "similar", parents=[common], help="the most similar embedded images to a file or hash",
        description="Look up an embedded image (a file path, or the SHA-256 of its bytes) in "
                    "the similarity index and print its nearest neighbours with their cosine. "
                    "See Documents/SIMILARITY.md.")
    p.add_argument("target", metavar="PATH|HASH", help="an image file, or its content SHA-256")
    p.add_argument("-k", type=_k, default=10, help="neighbours to print (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def _not_found(message: str) -> int:
    print(f"trainingd similar: {message}", file=sys.stderr)
    return EXIT_NOT_FOUND


def _files_for(store: StateStore, shas: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in shas}
    for sha in shas:
        out[sha] = [f"{project}:{path}" for project, path in store.images.with_sha(sha, limit=5)]
    return out


def cmd_similar(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``trainingd similar``; returns the exit code."""
    target = str(args.target)
    if not settings.state_db.is_file():
        return _not_found("no embeddings yet: run `trainingd embed` (or the daemon) first")
    store = StateStore(settings.state_db, read_only=True)
    try:
        embedder_id = store.get_meta(META_EMBEDDER)
        if not embedder_id:
            return _not_found("no embeddings yet: run `trainingd embed` (or the daemon) first")
        cache = VectorCache(settings.cache_dir, embedder_id)
        if _HEX.fullmatch(target.lower()):
            sha = target.lower()
        else:
            path = Path(target)
            try:
                sha = sha256_file(path, follow_links=True)
            except OSError as exc:
                return _not_found(f"cannot read {target!r}: {exc}")
        if not cache.has(sha):
            return _not_found(f"{target!r} (sha256 {sha}) has no vector for embedder "
                              f"{embedder_id!r}: embed it first (`trainingd embed`)")
        index = SimilarIndex.open(cache)
        index.save()
        found = [(s, c) for s, c in index.neighbours(cache.load(sha), args.k + 1) if s != sha]
        found = found[:args.k]
        files = _files_for(store, [s for s, _ in found])
    finally:
        store.close()
    log.info("similar.answered", sha256=sha, k=args.k, found=len(found), vectors=len(index))
    near = settings.training.near_duplicate_cosine
    doc: dict[str, Any] = {
        "query": target, "sha256": sha, "embedder_id": embedder_id, "vectors": len(index),
        "near_duplicate_cosine": near,
        "neighbours": [{"sha256": s, "cosine": c, "near_duplicate": c >= near,
                        "files": files[s]} for s, c in found]}
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for n in doc["neighbours"]:
            mark = "near-duplicate" if n["near_duplicate"] else "              "
            print(f"{n['cosine']:.4f}  {mark}  {n['sha256'][:16]}  "
                  f"{', '.join(n['files']) or '-'}")
    return 0
