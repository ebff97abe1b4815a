"""The backfill inspection report: what a backfill read, would write and rejected, before a bulk
write happens.

Same place and name pattern as the validation report (``ai_training_inspection_<UTC ts>``, JSON
plus a Markdown twin in the summaries folder).  The rejection list can be as long as the input,
so both files are streamed from the run's scratch state into a temp file and renamed into place:
a reader never sees half a report, and memory does not grow with the list.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from daemon import __version__
from daemon.backfill.options import BackfillOptions, BackfillOutcome, LineIssue
from daemon.fsutil import atomic_writer
from daemon.timeparse import iso_utc, utc_stamp

MD_ISSUE_LIMIT = 500
MD_ROW_COLUMNS = ("group_id", "timestamp", "project_id", "user_action", "images",
                  "user_selected_index", "final_crop_coords", "image_width", "image_height")


def report_header(opts: BackfillOptions, out: BackfillOutcome, now: datetime) -> dict[str, Any]:
    """Every part of the report except the two issue lists (those are streamed)."""
    return {
        "report": "ai_training_inspection",
        "kind": "backfill",
        "generated_at": iso_utc(now),
        "trainingd_version": __version__,
        "mode": "execute" if opts.execute else "dry-run",
        "options": {
            "project": opts.project, "project_from": opts.project_from,
            "windows": [f"{w.project}={iso_utc(w.start)}..{iso_utc(w.end)}"
                        for w in opts.windows],
            "image_roots": [str(p) for p in opts.image_roots],
            "out": str(opts.out) if opts.out else None,
            "full_frame_tolerance": opts.full_frame_tolerance,
        },
        "totals": {
            "lines": out.converted + out.rejected,
            "converted": out.converted,
            "rejected": out.rejected,
            "warnings": sum(n for c, n in out.by_code.items() if c in _warning_codes()),
        },
        "inputs": [f.to_dict() for f in out.files],
        "counts_by_user_action": dict(sorted(out.by_action.items())),
        "counts_by_project": dict(sorted(out.by_project.items())),
        "counts_by_project_and_action": {p: dict(sorted(c.items()))
                                         for p, c in sorted(out.by_project_action.items())},
        "counts_by_code": dict(sorted(out.by_code.items())),
        "targets": [
            {"project": p, "db_file": str(t), "rows": out.by_project[p],
             "exists": t in out.existing_targets, "created": t in out.created}
            for p, t in sorted(out.targets.items())
        ],
        "would_create": [] if opts.execute else [
            str(t) for _, t in sorted(out.targets.items()) if t not in out.existing_targets],
        "created": [str(p) for p in out.created],
        "first_rows": out.first_rows,
    }


def _warning_codes() -> set[str]:
    from daemon.codes import SEVERITY

    return {c for c, s in SEVERITY.items() if s == "warning"}


def _atomic_text(path: Path) -> contextlib.AbstractContextManager[IO[str]]:
    return atomic_writer(path, "w")


def _write_list(fh: IO[str], items: Iterator[LineIssue]) -> None:
    fh.write("[")
    for n, item in enumerate(items):
        fh.write(",\n    " if n else "\n    ")
        fh.write(json.dumps(item.to_dict(), ensure_ascii=False))
    fh.write("\n  ]")


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_issues(fh: IO[str], title: str, items: Iterator[LineIssue], total: int) -> None:
    fh.write(f"\n## {title} ({total})\n\n")
    if total > MD_ISSUE_LIMIT:
        fh.write(f"First {MD_ISSUE_LIMIT} shown; the JSON twin lists all {total}.\n\n")
    fh.write("| file | line | code | field | value | message |\n|---|---|---|---|---|---|\n")
    for i in items:
        fh.write("| " + " | ".join(_md_cell(x) for x in (
            Path(i.file).name, i.line, f"`{i.code}`", i.field or "-", f"`{i.value_repr}`",
            i.message)) + " |\n")


def write_report(opts: BackfillOptions, out: BackfillOutcome, folder: Path,
                 now: datetime) -> tuple[Path, Path]:
    """Write ``ai_training_inspection_<ts>.json`` and its ``.md`` twin; return both paths."""
    head = report_header(opts, out, now)
    stem = f"ai_training_inspection_{utc_stamp(now)}"
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    with _atomic_text(json_path) as fh:
        body = json.dumps(head, indent=2, ensure_ascii=False)
        fh.write(body[:-2])  # reopen the object to stream the two lists into it
        fh.write(',\n  "rejected_lines": ')
        _write_list(fh, out.issues("error"))
        fh.write(',\n  "conversion_notes": ')
        _write_list(fh, out.issues("warning"))
        fh.write("\n}\n")
    with _atomic_text(md_path) as fh:
        t = head["totals"]
        fh.write(f"# Backfill inspection ({head['mode']}), {head['generated_at']}\n\n")
        fh.write(f"{t['lines']} line(s) read: **{t['converted']} converted**, "
                 f"**{t['rejected']} rejected**, {t['warnings']} conversion note(s). "
                 f"trainingd {head['trainingd_version']}.\n\n## Inputs\n\n"
                 "| file | format | lines | converted | rejected | sha256 |\n"
                 "|---|---|---|---|---|---|\n")
        for f in out.files:
            fh.write(f"| {_md_cell(f.file)} | {f.format or f.error} | {f.lines} | "
                     f"{f.converted} | {f.rejected} | `{f.sha256[:16]}` |\n")
        actions = sorted(out.by_action)
        fh.write("\n## Rows by project and action\n\n| project | rows | "
                 + " | ".join(actions) + " | target | exists |\n|---|---|"
                 + "---|" * len(actions) + "---|---|\n")
        for target in head["targets"]:
            counts = out.by_project_action.get(target["project"], Counter())
            fh.write(f"| {target['project']} | {target['rows']} | "
                     + " | ".join(str(counts.get(a, 0)) for a in actions)
                     + f" | {_md_cell(target['db_file'])} | {target['exists']} |\n")
        fh.write("\n## Lines by code\n\n| code | count |\n|---|---|\n")
        for code, n in head["counts_by_code"].items():
            fh.write(f"| `{code}` | {n} |\n")
        verb = "Created" if opts.execute else "`--execute` would create"
        files = head["created"] if opts.execute else head["would_create"]
        fh.write(f"\n## {verb}\n\n" + "".join(f"- `{p}`\n" for p in files))
        if not opts.execute and out.existing_targets:
            fh.write("\n**`--execute` would refuse**: these targets exist already:\n\n"
                     + "".join(f"- `{p}`\n" for p in out.existing_targets))
        _md_issues(fh, "Rejected lines", out.issues("error", MD_ISSUE_LIMIT), out.rejected)
        _md_issues(fh, "Conversion notes", out.issues("warning", MD_ISSUE_LIMIT), t["warnings"])
        rows = out.first_rows
        fh.write(f"\n## First {len(rows)} converted rows (repr values)\n\n| file:line | "
                 + " | ".join(MD_ROW_COLUMNS) + " |\n|---|" + "---|" * len(MD_ROW_COLUMNS) + "\n")
        for r in rows:
            fh.write(f"| {_md_cell(Path(r['file']).name)}:{r['line']} | "
                     + " | ".join(f"`{_md_cell(r[c])}`" for c in MD_ROW_COLUMNS) + " |\n")
    return json_path, md_path
