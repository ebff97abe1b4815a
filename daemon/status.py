"""``trainingd status``: what the daemon is doing, read from its heartbeat and the data folder.

Exists so an operator (or a monitor) on the GPU box sees in one command whether the daemon is
alive, the model it loaded (device, memory, precision, loading state), the embedding backlog
with an ETA, the champions and what the reviewer has, disk use and the last event in words;
and so that a monitor can trust the exit status (LSB ``status`` conventions, the table in
Documents/OPERATIONS.md)::

    0  running: the heartbeat is fresh and its process alive (paused counts as running)
    1  dead or hung: the process is gone without a clean stop, its heartbeat is stale, or it
       declared a stall (LSB "program is dead and the pid file exists"): alert
    3  not running: stopped cleanly, or never started here (no heartbeat)
    4  unknown: the heartbeat cannot be read, or the daemon runs but something status needs
       (the state DB) cannot be read; the reason is on stderr

Read-only: it creates, changes and leaves no file, never imports torch (the daemon writes the
device facts into its heartbeat), and whatever it cannot read is named in ``problems``
instead of ending the command.  ``--json`` keys keep their meaning; new ones are added.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.errors import StoreError
from daemon.settings import Settings
from daemon.status_facts import ChampionFacts, DiskUse, ReviewerFile, ReviewerFiles
from daemon.store.db import StateStore
from daemon.validation import discover_projects

EXIT_RUNNING = 0
EXIT_DEAD = 1
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4
#: heartbeat health -> exit status
_EXIT_BY_HEALTH = {"running": EXIT_RUNNING, "dead": EXIT_DEAD, "stale": EXIT_DEAD,
                   "stalled": EXIT_DEAD, "stopped": EXIT_NOT_RUNNING,
                   "not_started": EXIT_NOT_RUNNING, "unknown": EXIT_UNKNOWN}
#: task kind -> what happened, in words ("{p}": the project)
_EVENT_WORDS = {
    "validate": "decision DB {p} changed", "sidecar": ".decision sidecar(s) of {p} changed",
    "image": "image file(s) of {p} changed", "scan": "a folder under the image roots of {p} "
    "changed", "triggers": "a trigger file arrived", "reconcile": "full rescan due",
    "summary": "daily summary due", "retrain_check": "retrain check due",
    "embed": "images of {p} queued for embedding", "audit": "audit of flagged rows due",
}


def exit_code(health: str, problems: Sequence[str]) -> int:
    """The table in the module docstring, from a :func:`status_document`'s health word and
    problems (a problem only matters while the daemon runs)."""
    code = _EXIT_BY_HEALTH.get(health, EXIT_UNKNOWN)
    return EXIT_UNKNOWN if code == EXIT_RUNNING and problems else code


def status_document(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Per-project figures from the state DB (read-only) plus projects not yet validated, the
    daemon's heartbeat, model, backlog, champions, reviewer files, disk use and last event."""
    from daemon.heartbeat import read_heartbeat

    now = now or datetime.now(UTC)
    state = _StateFacts()
    problems: list[str] = []
    try:
        state = _state_facts(settings, now)
    except StoreError as exc:
        problems.append(f"state DB unreadable: {exc}")
    projects, known = list(state.projects), {p["project"] for p in state.projects}
    try:
        sources = discover_projects(settings)
    except OSError as exc:
        sources = []
        problems.append(f"decisions folder unreadable: {exc}")
    for src in sources:
        if src.project not in known:
            projects.append({"project": src.project, "db_file": str(src.db_path),
                             "schema": None, "rows": None, "validated": 0, "errors": None,
                             "warnings": None, "pending_crops": None, "last_check": None})
    beat = read_heartbeat(settings)
    health = "not_started" if beat is None else str(beat.get("health", "unknown"))
    doc = {"daemon": beat, "state_db": str(settings.state_db),
            "decisions_dir": str(settings.decisions_dir), "projects": projects,
            "embedder_id": state.embedder, "embedding_coverage": state.embedding,
            "audit_tokens": state.audit, "problems": problems,
            # added in issue 10; the keys above keep their meaning
            "health": health, "exit_code": None,
            "model": beat.get("model") if beat else None,
            "backlog": _backlog(state.backlog, beat, health),
            "champions": {k: c and c.to_dict() for k, c in champions(settings.models_dir)
                          .items()},
            "reviewer": reviewer_files(settings.models_dir).to_dict(),
            "disk": {"cache": disk_use(settings.cache_dir).to_dict(),
                     "models": disk_use(settings.models_dir).to_dict()},
            "last_event": last_event(beat, now)}
    doc["exit_code"] = exit_code(health, problems)
    return doc


@dataclass(frozen=True, slots=True)
class _StateFacts:
    """What status reads from the state DB (all empty when there is none yet)."""

    projects: tuple[dict[str, Any], ...] = ()
    embedding: dict[str, dict[str, int]] = field(default_factory=dict)
    embedder: str | None = None
    audit: dict[str, Any] | None = None
    backlog: dict[str, int] = field(default_factory=dict)


