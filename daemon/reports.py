"""The inspection report of the playbook (BEFORE bulk operations), as JSON plus a Markdown twin.

``data/daily_summaries/ai_training_inspection_<UTC ts>.json``: the first N rows of every project
with ``repr()`` values, counts by user_action and by project, schema findings, the full issue
list and the list of invalid rows.  Written atomically; this room reads, it never validates.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.decisions.reader import SourceReader
from daemon.decisions.schema import COLUMNS
from daemon.errors import SourceError
from daemon.fsutil import atomic_write_text
from daemon.records import Issue, ProjectResult
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc, utc_stamp
from daemon.validation import RULES_VERSION, ProjectSource

MD_ROW_COLUMNS = ("group_id", "timestamp", "user_action", "images", "user_selected_index",
                  "final_crop_coords", "image_width", "image_height")
MD_ISSUE_LIMIT = 500


def build_inspection(
    sources: list[ProjectSource], results: list[ProjectResult], store: StateStore,
    *, now: datetime, first_rows: int, busy_timeout_ms: int = 2000,
    busy_budget_seconds: float = 30.0, units: list[dict[str, Any]] | None = None,
    gate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report; ``units`` (training's multi-group units: duplicates and near duplicates)
    and ``gate`` (the data gate's per-project figures) are added when training writes it."""
    by_project = {r.project: r for r in results}
    projects: list[dict[str, Any]] = []
    actions_total: Counter[str] = Counter()
    for src in sources:
        entry: dict[str, Any] = {"project": src.project, "db_file": str(src.db_path)}
        result = by_project.get(src.project)
        entry["validation"] = result.to_dict() if result else None
        try:
            with SourceReader(src.db_path, busy_timeout_ms=busy_timeout_ms,
                              busy_budget_seconds=busy_budget_seconds) as reader:
                entry["schema"] = reader.schema.to_dict()
                if reader.schema.readable:
                    actions = reader.counts_by("user_action")
                    entry["rows"] = sum(actions.values())
                    entry["counts_by_user_action"] = actions
                    actions_total.update(actions)
                    entry["first_rows"] = [
                        {"rowid": repr(r[0]), **{c: repr(v) for c, v in zip(COLUMNS, r[1:],
                                                                              strict=True)}}
                        for r in reader.first_rows(first_rows)
                    ]
        except SourceError as exc:
            entry["schema"] = {"kind": "unreadable", "detail": str(exc)}
        entry["issue_counts_by_code"] = store.issue_codes(src.project)
        projects.append(entry)
    issues = [i for src in sources for i in store.issues(src.project)]
    invalid: dict[tuple[str, str | None, int | None], list[str]] = {}
    for i in issues:
        if i.severity == "error" and i.rowid is not None:
            invalid.setdefault((i.project, i.group_id, i.rowid), []).append(i.code)
    severities = Counter(i.severity for i in issues)
    return {
        "report": "ai_training_inspection",
        "generated_at": iso_utc(now),
        "trainingd_version": __version__,
        "rules_version": RULES_VERSION,
        "totals": {
            "projects": len(sources),
            "rows": sum(p.get("rows", 0) for p in projects),
            "errors": severities.get("error", 0),
            "warnings": severities.get("warning", 0),
            "invalid_rows": len(invalid),
        },
        "counts_by_project": {p["project"]: p.get("rows", 0) for p in projects},
        "counts_by_user_action": dict(actions_total),
        "projects": projects,
        "invalid_rows": [
            {"project": p, "group_id": g, "rowid": r, "codes": sorted(set(c))}
            for (p, g, r), c in invalid.items()
        ],
        "issues": [i.to_dict() for i in issues],
        "duplicate_units": units or [],
        "gate": gate,
    }


