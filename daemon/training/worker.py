"""The training child process: ``python -m daemon.training.worker --kind ranker ...``.

Runs one training and prints JSON lines prefixed ``@@trainingd `` on stdout: progress events,
then one ``result``.  SIGTERM asks it to stop at the next batch.  It never writes the state DB
(the parent is the only writer); it writes only the model registry.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from typing import Any

from daemon.errors import DaemonError
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.training.runner import LINE_PREFIX, settings_from_payload, train_in_process


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(LINE_PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def build_vectors(spec: str, settings: Settings, store: StateStore) -> VectorSource:
    """``module:callable`` called with ``(settings, store)``."""
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name)
    source: VectorSource = factory(settings, store)
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="daemon.training.worker")
    parser.add_argument("--kind", choices=("ranker", "crop"), required=True)
    parser.add_argument("--settings", required=True, help="settings JSON file, or - for stdin")
    parser.add_argument("--vectors-factory", required=True)
    args = parser.parse_args(argv)
    if args.settings == "-":
        settings = settings_from_payload(sys.stdin.read())
    else:
        with open(args.settings, encoding="utf-8") as fh:
            settings = settings_from_payload(fh.read())
    stop = {"flag": False}

    def on_term(signum: int, frame: object) -> None:
        stop["flag"] = True  # the loop acts on it at the next batch

    signal.signal(signal.SIGTERM, on_term)
    store = StateStore(settings.state_db, read_only=True)
    try:
        try:
            vectors = build_vectors(args.vectors_factory, settings, store)
        except (ImportError, AttributeError, DaemonError) as exc:
            emit({"event": "result", "kind": args.kind, "status": "failed",
                  "reason": f"no embedding source ({args.vectors_factory}): {exc}"})
            return 0
        outcome = train_in_process(settings, args.kind, vectors, store=store,
                                   should_stop=lambda: stop["flag"], progress=emit)
    finally:
        store.close()
    emit({"event": "result", **outcome.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
