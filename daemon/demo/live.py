"""The demo's live-accuracy act: a champion predicts new groups, the reviewer decides after.

The daily summary's "Live accuracy" section counts a review only for a group trainingd
predicted *before* the review (:mod:`daemon.predict.live`).  The demo's first simulator run
reviews each group as its images appear, before any champion exists, so it can never show one.
This act follows the retrain:

1. a ranker champion: the retrain's version when it was promoted on evidence; otherwise (the
   demo's few dozen groups cannot show a model better than the highest-stage rule) the demo
   makes that version trainingd's champion itself, pointer only, and says so: random weights
   never reach the reviewer's files (``registry.promote`` without a reviewer export);
2. a second simulator run whose images appear first and whose reviews wait behind a gate file
   (``--review-gate``) plus a short review delay;
3. the conductor opens the gate once trainingd has predicted every new group (a condition,
   polled), so each review comes after its prediction, whatever the machine's load;
4. after the reviews a ``predict`` trigger runs the live pass over them; the conductor waits
   until live reviews are recorded, then asks for the summary.

The counts are read from trainingd's own predictions DB, read-only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.predict.store import (
    live_review_count,
    names_key,
    predicted_name_keys,
    predictions_db,
)
from daemon.settings import Settings

log = structlog.get_logger("demo")

PROJECT = "studio"
#: groups reviewed after their prediction (enough for an interval, a few seconds of work)
LIVE_GROUPS = 8
#: the gate opens once all are predicted; each review still comes this long after its images
REVIEW_DELAY_SECONDS = 1.0
GATE_NAME = "reviewer_may_start"
#: the trigger that runs the live pass once the reviews are in
LIVE_TRIGGERS: tuple[tuple[str, str], ...] = (("predict", ""),)


def make_champion(settings: Settings, retrain: tuple[str, dict[str, Any]] | None
                  ) -> tuple[int | None, str]:
    """The ranker champion the act predicts with and a sentence for the tour; ``(None, why)``
    when the retrain left no version to use (the act is then skipped)."""
    from daemon.training import registry

    models = settings.models_dir
    result = (retrain[1].get("result") if retrain is not None else None) or {}
    version = result.get("version")
    current = registry.champion_version(models, "ranker")
    if result.get("promoted") and current is not None:
        return current, f"ranker v{current} promoted on evidence by the retrain"
    if not isinstance(version, int) or isinstance(version, bool):
        if current is not None:
            return current, f"ranker v{current}, the champion already in place"
        why = result.get("reason") or result.get("error") or "the retrain has no result"
        return None, f"no ranker version to predict with ({why})"
    meta = registry.read_metadata(models, "ranker", version)
    if meta is None:
        return None, f"ranker v{version} has no readable metadata"
    # pointer only: no reviewer export, so random weights never reach the reviewer's files
    registry.promote(models, "ranker", version, {}, meta, datetime.now(UTC))
    log.info("demo.champion_made", kind="ranker", version=version,
             reason=result.get("reason"), embedder_random=meta.get("embedder_random"))
    return version, (f"ranker v{version} made champion by the demo, not on evidence (its "
                     "retrain: not promoted); it predicts for trainingd only, the reviewer's "
                     "files are untouched")


def shown_groups(commit_log: Path) -> list[list[str]]:
    """The groups the simulator has shown so far (its ``images`` lines), as file names."""
    try:
        lines = commit_log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if '"event": "images"' in line:
            with contextlib.suppress(ValueError):
                out.append([str(n) for n in json.loads(line)["names"]])
    return out


def predicted_groups(settings: Settings, version: int, groups: list[list[str]]) -> int:
    """How many of ``groups`` ranker ``version`` has predicted, exactly as shown (a group
    predicted while only part of its images had arrived does not count)."""
    try:
        keys = predicted_name_keys(predictions_db(settings.data_root, PROJECT), version)
    except sqlite3.Error:  # busy: ask again at the next poll
        return 0
    return sum(names_key(g) in keys for g in groups)


def live_reviews(settings: Settings) -> int:
    """Reviews recorded for groups trainingd predicted before them."""
    try:
        return live_review_count(predictions_db(settings.data_root, PROJECT))
    except sqlite3.Error:  # busy: ask again at the next poll
        return 0


def simulator_command(settings: Settings, root: Path, *, gate: Path, commit_log: Path
                      ) -> list[str]:
    """The second simulator run: images at once, reviews behind the gate."""
    return [sys.executable, "-m", "daemon.demo.simulator",
            "--decisions", str(settings.decisions_dir), "--images", str(root / "photos"),
            "--project", PROJECT, "--groups", str(LIVE_GROUPS), "--rate", "4",
            "--crop-delay-seconds", "1", "--seed", "8", "--delete-delay-seconds", "5",
            "--review-delay-seconds", str(REVIEW_DELAY_SECONDS), "--review-gate", str(gate),
            "--commit-log", str(commit_log)]
