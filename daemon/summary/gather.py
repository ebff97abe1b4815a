"""What the daily summary says, gathered as plain JSON-ready data (no plots, no Markdown).

Decisions are counted by **their own time** (the ``timestamp`` the reviewer wrote into the
source DB), read through :class:`daemon.decisions.reader.SourceReader` (read-only and
invisible): the state DB only knows when *we* checked a row, so a first run over a year of rows
used to call all of them new.  Everything else comes from the state DB and the model registry.
A source that cannot be read, a table another room owns that is missing, or an earlier day's
JSON that is damaged becomes a note in the summary, never an exception.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from daemon.codes import CODES
from daemon.decisions.reader import SourceReader
from daemon.decisions.schema import COLUMNS
from daemon.errors import SourceError
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.summary.stats import mean_interval, wilson
from daemon.timeparse import iso_utc, parse_timestamp
from daemon.training import registry

log = structlog.get_logger("summary")

TREND_DAYS = 14
TOP_ROWS = 20
PANEL_EXAMPLES = 12  # candidates: the panels draw the 4 newest whose image is on disk
_CHUNK = 5000
_COL = {name: i + 1 for i, name in enumerate(COLUMNS)}  # rows are (rowid, *COLUMNS)
Beat = Callable[[str], None]


def day_label(moment: datetime) -> str:
    """The UTC date a summary written at ``moment`` is named by."""
    return moment.astimezone(UTC).date().isoformat()


# -- decisions, by the decision's own timestamp ---------------------------------------------------

@dataclass(frozen=True)
class SourceScan:
    """One pass over the source DBs: decisions per project and action in the day, decisions per
    summary day (the trend), rows whose timestamp would not parse, sources that could not be
    read (why), and the newest finished crops (JSON-ready rows for the crop panels)."""

    new: dict[str, dict[str, int]]
    per_day: dict[str, int]
    unparseable: dict[str, int]
    unreadable: dict[str, str]
    crops: list[dict[str, Any]]


def scan_sources(settings: Settings, until: datetime, beat: Beat) -> SourceScan:
    """One pass over every live source DB: decisions per project and action in the 24 h before
    ``until``, decisions per summary day for the trend, and the latest finished crops (for the
    crop panels).  Rows after ``until`` are not counted (a summary written late shows its day)."""
    from daemon.validation import discover_projects

    since = until - timedelta(days=1)
    oldest = until - timedelta(days=TREND_DAYS)
    new: dict[str, dict[str, int]] = {}
    per_day: dict[str, int] = {}
    unparseable: dict[str, int] = {}
    unreadable: dict[str, str] = {}
    crops: list[tuple[str, str, int, dict[str, Any]]] = []  # heap: (time, project, rowid, ex)
    s = settings.sources
    for src in discover_projects(settings):
        beat(f"summary: reading decisions of {src.project}")
        if not src.db_path.is_file():
            continue
        try:
            with SourceReader(src.db_path, busy_timeout_ms=s.busy_timeout_ms,
                              busy_budget_seconds=s.busy_retry_seconds) as reader:
                _, hi, _ = reader.snapshot()
                for chunk in reader.iter_rows(0, hi, _CHUNK):
                    beat(f"summary: reading decisions of {src.project}")
                    for row in chunk:
                        _count_row(src.project, row, since, until, oldest, new, per_day,
                                   unparseable, crops)
        except SourceError as exc:
            unreadable[src.project] = str(exc)
            log.warning("summary.source_unreadable", project=src.project, db=str(src.db_path),
                        error=str(exc))
    return SourceScan({p: dict(sorted(v.items())) for p, v in sorted(new.items())}, per_day,
                      unparseable, unreadable,
                      [c[3] for c in sorted(crops, key=lambda c: c[:3], reverse=True)])


def _count_row(project: str, row: tuple[Any, ...], since: datetime, until: datetime,
               oldest: datetime, new: dict[str, dict[str, int]], per_day: dict[str, int],
               unparseable: dict[str, int], crops: list[tuple[str, str, int, dict[str, Any]]]
               ) -> None:
    when = parse_timestamp(row[_COL["timestamp"]])
    if when is None:
        unparseable[project] = unparseable.get(project, 0) + 1
        return
    if when >= until:
        return
    action = row[_COL["user_action"]]
    action = action if isinstance(action, str) and action else "(none)"
    if when >= since:
        by_action = new.setdefault(project, {})
        by_action[action] = by_action.get(action, 0) + 1
    if when >= oldest:
        # the summary day a decision belongs to: the one whose 24 h window ends after it
        days_before = int((until - when) / timedelta(days=1))
        label = day_label(until - timedelta(days=days_before))
        per_day[label] = per_day.get(label, 0) + 1
    if action == "crop" and row[_COL["final_crop_coords"]] is not None:
        example = {"project": project, "group_id": row[_COL["group_id"]],
                   "timestamp": iso_utc(when), "images": row[_COL["images"]],
                   "user_selected_index": row[_COL["user_selected_index"]],
                   "final_crop_coords": row[_COL["final_crop_coords"]],
                   "ai_crop_coords": row[_COL["ai_crop_coords"]],
                   "image_width": row[_COL["image_width"]],
                   "image_height": row[_COL["image_height"]]}
        item = (iso_utc(when), project, int(row[0]), example)
        if len(crops) < PANEL_EXAMPLES:
            heapq.heappush(crops, item)
        elif item[:3] > crops[0][:3]:
            heapq.heapreplace(crops, item)


# -- state DB -------------------------------------------------------------------------------------

def projects(store: StateStore) -> dict[str, dict[str, int]]:
    return {p: store.row_figures(p) for p in store.figures.validated_projects()}


@dataclass(frozen=True)
class IssueCounts:
    """Current issues: per severity, count per code."""

    by_severity: dict[str, dict[str, int]]

    def by_code(self) -> dict[str, int]:
        """Flat code -> count over every severity, sorted by code."""
        codes = {c for v in self.by_severity.values() for c in v}
        return {c: sum(v.get(c, 0) for v in self.by_severity.values()) for c in sorted(codes)}

    def to_dict(self) -> dict[str, Any]:
        return {"by_severity": self.by_severity,
                "totals": {k: sum(v.values()) for k, v in self.by_severity.items()}}


def issues(store: StateStore) -> IssueCounts:
    """Current issues by code, split by severity."""
    by_sev: dict[str, dict[str, int]] = {"error": {}, "warning": {}}
    for code, severity, n in store.figures.issues_by_code():
        by_sev.setdefault(severity, {})[code] = n
    return IssueCounts(by_sev)


@dataclass(frozen=True)
class RowToFix:
    """A source row with issues: its counts, its codes (first seen first), and what to do
    about the first code (the codes table's action)."""

    project: str
    group_id: Any
    rowid: Any
    errors: int
    warnings: int
    codes: tuple[str, ...]
    what_to_do: str

    def to_dict(self) -> dict[str, Any]:
        return {"project": self.project, "group_id": self.group_id, "rowid": self.rowid,
                "errors": self.errors, "warnings": self.warnings, "codes": list(self.codes),
                "code": self.codes[0], "what_to_do": self.what_to_do}


@dataclass(frozen=True)
class RowsToFix:
    rows: tuple[RowToFix, ...]
    rows_with_issues: int

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows],
                "rows_with_issues": self.rows_with_issues}


