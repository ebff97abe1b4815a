"""The daily summary: what happened to the data and the models, as JSON, Markdown and plots.

Written into ``settings.summaries_dir`` as ``daily_summary_<UTC date>.json``, ``.md`` and the
PNGs of :data:`daemon.summary.plots.PLOTS` beside them (always the same set, with a note drawn
when a section is empty, so the set of files is predictable).  A summary describes the 24 h
before the moment it is written for; a day the daemon was down for is written at the next start
from the data (:func:`write_missed_summaries`, up to ``summary.backfill_days``), marked as
written late.  Rooms: :mod:`.gather` (data), :mod:`.stats` (intervals), :mod:`.plots`
(Figures), :mod:`.markdown` (the page), :mod:`.panels` (crop examples).  matplotlib is imported
only when plots are drawn, so importing this package stays cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from daemon.fsutil import atomic_write_bytes, atomic_write_text
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.summary import gather
from daemon.summary.gather import day_label
from daemon.timeparse import iso_utc

log = structlog.get_logger("summary")

__all__ = ["PLOTS", "build_summary", "missed_days", "write_daily_summary",
           "write_missed_summaries"]

PLOTS = ("decisions", "issues", "embedding_coverage", "model_metrics", "crop_iou_by_stage",
         "crop_panels", "trend", "live_accuracy")
_NAME = re.compile(r"daily_summary_(\d{4}-\d{2}-\d{2})\.json")


def _nothing(_: str) -> None:
    return None


def build_summary(settings: Settings, store: StateStore, now: datetime, *,
                  written_at: datetime | None = None, vectors: VectorSource | None = None,
                  beat: Callable[[str], None] = _nothing) -> dict[str, Any]:
    """The summary of the 24 h before ``now`` as one JSON-ready dict (reads only).
    ``written_at`` later than ``now``: a missed day written late."""
    from daemon.training import policy, registry
    from daemon.training.audit import audit_budget

    since = now - timedelta(days=1)
    written = written_at or now
    scan = gather.scan_sources(settings, now, beat)
    beat("summary: reading the state DB")
    retrain = {}
    for kind in policy.KINDS:
        d = policy.retrain_decision(store, settings, kind, now)
        retrain[kind] = {"due": d.due, "reason": d.reason, "new_labels": d.new_labels}
    issues = gather.issues(store)
    summary: dict[str, Any] = {
        "day": day_label(now), "generated_at": iso_utc(written), "written_at": iso_utc(written),
        "written_late": written > now + timedelta(minutes=5),
        "window_start": iso_utc(since), "window_end": iso_utc(now),
        "new_decisions": scan.new,
        "decision_notes": {"unparseable": scan.unparseable, "unreadable": scan.unreadable},
        "projects": gather.projects(store),
        "issues": issues.to_dict(),
        # flat code -> count, kept for jq recipes written against the first layout
        "issues_by_code": issues.by_code(),
        "rows_to_fix": gather.rows_to_fix(store).to_dict(),
        "embedding_coverage": gather.coverage(store).to_dict(),
        "models": gather.models(settings, now),
        "champions": {k: p.to_dict() for k, p in registry.read_pointer(settings.models_dir)
                      .items()},
        "retrain_events": [e.to_dict() for e in policy.run_history(store, since=since)
                           if e.started_at <= iso_utc(now)],
        "retrain_policy": retrain,
        "audit": audit_budget(store, settings, now).to_dict(),
    }
    beat("summary: crop panels")
    from daemon.summary.panels import crop_panels

    summary["crop_panels"] = crop_panels(settings, store, scan.crops, vectors)
    summary["trend"] = gather.trend(settings.summaries_dir, now, summary, scan.per_day)
    from daemon.summary import live

    beat("summary: live accuracy")
    summary["live_accuracy"] = live.gather(settings)
    return summary


def write_daily_summary(settings: Settings, store: StateStore, now: datetime, *,
                        written_at: datetime | None = None, vectors: VectorSource | None = None,
                        beat: Callable[[str], None] = _nothing) -> tuple[Path, Path]:
    """Write the summary files for ``now``'s UTC date; returns the JSON and Markdown paths."""
    from daemon.summary import markdown, plots

    summary = build_summary(settings, store, now, written_at=written_at, vectors=vectors,
                            beat=beat)
    stem = settings.summaries_dir / f"daily_summary_{summary['day']}"
    paths = {name: stem.with_name(f"{stem.name}_{name}.png") for name in PLOTS}
    for name in PLOTS:
        beat(f"summary: plot {name}")
        fig = plots.BUILDERS[name](summary)
        atomic_write_bytes(paths[name], plots.render_png(fig))
    summary["plots"] = {k: p.name for k, p in paths.items()}
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(md_path, markdown.render(summary, paths))
    # the JSON last: its presence is what says "this day is written" to the catch-up at start
    atomic_write_text(json_path, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    log.info("summary.written", day=summary["day"], late=summary["written_late"],
             json=str(json_path), new_decisions=sum(sum(v.values()) for v in
                                                    summary["new_decisions"].values()))
    return json_path, md_path


def written_days(summaries_dir: Path) -> set[str]:
    try:
        return {m.group(1) for p in summaries_dir.iterdir() if (m := _NAME.fullmatch(p.name))}
    except OSError:
        return set()


def missed_days(settings: Settings, now: datetime) -> list[datetime]:
    """The scheduled moments after the last written summary and at or before ``now`` whose
    summary is missing, oldest first, at most ``summary.backfill_days`` of them.  Nothing when
    no summary was ever written (a new install has no missed days)."""
    days = written_days(settings.summaries_dir)
    limit = settings.summary.backfill_days
    if not days or limit <= 0:
        return []
    last = max(days)
    tz = ZoneInfo(settings.service.timezone)
    hour, minute = (int(x) for x in settings.service.daily_summary_time.split(":"))
    today = now.astimezone(tz).date()
    out: list[datetime] = []
    for back in range(limit + 2):
        moment = datetime.combine(today - timedelta(days=back), time(hour, minute), tzinfo=tz)
        label = day_label(moment)
        if moment > now:
            continue
        if label <= last:
            break
        if label not in days:
            out.append(moment.astimezone(UTC))
    return sorted(out)[-limit:]


def write_missed_summaries(settings: Settings, store: StateStore, now: datetime, *,
                           beat: Callable[[str], None] = _nothing,
                           should_stop: Callable[[], bool] = lambda: False) -> list[Path]:
    """Write every missed day's summary (see :func:`missed_days`), marked as written late."""
    written = []
    for moment in missed_days(settings, now):
        if should_stop():
            break
        json_path, _ = write_daily_summary(settings, store, moment, written_at=now, beat=beat)
        written.append(json_path)
    if written:
        log.info("summary.missed_days_written", days=[p.name for p in written])
    return written
