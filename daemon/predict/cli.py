"""``trainingd predict --project P [--bulk]``: the command-line face of the prediction pass.
Parsing and printing only; the pass is :mod:`daemon.predict.run`.

Exit codes: 0 predictions written (or nothing to predict); 3 no usable champion (nothing
written).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from daemon.errors import ConfigError
from daemon.settings import Settings

EXIT_NO_CHAMPION = 3


def add_predict_parser(subparsers: Any, common_parent: argparse.ArgumentParser
                       ) -> argparse.ArgumentParser:
    """Add ``predict`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "predict", parents=[common_parent], help="predict picks and crops for unreviewed groups",
        description="Group a project's images as the reviewer does, embed what has no vector, "
                    "and write the champion's picks and crops into "
                    "<data_root>/ai_data/predictions/<project>.db (Phase 1A shape). "
                    "See Documents/TRAINING.md.")
    p.add_argument("--project", required=True, help="a project with image_roots")
    p.add_argument("--bulk", action="store_true",
                   help="every image of the project (all folders), resumable, with progress")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.predict.run import predict_project
    from daemon.progress import progress
    from daemon.store.db import StateStore

    if args.project not in settings.projects:
        raise ConfigError(f"--project: no [projects.{args.project}] in the configuration "
                          f"(known: {', '.join(sorted(settings.projects)) or 'none'})")
    store = StateStore(settings.state_db)
    stage_box: list[Any] = []

    def stage() -> Any:
        if not stage_box:
            from daemon.embedding.stage import EmbeddingStage

            stage_box.append(EmbeddingStage(settings, store))
        return stage_box[0]

    try:
        with progress("predict.progress", unit="group", desc=f"predict {args.project}") as bar:
            result = predict_project(settings, store, args.project, datetime.now(UTC),
                                     bulk=args.bulk, stage=stage,
                                     progress=bar if args.bulk else None)
    finally:
        store.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.status == "no_champion":
        print(f"nothing predicted: {result.reason}")
    else:
        print(f"{result.project}: {result.groups} groups, {result.predicted} predicted, "
              f"{result.unchanged} unchanged, {result.reviewed_kept} already reviewed, "
              f"{result.partial} with missing images, {result.unpredictable} with no vector; "
              f"ranker v{result.ranker_version}, crop "
              f"{'v' + str(result.crop_version) if result.crop_version else '-'} -> {result.db}")
    return EXIT_NO_CHAMPION if result.status == "no_champion" else 0