def rows_to_fix(store: StateStore, limit: int = TOP_ROWS) -> RowsToFix:
    """The source rows with the most to fix: errors first, then warnings; one line per row
    with its first code and what the codes table says to do."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for found in store.figures.row_issues():
        r = rows.setdefault((found.project, found.row_key), {
            "project": found.project,
            "group_id": found.group_id if found.group_id is not None else found.row_key,
            "rowid": found.src_rowid, "errors": 0, "warnings": 0, "codes": []})
        r["errors" if found.severity == "error" else "warnings"] += 1
        if found.code not in r["codes"]:
            r["codes"].append(found.code)
    ranked = sorted(rows.values(), key=lambda r: (-r["errors"], -r["warnings"], r["project"],
                                                  r["rowid"]))
    out = []
    for r in ranked[:limit]:
        known = CODES.get(r["codes"][0])
        out.append(RowToFix(r["project"], r["group_id"], r["rowid"], r["errors"], r["warnings"],
                            tuple(r["codes"]),
                            known.action if known else "See Documents/ISSUE_CODES.md."))
    return RowsToFix(tuple(out), len(rows))


@dataclass(frozen=True)
class Coverage:
    """Embedding coverage per project (fates, total, share embedded), or why there is none."""

    available: bool
    projects: dict[str, dict[str, Any]]
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "projects": self.projects}


def coverage(store: StateStore) -> Coverage:
    """Embedded / failed / waiting / lost, per project (vanished images count as lost)."""
    from daemon.embedding.ledger import META_EMBEDDER, Ledger

    try:
        fates = Ledger(store).fates(store.get_meta(META_EMBEDDER))
    except sqlite3.OperationalError as exc:
        return Coverage(False, {}, f"embedding tables not present ({exc})")
    projects = {}
    for p, f in fates.items():
        total = sum(f.values())
        projects[p] = {**f, "total": total,
                       "coverage": (f["embedded"] / total) if total else None}
    return Coverage(True, projects)


# -- models, with n and intervals -----------------------------------------------------------------

def _ranker_item(meta: dict[str, Any]) -> dict[str, Any]:
    m = meta.get("metrics") or {}
    item: dict[str, Any] = {}
    for key, src in (("model", "model"), ("baseline", "baseline_highest_stage"),
                     ("recorded_ai", "recorded_ai_pick")):
        fig = m.get(src) or {}
        groups, anomalies = fig.get("groups"), fig.get("anomaly_groups")
        item[f"{key}_top1"] = wilson(fig.get("top1"), groups).to_dict()
        item[f"{key}_top1_anomaly"] = wilson(fig.get("top1_anomaly"), anomalies).to_dict()
    item["baseline_copy"] = meta.get("baseline_copy")
    return item


def _crop_item(meta: dict[str, Any]) -> dict[str, Any]:
    m = meta.get("metrics") or {}
    item: dict[str, Any] = {}
    for key, src in (("model", "model"), ("full_frame", "baseline_full_frame"),
                     ("mean_box", "baseline_mean_box")):
        fig = m.get(src) or {}
        item[f"{key}_mean_iou"] = mean_interval(fig.get("mean_iou"), fig.get("n"),
                                                fig.get("std_iou")).to_dict()
    by_stage: dict[str, Any] = {}
    for st, v in (m.get("model") or {}).get("by_stage", {}).items():
        entry: dict[str, Any] = {"n": v.get("n")}
        for key, src in (("model", "model"), ("full_frame", "baseline_full_frame"),
                         ("mean_box", "baseline_mean_box")):
            fig = (m.get(src) or {}).get("by_stage", {}).get(st, {})
            entry[key] = mean_interval(fig.get("mean_iou"), fig.get("n"),
                                       fig.get("std_iou")).to_dict()
        by_stage[st] = entry
    item["by_stage"] = by_stage
    # the raw output is what the reviewer reads: how often it is not the guarded box (issue 12)
    item["raw_output"] = m.get("raw_output") if isinstance(m.get("raw_output"), dict) else None
    return item


def models(settings: Settings, until: datetime) -> dict[str, list[dict[str, Any]]]:
    """Every registered version made before ``until``, oldest first, each figure with its n
    and 95% interval (Wilson for top-1, t for mean IoU)."""
    out: dict[str, list[dict[str, Any]]] = {}
    cutoff = iso_utc(until)
    for kind in ("ranker", "crop"):
        champion = registry.champion_version(settings.models_dir, kind)
        items = []
        for meta in registry.all_metadata(settings.models_dir, kind):
            created = meta.get("created_at")
            if isinstance(created, str) and created > cutoff:
                continue  # made after the day this summary describes
            item: dict[str, Any] = {
                "version": meta.get("version"), "created_at": created,
                "promoted": meta.get("promoted"), "champion": meta.get("version") == champion,
                "reason": meta.get("promotion_reason"), "holdout_size": meta.get("holdout_size"),
                "train_size": meta.get("train_size"), "embedder_id": meta.get("embedder_id"),
                # random-init embedder weights: named in the summary (never exported)
                "embedder_random": meta.get("embedder_random")}
            item.update(_ranker_item(meta) if kind == "ranker" else _crop_item(meta))
            items.append(item)
        out[kind] = items
    return out


# -- the trend from earlier days' JSON ------------------------------------------------------------

def _day_figures(data: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of one day's summary JSON that the trend draws (any layout so far)."""
    totals = (data.get("issues") or {}).get("totals") or {}
    cov = data.get("embedding_coverage") or {}
    embedded = total = 0
    for f in (cov.get("projects") or {}).values():
        if isinstance(f, dict):
            embedded += int(f.get("embedded") or 0)
            total += int(f.get("total", f.get("files")) or 0)
    champ: dict[str, Any] = {}
    for kind, key in (("ranker", "model_top1"), ("crop", "model_mean_iou")):
        for item in (data.get("models") or {}).get(kind) or []:
            if isinstance(item, dict) and item.get("champion"):
                v = item.get(key)
                champ[kind] = v.get("value") if isinstance(v, dict) else v
    return {"errors": totals.get("error"), "warnings": totals.get("warning"),
            "coverage": (embedded / total) if total else None,
            "ranker_top1": champ.get("ranker"), "crop_mean_iou": champ.get("crop")}


def trend(summaries_dir: Path, until: datetime, today: dict[str, Any],
          decisions_per_day: dict[str, int]) -> dict[str, Any]:
    """The last :data:`TREND_DAYS` days, oldest first: decisions per day from the sources'
    own timestamps, the other series from each day's summary JSON (missing or damaged ones
    leave a gap and a note)."""
    days, notes = [], []
    for back in range(TREND_DAYS - 1, -1, -1):
        label = day_label(until - timedelta(days=back))
        entry: dict[str, Any] = {"day": label, "decisions": decisions_per_day.get(label, 0)}
        if back == 0:
            entry.update(_day_figures(today))
            entry["from"] = "this summary"
        else:
            path = summaries_dir / f"daily_summary_{label}.json"
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                entry.update(_day_figures(data))
                entry["from"] = path.name
            except FileNotFoundError:
                entry["from"] = None
            except (OSError, ValueError, RecursionError, TypeError, AttributeError) as exc:
                entry["from"] = None
                notes.append(f"{path.name} could not be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); that day's series have a gap")
        days.append(entry)
    return {"days": days, "notes": notes}
