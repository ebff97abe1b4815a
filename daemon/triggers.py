"""Drop-in trigger files: an operator (or a script) drops ``data/triggers/<action>[.json]``.

A file is claimed atomically (renamed into ``processing/``; a second claimer gets ENOENT), its
optional body is parsed as a JSON object of arguments and checked against the action's schema,
and the resulting task runs in the worker.  Afterwards the file moves to ``done/`` or ``failed/``
with ``<name>.result.json`` beside it.  Nothing in a trigger is ever executed as code or shell:
arguments are data.

The triggers folder is an input anyone with write access can fill, and the fast lane claims
from it, so this room must never raise and never block:

- only exact names are actions (``retrain`` or ``retrain.json``; ``retrain.json.orig`` is not);
- only regular files are opened, with ``O_NOFOLLOW | O_NONBLOCK`` and an ``fstat`` check, so a
  symlink is never followed (its target's keys cannot leak into a result) and a FIFO never
  blocks; symlinks, FIFOs, sockets and devices go to ``failed/`` (the rename moves the link
  itself), folders are reported once and left alone;
- the size is checked with ``fstat`` before reading, and at most the cap is read;
- any exception while parsing (deep JSON raises ``RecursionError``, a 4,301-digit number
  ``ValueError``) is a failed trigger with its reason;
- a result file that cannot be written (disk full, read-only folder) is logged and retried with
  backoff on later :meth:`TriggerBox.claim` calls; the trigger stays in ``processing/`` until its
  result is in place, and the atomic writer never leaves half a result under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from daemon.fsutil import atomic_write_text
from daemon.tasks import TaskKind
from daemon.timeparse import iso_utc
from daemon.workqueue import Task

log = structlog.get_logger("triggers")

MAX_BODY_BYTES = 64 * 1024
#: first retry of a result that could not be written, doubled per failure up to the maximum
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 300.0

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
    "predict": {"project": (str, False), "bulk": (bool, False)},
}
MODELS = ("ranker", "crop")
#: action -> the kind of task it becomes (one place: tests/test_lanes.py checks every action)
TASK_OF_ACTION: dict[str, TaskKind] = {
    "validate": TaskKind.VALIDATE, "reconcile": TaskKind.RECONCILE, "inspect": TaskKind.INSPECT,
    "summary": TaskKind.SUMMARY, "embed": TaskKind.EMBED, "retrain": TaskKind.RETRAIN,
    "backfill": TaskKind.BACKFILL, "pause": TaskKind.PAUSE, "resume": TaskKind.RESUME,
    "predict": TaskKind.PREDICT,
}
#: the suffix :func:`_unique` adds when a name is taken; stripped to find the dropped name
_UNIQUE_SUFFIX = re.compile(r"\.\d{8}T\d{12}\Z")

ResultWriter = Callable[[Path, str], None]


@dataclass(frozen=True, slots=True)
class Rejection:
    path: Path
    reason: str


def action_of(name: str) -> str | None:
    """The action a trigger file name asks for: exactly ``<action>`` or ``<action>.json``."""
    base = name[: -len(".json")] if name.endswith(".json") else name
    return base if base in ACTIONS else None


def _accepted_forms() -> str:
    return ("a trigger file is named exactly '<action>' or '<action>.json', with <action> one "
            f"of: {', '.join(sorted(ACTIONS))}")


def _inside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("body nests arrays or objects too deeply to parse; a trigger body is "
                         "a flat JSON object of arguments") from None
    except ValueError as exc:  # JSONDecodeError, and a number of more than 4,300 digits
        raise ValueError(f"body is not valid JSON: {str(exc)[:300]}") from None


def parse_trigger(name: str, body: bytes, *, projects: set[str], roots: list[Path]
                  ) -> tuple[str, dict[str, Any]]:
    """``(action, args)`` or ValueError with the reason a person can act on."""
    action = action_of(name)
    if action is None:
        raise ValueError(f"unknown action {name!r}: {_accepted_forms()}")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body is {len(body)} bytes; at most {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8", errors="strict").strip() if body else ""
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not UTF-8 text: {exc}") from None
    args: Any = _load_json(text) if text else {}
    if not isinstance(args, dict):
        raise ValueError(f"body must be a JSON object, got {type(args).__name__}")
    schema = ACTIONS[action]
    for key, value in args.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise ValueError(f"unknown argument {key!r} for {action} (allowed: {allowed})")
        kind, is_path = schema[key]
        if kind is int and (type(value) is not int or value < 0):
            raise ValueError(f"{key} must be a non-negative integer, got {_short(value)}")
        if kind is not int and not isinstance(value, kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {_short(value)}")
        if kind is list and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of strings, got {_short(value)}")
        if is_path:
            for item in (value if isinstance(value, list) else [value]):
                if "\x00" in item:
                    raise ValueError(f"{key} = {_short(item)} holds a NUL byte")
                if not Path(item).is_absolute() or not _inside(Path(item), roots):
                    raise ValueError(f"{key} = {item!r} is outside the configured data roots "
                                     f"({', '.join(str(r) for r in roots)})")
    if "project" in args and args["project"] not in projects and action != "backfill":
        raise ValueError(f"unknown project {args['project']!r}; known: "
                         f"{', '.join(sorted(projects)) or 'none'}")
    if action == "retrain" and args.get("model", "ranker") not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {args.get('model')!r}")
    return action, args


def _short(value: Any, limit: int = 200) -> str:
    """``repr`` cut to ``limit`` characters: a reason must stay readable whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(slots=True)
