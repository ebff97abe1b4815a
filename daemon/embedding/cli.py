"""``trainingd embed``: the command-line face of the embedding stage, and the coverage figures
``trainingd status`` shows.

Parses arguments, scans the configured image roots, runs the stage or ``--verify``, and prints
what happened.  Progress (:mod:`daemon.progress`): the model load is a phase, then one bar whose
total is the files to read (``--limit`` or fewer) on a terminal, or ``embedding.progress``
records off one; never in daemon mode.  No extraction logic lives here.

Exit codes: 0 done (bad images are reported, not failures); 1 ``--verify`` found mismatches or
the model could not be loaded; 2 bad arguments (unknown project, no image roots configured); 78
``--backend ray`` without the ``[ray]`` extra (the message says how to install it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from daemon.argtypes import positive_int
from daemon.embedding.ledger import META_EMBEDDER, Ledger
from daemon.errors import EmbeddingError
from daemon.progress import phase, progress
from daemon.settings import Settings
from daemon.store import StateStore

if TYPE_CHECKING:
    from daemon.embedding.model import Embedder
    from daemon.embedding.stage import EmbedResult
    from daemon.records import ImageCandidate

log = structlog.get_logger("embedding")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # --backend ray without the [ray] extra: a setup to fix, not a failure



def add_embed_parser(subparsers: Any, common: argparse.ArgumentParser
                     ) -> argparse.ArgumentParser:
    """Add ``embed`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "embed", parents=[common],
        help="embed the images under the configured image roots (content-addressed cache)",
        description="Embed every image under the configured projects' image_roots that has "
                    "no vector yet; moved or renamed files cost no model call. With --verify, "
                    "check instead that cache, index, state DB and files agree. "
                    "See Documents/EMBEDDINGS.md.")
    p.add_argument("--project", help="only this project (a [projects.NAME] of the config)")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="read at most N files that need work (unchanged files are not counted)")
    p.add_argument("--verify", action="store_true",
                   help="check cache, index and files agree; report every mismatch; embed "
                        "nothing")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--backend", choices=("local", "ray"),
                   help="local: this process (default: embedding.backend); ray: Ray Data "
                        "decode tasks and model actors (the [ray] extra)")
    p.add_argument("--address", metavar="auto|ray://HOST:PORT",
                   help="the Ray cluster (default: embedding.ray_address; none or 'local': a "
                        "cluster of this box, started for the run)")
    return p


def coverage(store: StateStore, settings: Settings) -> dict[str, dict[str, int]]:
    """Per project: images seen, embedded with the current embedder, failed."""
    try:
        figures = Ledger(store).coverage(store.get_meta(META_EMBEDDER))
    except sqlite3.OperationalError:  # a state DB from before the embedding migration
        figures = {}
    for name in settings.projects:
        figures.setdefault(name, {"seen": 0, "embedded": 0, "failed": 0})
    return dict(sorted(figures.items()))


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``trainingd embed``; returns the exit code."""
    store = StateStore(settings.state_db)
    try:
        if args.verify:
            return _verify(args, settings, store)
        return _embed(args, settings, store)
    finally:
        store.close()


def embed_with_ray(settings: Settings, store: StateStore,
                   candidates: Iterable[ImageCandidate], *, limit: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] = lambda: False,
                   address: str | None = None, embedder: Embedder | None = None
                   ) -> EmbedResult:
    """``--backend ray``: the stage's own run with every file that needs work handed to Ray
    (``address``, else ``embedding.ray_address``, else a cluster of this box).  The driver's
    model copy is built on the CPU unless given: the GPUs belong to the actors."""
    from daemon.embedding.ray_backend import driver_embedder, require_ray
    from daemon.embedding.stage import EmbeddingStage

    require_ray()
    cfg = settings.embedding
    forced = cfg.model_copy(update={"ray_address": address or cfg.ray_address or "local",
                                    "ray_min_backlog": 0})
    ray_settings = settings.model_copy(update={"embedding": forced})
    ray_settings._base_dir, ray_settings._config_file = settings.base_dir, settings.config_file
    stage = EmbeddingStage(ray_settings, store, embedder=embedder or driver_embedder(settings))
    return stage.run(candidates, limit=limit, progress=progress, should_stop=should_stop)


def _verify(args: argparse.Namespace, settings: Settings, store: StateStore) -> int:
    from daemon.embedding.verify import verify_cache

    report = verify_cache(settings, store)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(f"{report.vectors} vector(s), {report.index_lines} index line(s), "
              f"{report.files} file(s) known ({report.files_gone} deleted since)")
        for m in report.mismatches:
            print(f"  {m.kind:26} {m.subject}: {m.detail}")
        print("verify: OK" if report.ok else f"verify: {len(report.mismatches)} mismatch(es)")
    return 0 if report.ok else EXIT_FAILED


def _embed(args: argparse.Namespace, settings: Settings, store: StateStore) -> int:
    from daemon.embedding.stage import EmbeddingStage, candidates_from_roots

    try:
        candidates = candidates_from_roots(settings, args.project)
    except EmbeddingError as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not any(cfg.image_roots for cfg in settings.projects.values()):
        print("embed: no [projects.NAME] image_roots in the configuration; nothing to embed",
              file=sys.stderr)
        return EXIT_USAGE
    stop = {"requested": False}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # finish (or drop) the current batch, then stop; a second Ctrl-C exits at once
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    backend = getattr(args, "backend", None) or settings.embedding.backend
    if backend == "ray":
        from daemon.embedding.ray_backend import require_ray
        from daemon.errors import ConfigError

        try:
            require_ray()
        except ConfigError as exc:
            print(f"embed: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        stage = EmbeddingStage(settings, store)
        with phase(f"loading {settings.embedding.model}"):
            if backend == "ray":  # the driver's copy, on the CPU: the GPUs are the actors'
                from daemon.embedding.ray_backend import driver_embedder

                stage = EmbeddingStage(settings, store, embedder=driver_embedder(settings))
            stage.embedder  # noqa: B018  (loads the model: 10-20 s of no visible work otherwise)
        with progress("embedding.progress", unit="img", desc="embedding") as report:
            if backend == "ray":
                result = embed_with_ray(settings, store, candidates, limit=args.limit,
                                        progress=report, should_stop=lambda: stop["requested"],
                                        address=args.address, embedder=stage.embedder)
            else:
                result = stage.run(candidates, limit=args.limit, progress=report,
                                   should_stop=lambda: stop["requested"])
    except EmbeddingError as exc:
        log.error("embedding.failed", error=str(exc))
        print(f"embed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
    by_code = Counter(i.code for i in result.issues)
    if args.json:
        doc = result.to_dict() | {"embedder_id": stage.embedder.embedder_id,
                                  "issues": [i.to_dict() for i in result.issues]}
        json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    print(f"{result.seen} image(s) seen: {result.embedded} embedded, {result.cached} already "
          f"cached, {result.moved} reused (moved/renamed/duplicate), {result.failed} failed, "
          f"{result.skipped_failed} unchanged failure(s) skipped in {result.duration_s:.1f} s"
          + (" (stopped early)" if result.stopped else ""))
    print(f"embedder: {stage.embedder.embedder_id}")
    for code, n in sorted(by_code.items()):
        print(f"  {code:24} {n}")
    for issue in result.issues[:20]:
        print(f"  {issue.code}: {issue.db_file}: {issue.message}")
    return 0
