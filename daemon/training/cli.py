"""``trainingd train ranker|crop [--force]``: the command-line face of the runner.  Parsing
and printing only (``trainingd summary`` is :mod:`daemon.summary.cli`).

Exit codes of ``train``: 0 a model was trained (promoted or not) or none was due; 1 the training
failed, crashed or timed out; 3 not enough data.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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
        cols = [("model", "model"), ("raw output", "model_raw"),
                ("full frame", "baseline_full_frame"), ("mean box", "baseline_mean_box")]
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
    if kind == "crop" and (raw := raw_output_line(metrics)):
        lines.append(raw)
    return "\n".join(lines)


def embedder_lines(embedder_id: str, random: bool, reviewer: dict[str, Any]) -> list[str]:
    """Which embedder the model needs, RANDOM WEIGHTS named in capitals, and the reviewer
    export's outcome (exported, or why its file was left as it was)."""
    if not embedder_id:
        return []
    lines = [f"embedder: {embedder_id}"]
    if random:
        lines.append("RANDOM WEIGHTS: the embedder was random-init (tests and demos only); "
                     "this model is never exported to the reviewer")
    if reviewer:
        state = "exported" if reviewer.get("exported") else "not exported"
        lines.append(f"reviewer: {state} - {reviewer.get('note', '')}")
    return lines


def raw_output_line(metrics: dict[str, Any]) -> str | None:
    """The crop net's raw output, as the reviewer reads it, against the guarded box."""
    raw = metrics.get("raw_output")
    if not isinstance(raw, dict) or not raw.get("n"):
        return None
    differs = _pct(raw.get("raw_differs_from_projected"))
    return (f"raw output (what the reviewer reads): valid {_pct(raw.get('raw_valid'))}, "
            f"aspect kept {_pct(raw.get('raw_aspect_kept'))}, differs from the projected box "
            f"beyond {raw.get('aspect_tolerance')} on {differs}")


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.training.runner import train_model

    outcome = train_model(settings, args.kind, force=args.force)
    if getattr(args, "json", False):
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        version = f" v{outcome.version}" if outcome.version is not None else ""
        print(f"{args.kind}{version}: {outcome.status} - {outcome.reason}")
        for line in embedder_lines(outcome.embedder_id, outcome.embedder_random,
                                   outcome.reviewer_export):
            print(line)
        if outcome.metrics:
            print(metrics_table(args.kind, outcome.metrics))
    if outcome.status in ("promoted", "not_promoted", "not_due"):
        return 0
    return EXIT_NOT_ENOUGH_DATA if outcome.status == "not_enough_data" else EXIT_FAILED
