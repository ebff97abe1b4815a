"""The tour printed at the end of ``trainingd demo``: what happened, where each output is, and
three commands to try next.

A new operator's first question after a demo is "so what did it do, and where is it?": this
room answers from what the daemon itself left behind (trigger results, the inspection report,
the summary JSON with its live-accuracy figures and plot, and ``status``'s read-only document
of the state DB), never from what the demo meant to do; the one exception is said as such: how
the demo got the champion whose live accuracy is shown (``champion_note``).
It writes nothing.  The commands it suggests are exact: the program as it was
invoked, the demo's own config path, and ``jq`` only where it is installed.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from daemon.settings import Settings

#: jq filter of the "try next" validate command: issue counts by code
JQ_BY_CODE = "[.issues[].code] | group_by(.) | map({(.[0]): length}) | add"


def trigger_result(folder: Path, name: str) -> tuple[str, dict[str, Any]] | None:
    """``("done" | "failed", result document)`` of the trigger dropped as ``name``, or None
    while it has no result file (the box adds a time stamp to a name already taken)."""
    for status in ("done", "failed"):
        sub = folder / status
        stamped = glob.glob(str(sub / f"{glob.escape(name)}.*.result.json"))
        paths = [sub / f"{name}.result.json", *sorted(Path(p) for p in stamped)]
        for path in paths:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, RecursionError) as exc:
                doc = {"error": f"result file unreadable: {exc}"}
            return status, doc if isinstance(doc, dict) else {}
    return None


def print_tour(settings: Settings, *, out: TextIO, elapsed: float, dropped: list[str],
               log_path: Path, config: Path, complete: bool, champion_note: str = "") -> None:
    """What happened, where each output is, and three commands to try next."""
    triggers = {name: trigger_result(settings.triggers_dir, name) for name in dropped}
    status = _status(settings)
    inspection = _result_of(triggers.get("inspect"))
    report = _load_json(inspection.get("json"))
    summary_files = _result_of(triggers.get("summary"))
    summary = _load_json(summary_files.get("json"))

    print(f"\nwhat happened ({elapsed:.0f} s{'' if complete else ', unfinished'}):", file=out)
    for line in _happened(status, report, triggers, summary, champion_note):
        print(f"  {line}", file=out)

    print("\nwhere it is:", file=out)
    for label, where in _where(settings, inspection, summary_files, summary, log_path, config):
        print(f"  {label:19} {where}", file=out)

    print("\ntry next:", file=out)
    for command, why in try_next(config, status_exit=status.get("exit_code")):
        print(f"  {command}", file=out)
        print(f"      {why}", file=out)
    out.flush()


def try_next(config: Path, *, status_exit: Any = None) -> list[tuple[str, str]]:
    """Three commands that work on the demo tree as printed, each with the exit status it ends
    with (tests run them verbatim and check it)."""
    stopped = (f"exit {status_exit}: the demo has stopped its daemon; " if
               isinstance(status_exit, int) and status_exit else "")
    prog, cfg = program(), shlex.quote(show(config))
    if shutil.which("jq"):
        by_code = f"{prog} validate --config {cfg} --json | jq -c {shlex.quote(JQ_BY_CODE)}"
    else:
        python = shlex.quote(show(Path(sys.executable)))
        by_code = f"{prog} validate --config {cfg} --json | {python} -m json.tool"
    return [
        (f"{prog} status --config {cfg}", f"{stopped}the daemon's figures per project, "
         "embeddings, models (read-only, instant)"),
        (by_code, "issues by code as JSON (validate itself exits 1 while errors exist, a "
         "verdict; the pipe ends with the last command's status)"),
        (f"{prog} inspect --config {cfg} --project legacy", "a fresh inspection report of the "
         "legacy DB: every planted fault with its row, value and what to do"),
    ]


def program() -> str:
    """The command that ran this process: ``.venv/bin/trainingd`` as typed, else
    ``python -m daemon`` with this interpreter."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "trainingd":
        return shlex.quote(show(argv0))
    return f"{shlex.quote(show(Path(sys.executable)))} -m daemon"