def _searched(search: dict[str, Any]) -> str:
    """How the split's near-duplicate search ran, in one sentence."""
    vectors, threshold = search.get("vectors", 0), search["threshold"]
    if search.get("method") is None:
        why = search.get("skipped") or ("the threshold is above 1: the search is off, or the "
                                        "embedder is random-init and its vectors say nothing")
        return f"Near-identical embeddings were not searched ({why})."
    head = (f"Near-identical: embedding cosine >= {threshold} (the threshold `trainingd "
            f"similar` marks); ")
    if search["method"] == "ann":
        return head + (f"{vectors} vectors searched over the {search.get('structure', 'cells')} "
                       f"({search.get('cells')} cells, {search.get('probes')} probed per "
                       "vector, every pair confirmed exactly).")
    return head + f"every pair of the {vectors} vectors compared."


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_inspection_markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    out = [
        f"# Training data inspection, {report['generated_at']}",
        "",
        f"{t['projects']} project(s), {t['rows']} row(s): **{t['errors']} error(s)**, "
        f"{t['warnings']} warning(s), {t['invalid_rows']} invalid row(s). "
        f"trainingd {report['trainingd_version']}, rules v{report['rules_version']}.",
        "",
        "## Rows by project and action",
        "",
        "| project | rows | " + " | ".join(sorted(report["counts_by_user_action"])) + " | schema |",
        "|---|---|" + "---|" * len(report["counts_by_user_action"]) + "---|",
    ]
    for p in report["projects"]:
        counts = p.get("counts_by_user_action", {})
        cells = [str(counts.get(a, 0)) for a in sorted(report["counts_by_user_action"])]
        out.append(f"| {p['project']} | {p.get('rows', 0)} | " + " | ".join(cells)
                   + f" | {p['schema'].get('kind')} |")
    out += ["", "## Issues by code", "", "| project | code | count |", "|---|---|---|"]
    for p in report["projects"]:
        for code, n in sorted(p["issue_counts_by_code"].items()):
            out.append(f"| {p['project']} | `{code}` | {n} |")
    issues = report["issues"]
    out += ["", f"## Issues ({len(issues)})", ""]
    if len(issues) > MD_ISSUE_LIMIT:
        out.append(f"First {MD_ISSUE_LIMIT} shown; the JSON twin lists all {len(issues)}.")
        out.append("")
    out += ["| severity | code | project | group_id | rowid | field | value | message |",
            "|---|---|---|---|---|---|---|---|"]
    for i in issues[:MD_ISSUE_LIMIT]:
        out.append("| " + " | ".join(_md_cell(x) for x in (
            i["severity"], f"`{i['code']}`", i["project"], i["group_id"], i["rowid"], i["field"],
            f"`{i['value_repr']}`", i["message"])) + " |")
    gate = report.get("gate")
    if gate:
        out += ["", f"## Training data gate: {'passed' if gate['passed'] else 'REFUSED'}", "",
                "| project | rows | invalid rows | error share | usable rows | embedded | "
                "coverage | failed |", "|---|---|---|---|---|---|---|---|"]
        for name, g in sorted(gate["projects"].items()):
            out.append(f"| {name} | {g['rows']} | {g['invalid_rows']} | {g['error_share']} | "
                       f"{g['usable_rows']} | {g['embedded_rows']} | {g['coverage']} | "
                       f"{_md_cell('; '.join(g['failures']))} |")
    units = report.get("duplicate_units") or []
    if units:
        out += ["", f"## Duplicate and near-duplicate units ({len(units)})", "",
                "Groups joined into one unit share an image's bytes, its file, or a near-"
                "identical embedding: they always sit on one side of the split.", ""]
        search = report.get("near_duplicate_search") or {}
        if search.get("threshold") is not None:
            out += [_searched(search), ""]
        out += ["| unit | side | groups | joined by |", "|---|---|---|---|"]
        for u in units[:MD_ISSUE_LIMIT]:
            out.append(f"| {_md_cell(u['unit'])} | {u['side']} | "
                       f"{_md_cell(', '.join(u['groups']))} | {', '.join(u['joined_by'])} |")
    for p in report["projects"]:
        rows = p.get("first_rows", [])
        if not rows:
            continue
        out += ["", f"## First {len(rows)} rows of {p['project']} (repr values)", "",
                "| rowid | " + " | ".join(MD_ROW_COLUMNS) + " |",
                "|---|" + "---|" * len(MD_ROW_COLUMNS)]
        for r in rows:
            out.append(f"| {r['rowid']} | "
                       + " | ".join(f"`{_md_cell(r[c])}`" for c in MD_ROW_COLUMNS) + " |")
    return "\n".join(out) + "\n"


def write_inspection(report: dict[str, Any], folder: Path, now: datetime) -> tuple[Path, Path]:
    stem = f"ai_training_inspection_{utc_stamp(now)}"
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, render_inspection_markdown(report))
    return json_path, md_path


def issue_line(issue: Issue) -> str:
    where = f"{issue.project}"
    if issue.rowid is not None:
        where += f" rowid={issue.rowid} group_id={issue.group_id!r}"
    return (f"{issue.severity:7} {issue.code:34} {where} {issue.field or '-'}="
            f"{issue.value_repr}: {issue.message}")
