"""Drop-in export: the champion written to exactly the files the upstream reviewer loads, the
files it replaces kept, and a ledger of which version the reviewer has.

The reviewer (``scripts/01_ai_assisted_reviewer.py`` upstream) loads, once at its start,
``<project root>/data/ai_data/models/ranker_v3_w10.pt`` (a 512-input scorer) and
``crop_proposer_v2.pt`` (a 514-input crop net) with ``torch.load(path, map_location=device)``
and a strict ``load_state_dict``; a missing or unloadable file silently means rules only.  So
every byte it reads must be complete, loadable and readable by another user::

    <reviewer_dir>/ranker_v3_w10.pt, crop_proposer_v2.pt       what the reviewer loads
    <reviewer_dir>/<stem>.trainingd.json                       ours: version, embedder, test
                                                               figures, when, sha256 of the file
    <reviewer_dir>/trainingd-backups/<name>.<stamp>.bak        each replaced file (+ its
                                        (+ .trainingd.json)    .trainingd.json), newest
                                                               ``backups_kept`` per kind
    <models_dir>/reviewer_exports.json                         the ledger (below)
    <models_dir>/.reviewer_exports.lock                        export and rollback one at a time

The reviewer's own ``<stem>_metadata.json`` is never touched.  The ledger holds, per kind, the
chain of files the reviewer has had (``states``, the last is what it has now; each with version
or None for a file not trainingd's, sha256, origin and the backup holding it once replaced), the
states a rollback stepped back over (``rolled_back``, for ``--undo``) and, while a change is in
flight, ``pending``: the chain as it will be.  The ledger is written with ``pending`` before the
file is replaced and without it after, so a process killed in between is finished by the next
export or rollback (the file on disk says how far it got).  Nothing here deletes a file that is
not a backup past the cap, and a file found changed outside trainingd is backed up before
anything replaces it.  The listing (``daemon.models_cli.describe``) only reads.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.files import open_regular_file, sha256_stream
from daemon.fsutil import (
    atomic_write_bytes,
    atomic_write_text,
    remove_abandoned_temps,
    remove_unheld,
)
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.settings import Settings

log = structlog.get_logger("dropin")

KINDS = ("ranker", "crop")
LEDGER = "reviewer_exports.json"
LOCK = ".reviewer_exports.lock"
BACKUP_DIR = "trainingd-backups"
META_SUFFIX = ".trainingd.json"
ROLLED_BACK_KEPT = 20
#: the reviewer's default names: the registry never gives a version one of these names
DEFAULT_NAMES = {"ranker": "ranker_v3_w10.pt", "crop": "crop_proposer_v2.pt"}


@dataclass(frozen=True)
class Target:
    """Where the reviewer's files are and how the export behaves (from ``[reviewer]``)."""

    folder: Path
    names: dict[str, str]
    models_dir: Path
    backups_kept: int = 5
    enabled: bool = True

    def path(self, kind: str) -> Path:
        return self.folder / self.names[kind]

    def meta_path(self, kind: str) -> Path:
        return self.folder / (Path(self.names[kind]).stem + META_SUFFIX)

    @property
    def backups(self) -> Path:
        return self.folder / BACKUP_DIR


def target(settings: Settings) -> Target:
    r = settings.reviewer
    return Target(settings.reviewer_dir, {"ranker": r.ranker_file, "crop": r.crop_file},
                  settings.models_dir, r.backups_kept, r.export)


@dataclass
class Outcome:
    """What an export or rollback did: 0 done (or nothing needed), 1 nothing to roll back,
    78 configuration (the folder is missing); ``message`` is a sentence a person can act on."""

    code: int
    message: str
    written: list[Path] = field(default_factory=list)
    version: int | None = None


# -- small helpers -------------------------------------------------------------------------------

def file_sha256(path: Path) -> str | None:
    """The sha256 of the file the reviewer would load (a link is followed), None if missing."""
    try:
        with open_regular_file(path, follow_links=True) as fh:
            return sha256_stream(fh)
    except FileNotFoundError:
        return None