class _PendingResult:
    """A finished trigger whose result file (or final move) could not be written yet."""

    claimed: Path
    dest: Path
    text: str
    status: str
    written: bool = False
    attempts: int = 0
    next_at: datetime | None = None


class TriggerBox:
    """The triggers folder with its ``processing/``, ``done/`` and ``failed/`` subfolders.

    :meth:`claim` and :meth:`finish` never raise: the worker calls them in its loop, and one bad
    file or a full disk must not stop it.  ``write_result`` is the seam for the result writer
    (atomic by default); ``clock`` gives ``finished_at`` and the retry schedule.
    """

    def __init__(self, folder: Path, *, roots: Callable[[], list[Path]],
                 projects: Callable[[], set[str]],
                 write_result: ResultWriter = atomic_write_text,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.folder = folder
        self.processing = folder / "processing"
        self.done = folder / "done"
        self.failed = folder / "failed"
        self.roots = roots
        self.projects = projects
        self.write_result = write_result
        self.clock = clock
        #: claimed paths handed out as tasks and not finished yet: never handed out twice
        self._inflight: set[Path] = set()
        self._pending: dict[Path, _PendingResult] = {}
        #: (folder, name, inode) of entries already reported and left where they are
        self._reported: set[tuple[str, str, int]] = set()
        self._ensure_folders()

    def _ensure_folders(self) -> bool:
        try:
            for sub in (self.processing, self.done, self.failed):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("triggers.folder_unusable", folder=str(self.folder), error=str(exc))
            return False
        return True

    @property
    def pending_results(self) -> list[Path]:
        """Claimed triggers whose result is still waiting to be written (for status, tests)."""
        return sorted(self._pending)

    def results_due(self, now: datetime | None = None) -> bool:
        """Whether a result that could not be written before is due for another try: the
        service then queues a claim, so the retry does not wait for the next dropped trigger."""
        at = now or self.clock()
        return any(p.next_at is None or p.next_at <= at for p in list(self._pending.values()))

    # -- claiming -------------------------------------------------------------------------------

    def claim(self, now: datetime | None = None) -> list[Task]:
        """Claim every trigger file waiting in the folder, plus any left in ``processing/`` by
        a crash (at-least-once); return their tasks.  Rejected ones are finished at once, and
        results that could not be written before are retried when due.  Never raises."""
        tasks: list[Task] = []
        try:
            self._retry_pending(now or self.clock())
            if not self._ensure_folders():
                return tasks
            for entry in self._entries(self.processing):
                if entry.name.endswith(".result.json"):
                    continue
                claimed = self.processing / entry.name
                if claimed in self._inflight or claimed in self._pending:
                    continue
                if self._is_folder(entry):
                    continue
                tasks.extend(self._task_for(claimed, _dropped_name(entry.name)))
            skip = {self.processing.name, self.done.name, self.failed.name}
            for entry in self._entries(self.folder):
                name = entry.name
                if name in skip or name.startswith(".") or name.endswith((".tmp", ".part", "~")):
                    continue  # our subfolders; writers' temp files, renamed when complete
                if self._is_folder(entry):
                    continue
                claimed = _unique(self.processing / name)
                try:
                    os.rename(self.folder / name, claimed)  # atomic: exactly one claimer wins
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._report_once(entry, "triggers.claim_failed", error=str(exc))
                    continue
                log.info("triggers.claimed", trigger=name)
                tasks.extend(self._task_for(claimed, name))
        except Exception:
            log.exception("triggers.claim_failed", folder=str(self.folder))
        return tasks

    def _entries(self, folder: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("triggers.scan_failed", folder=str(folder), error=str(exc))
            return []

    def _is_folder(self, entry: os.DirEntry[str]) -> bool:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            return False
        if is_dir:
            self._report_once(entry, "triggers.folder_ignored",
                              reason="a folder is not a trigger; it is left where it is and not "
                                     "looked into: remove it or drop a file instead")
        return is_dir

    def _report_once(self, entry: os.DirEntry[str], event: str, **facts: Any) -> None:
        try:
            inode = entry.inode()
        except OSError:
            inode = -1
        key = (str(Path(entry.path).parent), entry.name, inode)
        if key not in self._reported:
            self._reported.add(key)
            log.warning(event, trigger=entry.name, path=entry.path, **facts)

    def _task_for(self, claimed: Path, dropped: str) -> list[Task]:
        try:
            body = _read_regular(claimed)
            action, args = parse_trigger(dropped, body, projects=self.projects(),
                                         roots=self.roots())
        except Exception as exc:  # whatever the file does, it is a failed trigger, not a crash
            reason = str(exc) if isinstance(exc, ValueError | OSError) else (
                f"{type(exc).__name__}: {exc}")
            log.warning("triggers.rejected", trigger=claimed.name, reason=reason[:500])
            self.finish(claimed, ok=False, result={"error": reason})
            return []
        self._inflight.add(claimed)
        project = args.get("project") if action != "backfill" else None
        return [Task(TASK_OF_ACTION[action], project,
                     args=tuple(sorted(args.items(), key=lambda kv: kv[0])),
                     trigger=str(claimed), urgent=True)]

    # -- finishing ------------------------------------------------------------------------------

    def finish(self, claimed: Path, *, ok: bool, result: dict[str, Any]) -> Path:
        """Write ``<name>.result.json`` into ``done/`` or ``failed/``, then move the trigger
        beside it.  Never raises: a write that fails is logged and retried by later
        :meth:`claim` calls, the trigger staying in ``processing/`` meanwhile."""
        self._inflight.discard(claimed)
        status = "done" if ok else "failed"
        dest = (self.done if ok else self.failed) / claimed.name
        try:
            taken = {p.dest for p in self._pending.values()}
            dest = _unique(dest, taken)
            pending = _PendingResult(claimed, dest, _result_text(claimed, status, result,
                                                                 self.clock()), status)
            self._pending[claimed] = pending
            self._attempt(pending, self.clock())
        except Exception:
            log.exception("triggers.finish_failed", trigger=claimed.name)
        reason = result.get("error") if isinstance(result, dict) else None
        log.info("triggers.finished", trigger=claimed.name, status=status,
                 reason=str(reason)[:500] if reason is not None else None,
                 result_pending=claimed in self._pending)
        return dest

    def _attempt(self, pending: _PendingResult, now: datetime) -> None:
        try:
            if not pending.written:
                result_path = pending.dest.with_name(pending.dest.name + ".result.json")
                result_path.parent.mkdir(parents=True, exist_ok=True)
                self.write_result(result_path, pending.text)
                pending.written = True
            # a trigger removed by hand meanwhile: the result still says what happened
            with contextlib.suppress(FileNotFoundError):
                os.replace(pending.claimed, pending.dest)
        except Exception as exc:
            pending.attempts += 1
            delay = min(RETRY_FIRST_SECONDS * 2 ** (pending.attempts - 1), RETRY_MAX_SECONDS)
            pending.next_at = now + timedelta(seconds=delay)
            log.warning("triggers.result_write_failed", trigger=pending.claimed.name,
                        status=pending.status, result_written=pending.written,
                        attempts=pending.attempts, retry_in_seconds=delay,
                        error=f"{type(exc).__name__}: {exc}")
            return
        self._pending.pop(pending.claimed, None)
        if pending.attempts:
            log.info("triggers.result_written_late", trigger=pending.claimed.name,
                     status=pending.status, attempts=pending.attempts + 1)

    def _retry_pending(self, now: datetime) -> None:
        for pending in list(self._pending.values()):
            if pending.next_at is None or pending.next_at <= now:
                self._attempt(pending, now)


def _read_regular(path: Path) -> bytes:
    """The body of a regular file, at most the cap; ValueError for anything else.

    ``lstat`` first, so a FIFO or device is never opened at all; then open without following
    a link and without blocking, and ``fstat`` the descriptor, so a file swapped in between is
    caught too.  The size is checked before a byte is read.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ValueError(f"cannot stat the trigger: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"the trigger is {_kind(st.st_mode)}, not a regular file; trigger "
                         "files are never followed or opened unless they are regular files: "
                         "drop a plain file instead")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ValueError(f"cannot open the trigger: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"the trigger is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_BODY_BYTES:
            raise ValueError(f"the trigger is {st.st_size} bytes; at most {MAX_BODY_BYTES} are "
                             "read, and it was not read: a trigger body is a small JSON object")
        chunks: list[bytes] = []
        left = MAX_BODY_BYTES + 1  # one byte more tells a file that grew after the fstat
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def _result_text(claimed: Path, status: str, result: dict[str, Any], now: datetime) -> str:
    doc = {"trigger": claimed.name, "status": status, "finished_at": iso_utc(now), **result}
    try:
        return json.dumps(doc, indent=2, default=str) + "\n"
    except Exception as exc:  # a result that cannot be serialized still gets a result file
        fallback = {"trigger": claimed.name, "status": status, "finished_at": iso_utc(now),
                    "error": f"the result could not be written as JSON: {type(exc).__name__}: "
                             f"{exc}"}
        return json.dumps(fallback, indent=2) + "\n"


def _dropped_name(name: str) -> str:
    """The name a file had when it was dropped: without the suffix :func:`_unique` added."""
    return _UNIQUE_SUFFIX.sub("", name)


def _unique(path: Path, taken: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """``path``, or ``path`` with a time stamp when it, its result file, or a result still
    waiting to be written (``taken``) has that name."""
    result = path.with_name(path.name + ".result.json")
    if path not in taken and not os.path.lexists(path) and not os.path.lexists(result):
        return path
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return path.with_name(f"{path.name}.{stamp}")