def _state_facts(settings: Settings, now: datetime) -> _StateFacts:
    from daemon.embedding.cli import coverage
    from daemon.training.audit import audit_budget

    if not settings.state_db.is_file():
        return _StateFacts()
    store = StateStore(settings.state_db, read_only=True)
    try:
        embedder = store.get_meta("embedding.embedder_id")
        projects = []
        for cp in store.checkpoints():
            counts = store.issue_counts(cp.project)
            projects.append({
                "project": cp.project, "db_file": cp.db_path, "schema": cp.schema_kind,
                "rows": cp.row_count, **store.row_figures(cp.project),
                "errors": counts.get("error", 0), "warnings": counts.get("warning", 0),
                "last_check": cp.last_checked_at, "last_full_reconcile": cp.last_full_at,
            })
        return _StateFacts(tuple(projects), coverage(store, settings), embedder,
                           audit_budget(store, settings, now).to_dict(),
                           images_waiting(store, embedder))
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"state DB {settings.state_db}: {exc}") from exc
    finally:
        store.close()


def images_waiting(store: StateStore, embedder_id: str | None) -> dict[str, int]:
    """Per project: images on disk with neither a vector of ``embedder_id`` nor a failure."""
    try:
        return store.embeddings.backlog(embedder_id)
    except sqlite3.OperationalError:  # a state DB from before the images merge (0005)
        return {}


def _backlog(by_project: dict[str, int], beat: dict[str, Any] | None, health: str
             ) -> dict[str, Any]:
    rate = (beat or {}).get("embedding_rate") or {}
    per_second = rate.get("images_per_second") if health == "running" else None
    waiting = sum(by_project.values())
    eta = (round(waiting / per_second, 1) if waiting and isinstance(per_second, int | float)
           and per_second > 0 else (0.0 if not waiting else None))
    return {"images_waiting": waiting, "by_project": dict(sorted(by_project.items())),
            "images_per_second": per_second, "eta_seconds": eta}


def champions(models_dir: Path) -> dict[str, ChampionFacts | None]:
    """Per kind: the promoted version, its figure on the holdout, n, and when it was trained."""
    from daemon.training import registry

    out: dict[str, ChampionFacts | None] = {}
    pointer = registry.read_pointer(models_dir)
    for kind in ("ranker", "crop"):
        version = registry.champion_version(models_dir, kind)
        if version is None:
            out[kind] = None
            continue
        meta = registry.read_metadata(models_dir, kind, version) or {}
        metric = "top1" if kind == "ranker" else "mean_iou"
        model = (meta.get("metrics") or {}).get("model") or {}
        entry = pointer.get(kind)
        out[kind] = ChampionFacts(version, metric, model.get(metric), meta.get("holdout_size"),
                                  meta.get("created_at"), entry.promoted_at if entry else None,
                                  entry.file if entry else None)
    return out


def reviewer_files(models_dir: Path) -> ReviewerFiles:
    """The champion files exported for the reviewer: name, size, mtime, version."""
    import json

    from daemon.training.registry import REVIEWER_DIR

    folder = models_dir / REVIEWER_DIR
    files: list[ReviewerFile] = []
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        entries = []
    for path in entries:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        version = None
        meta = path.with_name(path.stem + "_metadata.json") if path.suffix == ".pt" else path
        if meta.name.endswith("_metadata.json"):
            try:
                version = json.loads(meta.read_text(encoding="utf-8")).get("version")
            except (OSError, ValueError, AttributeError, RecursionError):
                version = None
        files.append(ReviewerFile(path.name, st.st_size, version,
                                  datetime.fromtimestamp(st.st_mtime, UTC).isoformat()))
    return ReviewerFiles(str(folder), tuple(files))


def disk_use(folder: Path) -> DiskUse:
    """Bytes and files under ``folder`` (links not followed)."""
    total = count = 0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                            count += 1
                    except OSError:
                        continue
        except OSError:
            continue
    return DiskUse(str(folder), total, count, human_bytes(total))


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def describe_event(kind: str, project: str | None) -> str:
    words = _EVENT_WORDS.get(kind, kind + " task" + (" for {p}" if project else ""))
    return words.format(p=project or "all projects")


def last_event(beat: dict[str, Any] | None, now: datetime) -> dict[str, Any] | None:
    """The heartbeat's ``kind:project`` in words, with its age."""
    raw = (beat or {}).get("last_event")
    if not isinstance(raw, str) or not raw:
        return None
    kind, _, project = raw.partition(":")
    age: float | None = None
    try:
        at = datetime.fromisoformat(str((beat or {}).get("last_event_at")))
        age = round(max(0.0, (now - at).total_seconds()), 1)
    except (TypeError, ValueError):
        pass
    text = describe_event(kind, None if project in ("", "-") else project)
    if age is not None:
        text += f" {human_seconds(age)} ago"
    return {"text": text, "kind": kind, "project": None if project in ("", "-") else project,
            "at": (beat or {}).get("last_event_at"), "age_seconds": age}


# -- the text form ------------------------------------------------------------------------------