def _read_bytes(path: Path) -> bytes:
    with open_regular_file(path, follow_links=True) as fh:
        return fh.read()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_ledger(models_dir: Path) -> dict[str, Any]:
    data = _read_json(models_dir / LEDGER) or {}
    for kind in KINDS:
        entry = data.get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("states"), list):
            data[kind] = {"states": [], "rolled_back": []}
        entry = data[kind]
        # a hand-edited or damaged ledger: keep only what has the shape of a state
        entry["states"] = [s for s in entry["states"] if isinstance(s, dict)]
        rolled = entry.get("rolled_back")
        entry["rolled_back"] = [s for s in rolled if isinstance(s, dict)] \
            if isinstance(rolled, list) else []
    return data


def _write_ledger(models_dir: Path, ledger: dict[str, Any]) -> None:
    atomic_write_text(models_dir / LEDGER, json.dumps(ledger, indent=2, sort_keys=True) + "\n")


@contextmanager
def _locked(models_dir: Path) -> Iterator[None]:
    """One export or rollback at a time (the daemon's training child and the CLI)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(models_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp(now: datetime) -> str:
    """``2026-12-01T150000Z``: a backup's name says when it was replaced (UTC)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")


def effective_states(entry: dict[str, Any], disk_sha: str | None) -> list[dict[str, Any]]:
    """The chain as it is on disk: a pending change whose file is in place counts as done."""
    pending = entry.get("pending")
    if isinstance(pending, dict) and pending.get("states") and \
            pending["states"][-1].get("sha256") == disk_sha:
        return list(pending["states"])
    return list(entry["states"])


# -- the steps both commands share ---------------------------------------------------------------

def _settle(t: Target, kind: str, entry: dict[str, Any], now: datetime) -> str | None:
    """Finish an interrupted change, then make ``states[-1]`` describe the file on disk (a file
    changed outside trainingd, or the reviewer's own before trainingd's first export, becomes
    a state of its own, backed up so nothing is ever lost).  Returns the file's sha256."""
    # temp files of ours a killed export or rollback left (never another tool's)
    mine = (t.names[kind], t.meta_path(kind).name)
    remove_unheld([p for n in mine for p in t.folder.glob(f".{n}.*.tmp")])
    remove_abandoned_temps(t.backups)
    disk = file_sha256(t.path(kind))
    entry["states"] = effective_states(entry, disk)
    pending = entry.pop("pending", None)
    if isinstance(pending, dict) and entry["states"] == pending.get("states"):
        # killed after the file was replaced: our metadata may still describe the old one
        want = pending.get("meta") if isinstance(pending.get("meta"), dict) else None
        if _read_json(t.meta_path(kind)) != want:
            _write_meta(t, kind, want)
    states = entry["states"]
    if disk is not None and (not states or states[-1].get("sha256") != disk):
        origin = "before trainingd" if not states else "changed outside trainingd"
        states.append({"version": None, "sha256": disk, "origin": origin, "at": iso_utc(now),
                       "backup": None})
        if origin != "before trainingd":
            log.warning("dropin.changed_outside", kind=kind, file=str(t.path(kind)),
                        sha256=disk)
    if disk is not None and not backup_exists(t, states[-1]):
        states[-1]["backup"] = _back_up(t, kind, now, disk)
    return disk


def backup_exists(t: Target, state: dict[str, Any]) -> bool:
    name = state.get("backup")
    return isinstance(name, str) and (t.backups / name).is_file()


def _back_up(t: Target, kind: str, now: datetime, sha: str) -> str:
    """Copy the file in place (and our metadata, when it describes these very bytes) into the
    backups folder; its name."""
    base = f"{t.names[kind]}.{_stamp(now)}"
    name, n = f"{base}.bak", 1
    while (t.backups / name).exists():
        name, n = f"{base}-{n}.bak", n + 1
    atomic_write_bytes(t.backups / name, _read_bytes(t.path(kind)))
    meta = _read_json(t.meta_path(kind))
    if meta is not None and meta.get("sha256") == sha:
        atomic_write_text(t.backups / (name + META_SUFFIX), json.dumps(meta, indent=2) + "\n")
    return name


