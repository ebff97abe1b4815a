"""Drop-in trigger files: an operator (or a script) drops ``data/triggers/<action>[.json]``.

A file is claimed atomically (renamed into ``processing/``; a second claimer gets ENOENT), its
optional body is parsed as a JSON object of arguments and checked against the action's schema,
and the resulting task runs in the worker.  Afterwards the file moves to ``done/`` or ``failed/``
with ``<name>.result.json`` beside it.  Unknown names, bad JSON, unknown or mistyped arguments,
unknown projects and paths outside the configured data roots go straight to ``failed/`` with the
reason.  Nothing in a trigger is ever executed as code or shell: arguments are data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.fsutil import atomic_write_text
from daemon.timeparse import iso_utc
from daemon.workqueue import Task

log = structlog.get_logger("triggers")

MAX_BODY_BYTES = 64 * 1024

#: action -> {argument: (type, is_path)}
ACTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    "validate": {"project": (str, False), "full": (bool, False)},
    "reconcile": {},
    "inspect": {"project": (str, False)},
    "summary": {},
    "embed": {"project": (str, False), "limit": (int, False)},
    "retrain": {"model": (str, False), "force": (bool, False)},
    "backfill": {"csv": (list, True), "project": (str, False), "project_from": (str, False),
                 "window": (list, False), "image_root": (list, True), "out": (str, True),
                 "execute": (bool, False)},
    "pause": {},
    "resume": {},
}
MODELS = ("ranker", "crop")


@dataclass(frozen=True, slots=True)
class Rejection:
    path: Path
    reason: str


def _inside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def parse_trigger(name: str, body: bytes, *, projects: set[str], roots: list[Path]
                  ) -> tuple[str, dict[str, Any]]:
    """``(action, args)`` or ValueError with the reason a person can act on."""
    action = name.split(".", 1)[0]
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))}")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body is {len(body)} bytes; at most {MAX_BODY_BYTES}")
    text = body.decode("utf-8", errors="strict").strip() if body else ""
    args: Any = {}
    if text:
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError(f"body must be a JSON object, got {type(args).__name__}")
    schema = ACTIONS[action]
    for key, value in args.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise ValueError(f"unknown argument {key!r} for {action} (allowed: {allowed})")
        kind, is_path = schema[key]
        if kind is int and (type(value) is not int or value < 0):
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        if kind is not int and not isinstance(value, kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {value!r}")
        if kind is list and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of strings, got {value!r}")
        if is_path:
            for item in (value if isinstance(value, list) else [value]):
                if not Path(item).is_absolute() or not _inside(Path(item), roots):
                    raise ValueError(f"{key} = {item!r} is outside the configured data roots "
                                     f"({', '.join(str(r) for r in roots)})")
    if "project" in args and args["project"] not in projects and action != "backfill":
        raise ValueError(f"unknown project {args['project']!r}; known: "
                         f"{', '.join(sorted(projects)) or 'none'}")
    if action == "retrain" and args.get("model", "ranker") not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {args.get('model')!r}")
    return action, args


class TriggerBox:
    """The triggers folder with its ``processing/``, ``done/`` and ``failed/`` subfolders."""

    def __init__(self, folder: Path, *, roots: Callable[[], list[Path]],
                 projects: Callable[[], set[str]]) -> None:
        self.folder = folder
        self.processing = folder / "processing"
        self.done = folder / "done"
        self.failed = folder / "failed"
        self.roots = roots
        self.projects = projects
        for sub in (self.processing, self.done, self.failed):
            sub.mkdir(parents=True, exist_ok=True)

    def claim(self, now: datetime | None = None) -> list[Task]:
        """Claim every trigger file waiting in the folder, plus any left in ``processing/`` by
        a crash (at-least-once); return their tasks.  Rejected ones are finished at once."""
        tasks: list[Task] = []
        for entry in sorted(self.processing.iterdir()):
            if entry.is_file() and not entry.name.endswith(".result.json"):
                tasks.extend(self._task_for(entry))
        for entry in sorted(self.folder.iterdir()):
            if not entry.is_file() or entry.name.startswith(".") or entry.name.endswith(
                    (".tmp", ".part", "~")):
                continue
            claimed = _unique(self.processing / entry.name)
            try:
                os.rename(entry, claimed)  # atomic: exactly one claimer wins
            except FileNotFoundError:
                continue
            log.info("triggers.claimed", trigger=entry.name)
            tasks.extend(self._task_for(claimed))
        return tasks

    def _task_for(self, claimed: Path) -> list[Task]:
        try:
            body = claimed.read_bytes()[: MAX_BODY_BYTES + 1]
            action, args = parse_trigger(claimed.name, body, projects=self.projects(),
                                         roots=self.roots())
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            self.finish(claimed, ok=False, result={"error": str(exc)})
            return []
        project = args.get("project") if action != "backfill" else None
        return [Task(action, project, args=tuple(sorted(args.items(), key=lambda kv: kv[0])),
                     trigger=str(claimed), urgent=True)]

    def finish(self, claimed: Path, *, ok: bool, result: dict[str, Any]) -> Path:
        dest = _unique((self.done if ok else self.failed) / claimed.name)
        try:
            os.replace(claimed, dest)
        except FileNotFoundError:
            dest = dest.with_name(claimed.name)
        doc = {"trigger": claimed.name, "status": "done" if ok else "failed",
               "finished_at": iso_utc(datetime.now(UTC)), **result}
        atomic_write_text(dest.with_name(dest.name + ".result.json"),
                          json.dumps(doc, indent=2, default=str) + "\n")
        log.info("triggers.finished", trigger=claimed.name, status=doc["status"],
                 reason=result.get("error"))
        return dest


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return path.with_name(f"{path.name}.{stamp}")
