"""The daily summary: what happened to the data and the models, as JSON, Markdown and plots.

Written into ``settings.summaries_dir`` as ``daily_summary_<date>.json``, ``.md`` and five PNGs
beside them (always the same five, with "no data" drawn when a section is empty, so the set of
files is predictable).  Everything comes from the state DB and the model registry; nothing is
recomputed from the source DBs.  Tables another room owns (embeddings) may be absent: the
section then says so instead of failing.  matplotlib is imported only here, with the Agg backend.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.fsutil import atomic_write_bytes, atomic_write_text
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc
from daemon.training import policy, registry
from daemon.training.audit import audit_budget

PLOTS = ("decisions", "issues", "embedding_coverage", "model_metrics", "crop_iou_by_stage")


def _decisions(store: StateStore, since: datetime) -> dict[str, dict[str, int]]:
    """Rows validated (new or changed) since ``since``, per project and action."""
    out: dict[str, dict[str, int]] = {}
    for project, action, n in store.conn.execute(
        "SELECT project, coalesce(user_action, '(none)'), count(*) FROM row_state "
        "WHERE checked_at >= ? GROUP BY 1, 2 ORDER BY 1, 2", (iso_utc(since),)):
        out.setdefault(project, {})[action] = int(n)
    return out


def _projects(store: StateStore) -> dict[str, dict[str, int]]:
    names = [r[0] for r in store.conn.execute("SELECT DISTINCT project FROM row_state ORDER BY 1")]
    return {p: store.row_figures(p) for p in names}


def _embedding_coverage(store: StateStore) -> dict[str, Any]:
    try:
        rows = store.conn.execute(
            "SELECT f.project, count(*), sum(f.status = 'ok' AND EXISTS (SELECT 1 FROM embeddings"
            " e WHERE e.sha256 = f.sha256)), sum(f.status = 'failed') FROM embed_files f "
            "GROUP BY f.project ORDER BY f.project").fetchall()
    except sqlite3.OperationalError as exc:
        return {"available": False, "reason": f"embedding tables not present ({exc})"}
    return {"available": True, "projects": {
        p: {"files": int(n), "embedded": int(ok or 0), "failed": int(bad or 0),
            "coverage": (int(ok or 0) / int(n)) if n else None} for p, n, ok, bad in rows}}


def _model_history(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in ("ranker", "crop"):
        champion = registry.champion_version(settings.models_dir, kind)
        items = []
        for meta in registry.all_metadata(settings.models_dir, kind):
            m = meta.get("metrics") or {}
            item: dict[str, Any] = {
                "version": meta.get("version"), "created_at": meta.get("created_at"),
                "promoted": meta.get("promoted"), "champion": meta.get("version") == champion,
                "reason": meta.get("promotion_reason"), "holdout_size": meta.get("holdout_size"),
                "embedder_id": meta.get("embedder_id")}
            if kind == "ranker":
                for key, src in (("model", "model"), ("baseline", "baseline_highest_stage"),
                                 ("recorded_ai", "recorded_ai_pick")):
                    item[f"{key}_top1"] = m.get(src, {}).get("top1")
                    item[f"{key}_top1_anomaly"] = m.get(src, {}).get("top1_anomaly")
                item["baseline_copy"] = meta.get("baseline_copy")
            else:
                for key, src in (("model", "model"), ("full_frame", "baseline_full_frame"),
                                 ("mean_box", "baseline_mean_box")):
                    item[f"{key}_mean_iou"] = m.get(src, {}).get("mean_iou")
                item["by_stage"] = {
                    st: {"model": v.get("mean_iou"),
                         "full_frame": m.get("baseline_full_frame", {}).get("by_stage", {})
                         .get(st, {}).get("mean_iou"),
                         "mean_box": m.get("baseline_mean_box", {}).get("by_stage", {})
                         .get(st, {}).get("mean_iou"), "n": v.get("n")}
                    for st, v in m.get("model", {}).get("by_stage", {}).items()}
            items.append(item)
        out[kind] = items
    return out


def build_summary(settings: Settings, store: StateStore, now: datetime) -> dict[str, Any]:
    """The summary as one JSON-ready dict (pure reads)."""
    since = now - timedelta(days=1)
    retrain = {}
    for kind in policy.KINDS:
        d = policy.retrain_decision(store, settings, kind, now)
        retrain[kind] = {"due": d.due, "reason": d.reason, "new_labels": d.new_labels}
    return {
        "generated_at": iso_utc(now), "window_start": iso_utc(since),
        "new_decisions": _decisions(store, since), "projects": _projects(store),
        "issues_by_code": dict(sorted(store.issue_codes().items())),
        "embedding_coverage": _embedding_coverage(store),
        "models": _model_history(settings),
        "champions": registry.read_pointer(settings.models_dir),
        "retrain_events": policy.run_history(store, since=since),
        "retrain_policy": retrain,
        "audit": audit_budget(store, settings, now).to_dict(),
    }


def _plots(summary: dict[str, Any], stem: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {name: stem.with_name(f"{stem.name}_{name}.png") for name in PLOTS}

    def save(fig: Any, name: str) -> None:
        import io

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        atomic_write_bytes(paths[name], buf.getvalue())

    def empty(ax: Any, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    # new decisions per project and action (stacked)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    dec = summary["new_decisions"]
    if dec:
        actions = sorted({a for v in dec.values() for a in v})
        bottom = [0] * len(dec)
        for a in actions:
            vals = [dec[p].get(a, 0) for p in dec]
            ax.bar(list(dec), vals, bottom=bottom, label=a)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.legend()
        ax.set_ylabel("rows")
    else:
        empty(ax, "no new decisions in the last 24 h")
    ax.set_title("New decisions per project and action (24 h)")
    save(fig, "decisions")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    issues = summary["issues_by_code"]
    if issues:
        ax.barh(list(issues), list(issues.values()))
        ax.set_xlabel("current issues")
    else:
        empty(ax, "no issues")
    ax.set_title("Issues by code")
    save(fig, "issues")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    cov = summary["embedding_coverage"]
    if cov.get("available") and cov["projects"]:
        names = list(cov["projects"])
        ax.bar(names, [100 * (cov["projects"][p]["coverage"] or 0) for p in names])
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of image files embedded")
    else:
        empty(ax, cov.get("reason", "no image files seen yet"))
    ax.set_title("Embedding coverage")
    save(fig, "embedding_coverage")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    rk = summary["models"]["ranker"]
    if rk:
        v = [i["version"] for i in rk]
        a1.plot(v, [i["model_top1"] for i in rk], "o-", label="model top-1")
        a1.plot(v, [i["model_top1_anomaly"] for i in rk], "o-", label="model anomaly")
        a1.plot(v, [i["baseline_top1"] for i in rk], "--", label="highest stage top-1")
        a1.plot(v, [i["baseline_top1_anomaly"] for i in rk], "--", label="highest stage anomaly")
        a1.set_xlabel("version")
        a1.set_ylim(0, 1.05)
        a1.legend(fontsize=7)
    else:
        empty(a1, "no ranker trained yet")
    a1.set_title("Ranker on its holdout")
    cr = summary["models"]["crop"]
    if cr:
        v = [i["version"] for i in cr]
        a2.plot(v, [i["model_mean_iou"] for i in cr], "o-", label="model")
        a2.plot(v, [i["full_frame_mean_iou"] for i in cr], "--", label="full frame")
        a2.plot(v, [i["mean_box_mean_iou"] for i in cr], "--", label="mean box")
        a2.set_xlabel("version")
        a2.set_ylim(0, 1.05)
        a2.legend(fontsize=7)
    else:
        empty(a2, "no crop proposer trained yet")
    a2.set_title("Crop proposer mean IoU")
    save(fig, "model_metrics")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    latest = cr[-1] if cr else None
    if latest and latest["by_stage"]:
        stages = list(latest["by_stage"])
        x = list(range(len(stages)))
        for k, key in enumerate(("model", "full_frame", "mean_box")):
            ax.bar([i + 0.27 * (k - 1) for i in x],
                   [latest["by_stage"][s][key] or 0 for s in stages], width=0.27, label=key)
        ax.set_xticks(x, [f"stage {s}" for s in stages])
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"Crop IoU by stage (crop proposer v{latest['version']})")
    else:
        empty(ax, "no crop proposer trained yet")
        ax.set_title("Crop IoU by stage")
    save(fig, "crop_iou_by_stage")
    return paths


def _markdown(summary: dict[str, Any], plots: dict[str, Path]) -> str:
    def img(name: str) -> str:
        return f"![{name}]({plots[name].name})"

    lines = [f"# trainingd daily summary, {summary['generated_at'][:10]}", "",
             f"Window: {summary['window_start']} to {summary['generated_at']}.", "",
             "## New decisions", "", img("decisions"), "",
             "| project | validated | rows with errors | pending crops |", "|---|---|---|---|"]
    for p, f in summary["projects"].items():
        lines.append(f"| {p} | {f['validated']} | {f['rows_with_errors']} | "
                     f"{f['pending_crops']} |")
    lines += ["", "## Issues by code", "", img("issues"), "",
              "## Embedding coverage", "", img("embedding_coverage"), "",
              "## Models (holdout figures beside the baselines)", "", img("model_metrics"), "",
              "| kind | version | promoted | figure | baseline | reason |",
              "|---|---|---|---|---|---|"]
    for item in summary["models"]["ranker"]:
        lines.append(f"| ranker | v{item['version']} | {item['promoted']} | top-1 "
                     f"{_f(item['model_top1'])}, anomaly {_f(item['model_top1_anomaly'])} | "
                     f"{_f(item['baseline_top1'])}, anomaly {_f(item['baseline_top1_anomaly'])} "
                     f"| {item['reason']} |")
    for item in summary["models"]["crop"]:
        lines.append(f"| crop | v{item['version']} | {item['promoted']} | mean IoU "
                     f"{_f(item['model_mean_iou'])} | full frame {_f(item['full_frame_mean_iou'])}"
                     f", mean box {_f(item['mean_box_mean_iou'])} | {item['reason']} |")
    lines += ["", img("crop_iou_by_stage"), "", "## Retrain events (24 h)", ""]
    if summary["retrain_events"]:
        lines += ["| kind | started | status | version | reason |", "|---|---|---|---|---|"]
        for e in summary["retrain_events"]:
            lines.append(f"| {e['kind']} | {e['started_at']} | {e['status']} | "
                         f"{e['version'] or '-'} | {e['reason']} |")
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


def _f(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def write_daily_summary(settings: Settings, store: StateStore, now: datetime
                        ) -> tuple[Path, Path]:
    """Write the summary files for ``now``'s date; returns the JSON and Markdown paths."""
    summary = build_summary(settings, store, now)
    day = (now.astimezone(UTC) if now.tzinfo else now).date().isoformat()
    stem = settings.summaries_dir / f"daily_summary_{day}"
    plots = _plots(summary, stem)
    summary["plots"] = {k: p.name for k, p in plots.items()}
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(md_path, _markdown(summary, plots))
    return json_path, md_path