def _prune(t: Target, kind: str, entry: dict[str, Any]) -> list[str]:
    """Keep the newest ``backups_kept`` backups of ``kind``; never the current file's own."""
    current = entry["states"][-1].get("backup") if entry["states"] else None
    mine = sorted((p for p in t.backups.glob(f"{t.names[kind]}.*.bak")),
                  key=lambda p: (p.stat().st_mtime_ns, p.name))
    removed = []
    for p in mine[:max(0, len(mine) - t.backups_kept)]:
        if p.name == current:
            continue
        p.unlink(missing_ok=True)
        (t.backups / (p.name + META_SUFFIX)).unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def _place(t: Target, kind: str, data: bytes, meta: dict[str, Any] | None) -> list[Path]:
    """Atomically put ``data`` where the reviewer loads it, and our metadata beside it (or
    none, for a file that is not trainingd's)."""
    atomic_write_bytes(t.path(kind), data)
    _write_meta(t, kind, meta)
    return [t.path(kind), t.meta_path(kind)] if meta is not None else [t.path(kind)]


def _write_meta(t: Target, kind: str, meta: dict[str, Any] | None) -> None:
    if meta is not None:
        atomic_write_text(t.meta_path(kind), json.dumps(meta, indent=2, sort_keys=True,
                                                        default=str) + "\n")
    else:
        t.meta_path(kind).unlink(missing_ok=True)


def _commit(t: Target, kind: str, ledger: dict[str, Any], states: list[dict[str, Any]],
            data: bytes, meta: dict[str, Any] | None) -> list[Path]:
    """Ledger with ``pending``, then the file, then the ledger without it."""
    entry = ledger[kind]
    entry["pending"] = {"states": states, "meta": meta}
    _write_ledger(t.models_dir, ledger)
    written = _place(t, kind, data, meta)
    entry["states"] = states
    entry.pop("pending")
    entry.pop("last_error", None)
    _prune(t, kind, entry)
    _write_ledger(t.models_dir, ledger)
    return written


def _registry_name_clash(t: Target, kind: str) -> str:
    """A configured name that trainingd's registry gives its own versions, in its folder."""
    import re

    name = t.names[kind]
    if name in DEFAULT_NAMES.values() or t.folder.resolve() != t.models_dir.resolve() or \
            not re.fullmatch(r"(ranker|crop_proposer)_v\d+\.pt", name):
        return ""
    key = "reviewer.ranker_file" if kind == "ranker" else "reviewer.crop_file"
    return (f"{key} = {name!r} is a name trainingd's registry uses for its own versions in "
            f"the same folder ({t.folder}); choose another name or reviewer.models_dir")


# -- export --------------------------------------------------------------------------------------

def dropin_metadata(kind: str, version: int, sha: str, rmeta: dict[str, Any], now: datetime,
                    name: str) -> dict[str, Any]:
    """``<stem>.trainingd.json``: which trainingd version this file is, made from which embedder,
    its test-side figures against the best baseline, when, and the file's sha256."""
    decision = rmeta.get("promotion") or {}
    comparisons = decision.get("comparisons") or [{}]
    first = comparisons[0] if comparisons else {}
    return {"kind": kind, "version": version, "file": name, "sha256": sha,
            "exported_at": iso_utc(now), "embedder_id": rmeta.get("embedder_id"),
            "embedder_random": rmeta.get("embedder_random"),
            "evaluated_as": rmeta.get("evaluated_as"),
            "test": {"metric": decision.get("metric"), "n": decision.get("n_test"),
                     "score": first.get("challenger"), "best_baseline": decision.get(
                         "best_baseline"), "baseline_score": first.get("other"),
                     "difference": first.get("difference"),
                     "ci": [first.get("ci_low"), first.get("ci_high")],
                     "alpha": first.get("alpha")},
            "trainingd": rmeta}


