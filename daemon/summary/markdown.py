"""The summary's Markdown page: the plots with the numbers a person acts on beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.summary.stats import fmt


def _raw(item: dict[str, Any]) -> str:
    """The crop net's raw output (what the reviewer reads) against the guarded box."""
    raw = item.get("raw_output") or {}
    share = raw.get("raw_differs_from_projected")
    if not isinstance(share, int | float):
        return ""
    return (f"; raw box differs from the projected box beyond the aspect tolerance in "
            f"{100 * share:.1f}% of {raw.get('n')} test crops")


def _random(item: dict[str, Any]) -> str:
    """Models made from random-init embedder weights say so beside their version."""
    return " (RANDOM WEIGHTS)" if item.get("embedder_random") else ""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(summary: dict[str, Any], plots: dict[str, Path]) -> str:
    def img(name: str) -> str:
        return f"![{name}]({plots[name].name})"

    late = summary.get("written_late")
    lines = [f"# trainingd daily summary, {summary['day']}", ""]
    if late:
        lines += [f"> Written late, at {summary['written_at']}, because the daemon was not "
                  f"running at {summary['window_end']}. Decisions are counted from the source "
                  "DBs' own timestamps, so they are those of that day; issues, coverage and "
                  "rows to fix are as they stand at writing time.", ""]
    lines += [f"Window: {summary['window_start']} to {summary['window_end']} (decisions are "
              "counted by the time the reviewer recorded them).", "",
              "## New decisions", "", img("decisions"), "",
              "| project | new in window | validated rows | rows with errors | rows with "
              "warnings | pending crops |", "|---|---|---|---|---|---|"]
    names = sorted(set(summary["projects"]) | set(summary["new_decisions"]))
    for p in names:
        f = summary["projects"].get(p, {})
        new = sum(summary["new_decisions"].get(p, {}).values())
        lines.append(f"| {_cell(p)} | {new} | {f.get('validated', 0)} | "
                     f"{f.get('rows_with_errors', 0)} | {f.get('rows_with_warnings', 0)} | "
                     f"{f.get('pending_crops', 0)} |")
    for p, n in summary["decision_notes"]["unparseable"].items():
        lines.append(f"\n{n} row(s) of {_cell(p)} have a timestamp that cannot be parsed and "
                     "are not counted (see `timestamp_unparseable` below).")
    for p, why in summary["decision_notes"]["unreadable"].items():
        lines.append(f"\n{_cell(p)}: the source DB could not be read now ({_cell(why)}).")
    t = summary["issues"]["totals"]
    lines += ["", "## Issues", "", f"{t.get('error', 0)} errors and {t.get('warning', 0)} "
              "warnings are open now.", "", img("issues"), "",
              "## Top rows to fix", ""]
    fix = summary["rows_to_fix"]
    if fix["rows"]:
        lines += [f"The {len(fix['rows'])} rows with the most to fix, of "
                  f"{fix['rows_with_issues']} rows with issues (errors first):", "",
                  "| # | project | group_id | rowid | code | errors / warnings | what to do |",
                  "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(fix["rows"], 1):
            codes = r["code"] + (f" (+{len(r['codes']) - 1} more)" if len(r["codes"]) > 1
                                 else "")
            lines.append(f"| {i} | {_cell(r['project'])} | `{_cell(r['group_id'])}` | "
                         f"{r['rowid']} | `{codes}` | {r['errors']} / {r['warnings']} | "
                         f"{_cell(r['what_to_do'])} |")
    else:
        lines.append("No row has an open issue.")
    lines += ["", "## Embedding coverage", "", img("embedding_coverage"), ""]
    cov = summary["embedding_coverage"]
    if cov.get("available") and cov.get("projects"):
        lines += ["| project | embedded | failed | waiting | lost before embedding | coverage |",
                  "|---|---|---|---|---|---|"]
        for p, f in cov["projects"].items():
            c = "-" if f["coverage"] is None else f"{100 * f['coverage']:.1f}%"
            lines.append(f"| {_cell(p)} | {f['embedded']} | {f['failed']} | {f['waiting']} | "
                         f"{f['lost']} | {c} |")
    lines += ["", "## Models (holdout figures beside the baselines)", "",
              "Each figure: value [95% interval] n. Top-1 shares use the Wilson score interval; "
              "mean IoU a t-interval from the per-crop standard deviation (`t-bound`: the "
              "widest spread values in [0, 1] with that mean can have, for models that did not "
              "record it).", "", img("model_metrics"), "",
              "| kind | version | champion | promoted | train / holdout | figure | baselines | "
              "reason |", "|---|---|---|---|---|---|---|---|"]
    for item in summary["models"]["ranker"]:
        lines.append(
            f"| ranker | v{item['version']}{_random(item)} | "
            f"{'yes' if item['champion'] else ''} | "
            f"{item['promoted']} | {item['train_size']} / {item['holdout_size']} | top-1 "
            f"{fmt(item['model_top1'])}; anomaly {fmt(item['model_top1_anomaly'])} | highest "
            f"stage {fmt(item['baseline_top1'])}; anomaly "
            f"{fmt(item['baseline_top1_anomaly'])} | {_cell(item['reason'])} |")
    for item in summary["models"]["crop"]:
        lines.append(
            f"| crop | v{item['version']}{_random(item)} | "
            f"{'yes' if item['champion'] else ''} | "
            f"{item['promoted']} | {item['train_size']} / {item['holdout_size']} | mean IoU "
            f"{fmt(item['model_mean_iou'])} ({item['model_mean_iou']['method']}) | full frame "
            f"{fmt(item['full_frame_mean_iou'])}; mean box {fmt(item['mean_box_mean_iou'])} | "
            f"{_cell(item['reason'])}{_raw(item)} |")
    lines += ["", img("crop_iou_by_stage"), "", "## Recent crops", "", img("crop_panels"), ""]
    for p in summary["crop_panels"]:
        where = p["image_path"] or f"not drawn: {p['note']}"
        lines.append(f"- {_cell(p['project'])} `{_cell(p['group_id'])}` ({p['timestamp']}): "
                     f"{_cell(where)}; model box from {p['model_box_from'] or 'nowhere'}")
    if "live_accuracy" in summary:
        from daemon.summary.live import render as render_live

        lines += ["", *render_live(summary["live_accuracy"], img("live_accuracy"))]
    lines += ["", "## Trend", "", img("trend"), ""]
    lines += [f"- {_cell(n)}" for n in summary["trend"]["notes"]]
    lines += ["", "## Retrain events (this window)", ""]
    if summary["retrain_events"]:
        lines += ["| kind | started | status | version | reason |", "|---|---|---|---|---|"]
        for e in summary["retrain_events"]:
            lines.append(f"| {e['kind']} | {e['started_at']} | {e['status']} | "
                         f"{e['version'] or '-'} | {_cell(e['reason'])} |")
    else:
        lines.append("No training ran.")
    lines += [""] + [f"- {k}: {'due' if v['due'] else 'not due'} ({v['reason']})"
                     for k, v in summary["retrain_policy"].items()]
    a = summary["audit"]
    state = "paused until tomorrow" if a["paused"] else ("at the soft limit" if a["warning"]
                                                         else "within budget")
    lines += ["", "## Audit tokens", "",
              f"{a['tokens_used']} of {a['soft_limit']} tokens today in {a['calls']} calls: "
              f"{state}" + ("" if a["enabled"] else " (no audit hook configured)") + ".", ""]
    return "\n".join(lines)