def show(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it (``data/demo/...``)."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# -- sections -------------------------------------------------------------------------------------

def _happened(status: dict[str, Any], report: dict[str, Any],
              triggers: dict[str, tuple[str, dict[str, Any]] | None], summary: dict[str, Any],
              champion_note: str) -> list[str]:
    lines = []
    for p in status.get("projects", []):
        lines.append(f"rows: {p.get('project')}: {p.get('rows')} in its DB, "
                     f"{p.get('validated')} validated, {p.get('errors')} error(s), "
                     f"{p.get('warnings')} warning(s)")
    issues = report.get("issues") or []
    for severity in ("error", "warning"):
        codes = Counter(str(i.get("code")) for i in issues if i.get("severity") == severity)
        if codes:
            shown = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
            lines.append(f"{severity}s by code ({sum(codes.values())}): {shown}")
    embedder = status.get("embedder_id") or "none yet"
    for project, c in (status.get("embedding_coverage") or {}).items():
        figures = ", ".join(f"{v} {k}" for k, v in c.items())
        lines.append(f"images: {project}: {figures}")
    if status.get("embedding_coverage"):
        lines.append(f"embedder: {embedder}" + (
            "  (random weights: demo only)" if "random-init" in embedder else ""))
    lines.extend(_models(triggers.get("retrain.json")))
    if champion_note:
        lines.append(f"champion: {champion_note}")
    lines.extend(live_lines(summary))
    for name, found in triggers.items():
        lines.append(f"trigger {name}: {_trigger_outcome(found)}")
    problems = status.get("problems") or []
    lines.extend(f"status problem: {p}" for p in problems)
    return lines


def _models(found: tuple[str, dict[str, Any]] | None) -> list[str]:
    if found is None:
        return ["models: no training ran (the retrain trigger has no result)"]
    result = found[1].get("result") or {}
    if "status" not in result:
        return [f"models: training failed: {result.get('error') or found[1].get('error')}"]
    kind, state = result.get("kind", "ranker"), str(result.get("status"))
    version = f" v{result['version']}" if result.get("version") is not None else ""
    verdict = ("promoted: the new champion" if result.get("promoted") else
               "not promoted" if state == "not_promoted" else state.replace("_", " "))
    metrics = result.get("metrics") or {}
    figures = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in sorted(metrics.items())
                        if isinstance(v, int | float) and not isinstance(v, bool))[:200]
    lines = [f"models: {kind}{version}: {verdict}; why: {result.get('reason') or '-'}"]
    if figures:
        lines.append(f"  holdout figures: {figures}")
    return lines


def live_lines(summary: dict[str, Any]) -> list[str]:
    """The summary's live-accuracy figures, one line per champion version (none without a
    summary)."""
    from daemon.summary.stats import fmt

    live = summary.get("live_accuracy")
    if not isinstance(live, dict):
        return []
    ranker, crop = live.get("ranker") or [], live.get("crop") or []
    if not ranker:
        return ["live accuracy: no group trainingd predicted has been reviewed yet"]
    lines = []
    for r in ranker:
        now = " (champion)" if r.get("champion") else ""
        lines.append(f"live accuracy: ranker v{r.get('version')}{now}: top-1 "
                     f"{fmt(r.get('live_top1'))} on groups reviewed after its prediction; "
                     f"highest-stage rule {fmt(r.get('rule_top1'))}; test side "
                     f"{fmt(r.get('test_top1'))}")
    for c in crop:
        now = " (champion)" if c.get("champion") else ""
        lines.append(f"live accuracy: crop v{c.get('version')}{now}: mean IoU "
                     f"{fmt(c.get('live_mean_iou'))}; test side {fmt(c.get('test_mean_iou'))}")
    return lines


def _trigger_outcome(found: tuple[str, dict[str, Any]] | None) -> str:
    if found is None:
        return "no result yet"
    state, doc = found
    error = doc.get("error") or (doc.get("result") or {}).get("error")
    if error:
        text = str(error)
        return f"{state}: {text[:120] + ' ...' if len(text) > 124 else text}"
    return state


def _where(settings: Settings, inspection: dict[str, Any], summary_files: dict[str, Any],
           summary: dict[str, Any], log_path: Path, config: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if inspection.get("markdown"):
        rows.append(("inspection report", f"{show(Path(inspection['markdown']))} "
                     f"(+ .json)"))
    else:
        rows.append(("inspection report", f"not written (in {show(settings.summaries_dir)})"))
    if summary_files.get("markdown"):
        md = Path(summary_files["markdown"])
        found = summary.get("plots")
        plots: dict[str, Any] = found if isinstance(found, dict) else {}
        rows.append(("daily summary", f"{show(md)} (+ .json)"))
        for key, name in sorted(plots.items(), key=lambda kv: str(kv[1])):
            if key != "live_accuracy":
                rows.append(("  plot", show(md.parent / str(name))))
        if plots.get("live_accuracy"):
            rows.append(("live accuracy plot", f"{show(md.parent / str(plots['live_accuracy']))}"
                         " (the summary's \"Live accuracy\" section)"))
    else:
        rows.append(("daily summary", f"not written (in {show(settings.summaries_dir)})"))
    models = sorted(settings.models_dir.glob("*")) if settings.models_dir.is_dir() else []
    rows.append(("models", f"{show(settings.models_dir)}/ ({len(models)} file(s))"))
    vectors = sum(1 for _ in settings.cache_dir.rglob("*.npy")) if settings.cache_dir.is_dir() \
        else 0
    rows.append(("embeddings", f"{show(settings.cache_dir)}/ ({vectors} .npy file(s))"))
    rows.append(("trigger results", f"{show(settings.triggers_dir / 'done')}/, "
                 f"{show(settings.triggers_dir / 'failed')}/"))
    rows.append(("daemon log", f"{show(log_path)} (JSON lines: jq -c 'select(.level != "
                 "\"info\")' shows warnings and errors)"))
    rows.append(("config", show(config)))
    return rows


def _status(settings: Settings) -> dict[str, Any]:
    from daemon.status import status_document

    try:
        doc: dict[str, Any] = status_document(settings)
    except Exception as exc:  # the tour reports; it never fails the demo
        return {"problems": [f"status unavailable: {type(exc).__name__}: {exc}"]}
    return doc


def _result_of(found: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
    if found is None:
        return {}
    result = found[1].get("result")
    return result if isinstance(result, dict) else {}


def _load_json(path: Any) -> dict[str, Any]:
    if not path:
        return {}
    try:
        doc = json.loads(Path(str(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}
