"""``trainingd train ranker|crop [--force]`` and ``trainingd summary``: the command-line faces
of the runner and the daily summary.  Parsing and printing only.

Exit codes of ``train``: 0 a model was trained (promoted or not) or none was due; 1 the training
failed, crashed or timed out; 3 not enough data.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from daemon.settings import Settings

EXIT_FAILED = 1
EXIT_NOT_ENOUGH_DATA = 3


def add_train_parser(subparsers: Any, common_parent: argparse.ArgumentParser
                     ) -> argparse.ArgumentParser:
    """Add ``train`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train", parents=[common_parent], help="train the ranker or the crop proposer now",
        description="Train one model from validated rows and cached embeddings, evaluate it on "
                    "the group holdout beside the baselines and the champion, and promote it "
                    "only if it beats both. See Documents/TRAINING.md.")
    p.add_argument("kind", choices=("ranker", "crop"))
    p.add_argument("--force", action="store_true",
                   help="train even when the retrain policy says it is not due")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return p


def add_summary_parser(subparsers: Any, common_parent: argparse.ArgumentParser
                       ) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "summary", parents=[common_parent], help="write today's daily summary now",
        description="Write the daily summary (JSON, Markdown, PNG plots) into the summaries "
                    "folder and print their paths.")
    return p


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def metrics_table(kind: str, metrics: dict[str, Any]) -> str:
    """The holdout figures of a model beside its baselines, as aligned text."""
    if not metrics:
        return "(no metrics)"
    rows: list[tuple[str, str, Callable[[Any], str]]]
    if kind == "ranker":
        cols = [("model", "model"), ("highest stage", "baseline_highest_stage"),
                ("recorded AI", "recorded_ai_pick")]
        rows = [("groups", "groups", str), ("anomaly groups", "anomaly_groups", str),
                ("top-1", "top1", _pct), ("top-1 normal", "top1_normal", _pct),
                ("top-1 anomaly", "top1_anomaly", _pct)]
    else:
        cols = [("model", "model"), ("full frame", "baseline_full_frame"),
                ("mean box", "baseline_mean_box")]
        rows = [("crops", "n", str), ("mean IoU", "mean_iou", _num),
                ("median IoU", "median_iou", _num),
                ("centre distance", "mean_centre_distance", _num),
                ("corners within 0.05", "corners_within_0_05", _pct)]
    lines = [f"{'holdout':<22}" + "".join(f"{c[0]:>15}" for c in cols)]
    for label, key, fmt in rows:
        lines.append(f"{label:<22}" + "".join(
            f"{fmt(metrics.get(c[1], {}).get(key)):>15}" for c in cols))
    if kind == "crop":
        stages = sorted(metrics.get("model", {}).get("by_stage", {}))
        for st in stages:
            lines.append(f"{'IoU stage ' + st:<22}" + "".join(
                f"{_num(metrics.get(c[1], {}).get('by_stage', {}).get(st, {}).get('mean_iou')):>15}"
                for c in cols))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.training.runner import train_model

    outcome = train_model(settings, args.kind, force=args.force)
    if getattr(args, "json", False):
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        version = f" v{outcome.version}" if outcome.version is not None else ""
        print(f"{args.kind}{version}: {outcome.status} - {outcome.reason}")
        if outcome.metrics:
            print(metrics_table(args.kind, outcome.metrics))
    if outcome.status in ("promoted", "not_promoted", "not_due"):
        return 0
    return EXIT_NOT_ENOUGH_DATA if outcome.status == "not_enough_data" else EXIT_FAILED


def cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.store.db import StateStore
    from daemon.summary import write_daily_summary

    store = StateStore(settings.state_db)
    try:
        json_path, md_path = write_daily_summary(settings, store, datetime.now(UTC))
    finally:
        store.close()
    print(json_path)
    print(md_path)
    return 0