def print_status(settings: Settings) -> int:
    doc = status_document(settings)
    code = exit_code(doc["health"], doc["problems"])
    beat = doc["daemon"]
    event = doc["last_event"]["text"] if doc["last_event"] else "none yet"
    if beat is None:
        print("daemon: not running (no heartbeat file)")
    elif beat.get("pid") is None:
        print(f"daemon: {beat['verdict']}")
    else:  # .get: a heartbeat of another version may lack a key; status must still answer
        print(f"daemon: {beat['verdict']} (pid {beat['pid']}, heartbeat {beat.get('age_seconds')}"
              f" s ago, queue {beat.get('queue_depth')}, working: "
              f"{beat.get('current_task') or 'idle'}, tasks done {beat.get('tasks_done')}, "
              f"failed {beat.get('tasks_failed')})")
        print(f"last event: {event}")
        if beat.get("embedding_disabled"):
            print(f"embedding: DISABLED: {beat['embedding_disabled']}")
    for line in _model_lines(doc):
        print(line)
    print(f"state: {doc['state_db']}")
    print(f"decisions: {doc['decisions_dir']}")
    _print_projects(doc)
    if doc["embedding_coverage"]:
        embedder = doc["embedder_id"] or "none yet"
        warn = "  (RANDOM WEIGHTS: demo/test only)" if "random-init" in embedder else ""
        print(f"embeddings by {embedder}{warn} (images seen / embedded / failed):")
        for project, c in doc["embedding_coverage"].items():
            print(f"  {project}: {c.get('seen', 0)} / {c.get('embedded', 0)} / "
                  f"{c.get('failed', 0)}")
    for line in _work_lines(doc):
        print(line)
    audit = doc["audit_tokens"]
    if audit and audit["enabled"]:
        state = "PAUSED until tomorrow" if audit["paused"] else (
            "WARNING: at the soft limit" if audit["warning"] else "ok")
        print(f"audit tokens today: {audit['tokens_used']} / {audit['soft_limit']} "
              f"({audit['calls']} calls): {state}")
    for problem in doc["problems"]:
        print(f"trainingd: {problem}", file=sys.stderr)
    return code


def _model_lines(doc: dict[str, Any]) -> list[str]:
    model = doc["model"]
    if not model:
        return []
    state = model.get("state")
    if state == "loading":
        head = f"model: loading since {model.get('since')}"
    elif state == "loaded":
        head = (f"model: loaded in {model.get('load_seconds')} s at {model.get('since')} "
                f"({model.get('embedder_id')})")
    elif state == "failed":
        head = f"model: failed at {model.get('since')}: {model.get('error')}"
    else:
        head = "model: not loaded (loaded when the first images are to be embedded)"
    lines = [head]
    if model.get("device"):
        lines.append(
            f"device: {model['device']} ({model.get('device_name') or 'unknown'}), precision "
            f"{model.get('precision') or '?'}, memory {human_bytes(model.get('memory_used_bytes'))}"
            f" used of {human_bytes(model.get('memory_total_bytes'))} (trainingd: "
            f"{human_bytes(model.get('memory_process_bytes'))})")
    return lines


def _print_projects(doc: dict[str, Any]) -> None:
    header = ("project", "rows", "validated", "errors", "warnings", "pending crops", "last check")
    rows = [header] + [
        tuple("-" if p.get(k) is None else str(p.get(k)) for k in
              ("project", "rows", "validated", "errors", "warnings", "pending_crops",
               "last_check"))
        for p in doc["projects"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if not doc["projects"]:
        print("no projects yet: put decision DBs in the decisions folder, then run "
              "`trainingd validate`")


def _work_lines(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    backlog = doc["backlog"]
    rate = backlog["images_per_second"]
    eta = backlog["eta_seconds"]
    tail = (f"; {rate} img/s recently, ETA {human_seconds(eta)}" if rate and eta is not None
            else "; no recent rate (ETA unknown)" if backlog["images_waiting"] else "")
    lines.append(f"embedding backlog: {backlog['images_waiting']} image(s) waiting{tail}")
    lines.append("champions:")
    for kind, champ in doc["champions"].items():
        if champ is None:
            lines.append(f"  {kind}: none yet")
            continue
        figure = champ["figure"]
        shown = f"{figure:.4f}" if isinstance(figure, int | float) else "?"
        lines.append(f"  {kind}: v{champ['version']} {champ['metric']} {shown} on n = "
                     f"{champ['n']} holdout, trained {champ['trained_at']}, promoted "
                     f"{champ['promoted_at']}")
    reviewer = doc["reviewer"]
    files = ", ".join(f"{f['name']} (v{f['version'] if f['version'] is not None else '?'}, "
                      f"{human_bytes(f['bytes'])}, {f['mtime'][:19]})" for f in reviewer["files"])
    lines.append(f"reviewer has ({reviewer['folder']}): {files or 'nothing yet'}")
    disk = doc["disk"]
    lines.append(f"disk: cache {disk['cache']['human']} ({disk['cache']['files']} files), "
                 f"models {disk['models']['human']} ({disk['models']['files']} files)")
    return lines