def export(t: Target, kind: str, version: int, data: bytes, rmeta: dict[str, Any],
           now: datetime) -> Outcome:
    """Replace the reviewer's ``kind`` file with ``data`` (trainingd ``version``), keeping the
    file it replaces as a backup.  A missing folder or a disabled export writes nothing."""
    path = t.path(kind)
    if not t.enabled:
        return Outcome(0, f"reviewer.export = false: {path} left as it was")
    if rmeta.get("embedder_random") is not False:
        raise ValueError(f"refusing to export {kind} v{version} to the reviewer: embedder "
                         f"{rmeta.get('embedder_id')!r} is random or unknown")
    if not t.folder.is_dir():
        msg = (f"the reviewer's folder {t.folder} does not exist: {kind} v{version} was not "
               "exported; set reviewer.models_dir to the folder the reviewer loads from")
        log.error("dropin.export_skipped", kind=kind, version=version, folder=str(t.folder),
                  key="reviewer.models_dir", reason="folder missing")
        return Outcome(78, msg)
    clash = _registry_name_clash(t, kind)
    if clash:
        log.error("dropin.export_skipped", kind=kind, version=version, reason=clash)
        return Outcome(78, clash)
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    with _locked(t.models_dir):
        ledger = read_ledger(t.models_dir)
        entry = ledger[kind]
        disk = _settle(t, kind, entry, now)
        states = entry["states"]
        if disk == sha and states and states[-1].get("version") == version:
            _write_ledger(t.models_dir, ledger)
            return Outcome(0, f"the reviewer already has {kind} v{version}", version=version)
        meta = dropin_metadata(kind, version, sha, rmeta, now, path.name)
        new = {"version": version, "sha256": sha, "origin": "trainingd", "at": iso_utc(now),
               "backup": None}
        written = _commit(t, kind, ledger, [*states, new], data, meta)
    log.info("dropin.exported", kind=kind, version=version, file=str(path), sha256=sha,
             replaced=states[-1].get("backup") if states else None)
    return Outcome(0, f"the reviewer now has {kind} v{version} ({path})", written, version)


# -- rollback ------------------------------------------------------------------------------------

def rollback(t: Target, kind: str, now: datetime, *, undo: bool = False,
             on_restore: Callable[[bytes, dict[str, Any] | None], None] | None = None
             ) -> Outcome:
    """Put back the file the reviewer had before the current one (from its backup), or with
    ``undo`` the file the last rollback replaced.  What is replaced is backed up first, so every
    rollback can be undone.  ``on_restore(data, our metadata or None)`` runs under the lock
    (the registry keeps its ``reviewer/`` copy equal to what the reviewer has)."""
    if not t.folder.is_dir():
        return Outcome(78, f"the reviewer's folder {t.folder} does not exist; set "
                           "reviewer.models_dir to the folder the reviewer loads from")
    with _locked(t.models_dir):
        ledger = read_ledger(t.models_dir)
        entry = ledger[kind]
        disk = _settle(t, kind, entry, now)
        states: list[dict[str, Any]] = entry["states"]
        if undo:
            redo = [s for s in entry["rolled_back"] if backup_exists(t, s)]
            if not redo:
                _write_ledger(t.models_dir, ledger)
                return Outcome(1, f"no rollback of {kind} to undo")
            goal = redo[-1]
            entry["rolled_back"] = [s for s in entry["rolled_back"] if s is not goal]
            new_states = [*states, {**{k: v for k, v in goal.items() if k != "restored_at"},
                                    "undone_at": iso_utc(now)}]
        else:
            earlier = [i for i in range(len(states) - 1)
                       if backup_exists(t, states[i]) and states[i].get("sha256") != disk]
            if not earlier:
                _write_ledger(t.models_dir, ledger)
                why = "no earlier file was kept" if states else "trainingd never replaced it"
                return Outcome(1, f"nothing to roll back for {kind} ({t.path(kind)}): {why}")
            i = earlier[-1]
            entry["rolled_back"] = (entry["rolled_back"] + states[i + 1:])[-ROLLED_BACK_KEPT:]
            new_states = [*states[:i], {**states[i], "restored_at": iso_utc(now)}]
            goal = states[i]
        name = str(goal["backup"])
        data = _read_bytes(t.backups / name)
        meta = _read_json(t.backups / (name + META_SUFFIX))
        written = _commit(t, kind, ledger, new_states, data, meta)
        if on_restore is not None:
            on_restore(data, meta)
    who = f"trainingd v{goal['version']}" if goal.get("version") is not None \
        else f"the file {goal.get('origin', 'not from trainingd')}"
    log.info("dropin.rolled_back", kind=kind, undo=undo, restored=name,
             version=goal.get("version"), sha256=goal.get("sha256"))
    return Outcome(0, f"the reviewer now has {who} again ({t.path(kind)}, from {name})",
                   written, goal.get("version"))
