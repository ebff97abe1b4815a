"""``trainingd models`` and ``trainingd models rollback ranker|crop [--undo]``: what the registry
holds, which version is champion, and what the reviewer really has, checked by sha256 against
the file on disk.  Parsing and printing only: the work is :mod:`daemon.training.dropin`.

The listing never writes (no ledger, no lock, no folder is created).  Exit codes: 0 listed, or
rolled back; 1 nothing to roll back (or to undo); 74 the reviewer's file or folder could not be
read or written (a FIFO or folder in its place, a read-only folder); 78 configuration (the
reviewer's folder is missing, a bad config.toml).  Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.settings import Settings
from daemon.training import dropin, registry

#: sysexits.h EX_IOERR: the reviewer's file or folder could not be read or written
EXIT_IO = 74


def add_models_parser(subparsers: Any, common_parent: argparse.ArgumentParser
                      ) -> argparse.ArgumentParser:
    """Add ``models`` (and its ``rollback``) to the ``trainingd`` sub-commands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "models", parents=[common_parent],
        help="model versions, champions, and what the reviewer has (rollback)",
        description="List every trained version per kind with its test-side figures, the "
                    "champion, and the reviewer's drop-in file (version, sha256 check). "
                    "See Documents/TRAINING.md, 'The reviewer's files'.")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    r = sub.add_parser("rollback", parents=[common_parent],
                       help="give the reviewer back the file it had before the current one")
    r.add_argument("kind", choices=("ranker", "crop"))
    r.add_argument("--undo", action="store_true",
                   help="undo the last rollback (put back the file it replaced)")
    r.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return p


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "models_command", None) == "rollback":
        return _rollback(args, settings)
    doc = models_document(settings)
    if args.json:
        json.dump(doc.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(doc))
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    def sync(data: bytes, meta: dict[str, Any] | None) -> None:
        registry.sync_reviewer_copy(settings.models_dir, args.kind, data, meta)

    try:
        out = dropin.rollback(dropin.target(settings), args.kind, datetime.now(UTC),
                              undo=args.undo, on_restore=sync)
    except OSError as exc:  # the file in place is not a regular file, a folder is read-only
        out = dropin.Outcome(EXIT_IO, f"cannot roll back {args.kind}: {type(exc).__name__}: "
                             f"{exc}; nothing was changed that a rerun would not finish")
    if args.json:
        json.dump({"exit_code": out.code, "message": out.message, "version": out.version,
                   "written": [str(p) for p in out.written]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(("" if out.code == 0 else "trainingd: ") + out.message,
              file=sys.stdout if out.code == 0 else sys.stderr)
    return out.code


# -- the document (read only) --------------------------------------------------------------------

def version_row(kind: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One version's test-side figures: its primary score, the best baseline's, n, and the CI
    of the paired difference to that baseline (issue 12's promotion test)."""
    metric = "top1" if kind == "ranker" else "mean_iou"
    model = (meta.get("metrics") or {}).get("model") or {}
    decision = meta.get("promotion") or {}
    comparisons = decision.get("comparisons") or []
    base = comparisons[0] if comparisons else {}
    export = meta.get("reviewer_export") or {}
    return {"version": meta.get("version"), "created_at": meta.get("created_at"),
            "promoted": bool(meta.get("promoted")), "metric": metric,
            "score": model.get(metric), "n": decision.get("n_test", meta.get("test_size")),
            "best_baseline": decision.get("best_baseline"),
            "baseline_score": base.get("other"), "difference": base.get("difference"),
            "ci": [base.get("ci_low"), base.get("ci_high")] if base else None,
            "alpha": base.get("alpha"), "design": (meta.get("architecture") or {}).get("design"),
            "embedder_id": meta.get("embedder_id"),
            "embedder_random": meta.get("embedder_random"),
            "reviewer_exported": bool(export.get("exported")),
            "reason": meta.get("promotion_reason")}


@dataclass(frozen=True)
class ReviewerState:
    """What the reviewer has for one kind: the file, whether it is the one trainingd put there
    (sha256, ``state`` in words), the backups a rollback can use.  ``exported_at`` is known
    only for trainingd's file; ``can_roll_back``/``can_undo`` only once the file was read."""

    file: str
    folder_exists: bool
    export_enabled: bool
    state: str
    version: int | None = None
    sha256: str | None = None
    backups: tuple[str, ...] = ()
    exported_at: Any = None
    can_roll_back: bool | None = None
    can_undo: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "folder_exists": self.folder_exists,
                               "export_enabled": self.export_enabled, "version": self.version,
                               "sha256": self.sha256, "state": self.state,
                               "backups": list(self.backups)}
        if self.version is not None:
            out["exported_at"] = self.exported_at
        if self.can_roll_back is not None:
            out["can_roll_back"], out["can_undo"] = self.can_roll_back, self.can_undo
        return out


@dataclass(frozen=True)
class KindListing:
    """One kind in ``trainingd models``: the champion, every version's row, the reviewer."""

    champion: int | None
    versions: list[dict[str, Any]]
    reviewer: ReviewerState

    def to_dict(self) -> dict[str, Any]:
        return {"champion": self.champion, "versions": self.versions,
                "reviewer": self.reviewer.to_dict()}


@dataclass(frozen=True)
class ModelsListing:
    """The whole listing (``--json``: :meth:`to_dict`)."""

    models_dir: str
    reviewer_dir: str
    kinds: dict[str, KindListing]

    def to_dict(self) -> dict[str, Any]:
        return {"models_dir": self.models_dir, "reviewer_dir": self.reviewer_dir,
                "kinds": {k: v.to_dict() for k, v in self.kinds.items()}}


def models_document(settings: Settings) -> ModelsListing:
    """Per kind: versions with figures, the champion, and what the reviewer has."""
    target = dropin.target(settings)
    kinds = {}
    for kind in dropin.KINDS:
        rows = [version_row(kind, m) for m in registry.all_metadata(settings.models_dir, kind)]
        kinds[kind] = KindListing(registry.champion_version(settings.models_dir, kind), rows,
                                  describe(target, kind))
    return ModelsListing(str(settings.models_dir), str(target.folder), kinds)


def describe(t: dropin.Target, kind: str) -> ReviewerState:
    """What the reviewer has for ``kind``: version, whether the file on disk is the one trainingd
    put there (sha256), and the backups a rollback can use."""
    path = t.path(kind)
    base = ReviewerState(str(path), t.folder.is_dir(), t.enabled, "folder missing")
    if not base.folder_exists:
        return base
    try:
        disk = dropin.file_sha256(path)
    except OSError as exc:
        return replace(base, state=f"unreadable: {exc}")
    entry = dropin.read_ledger(t.models_dir)[kind]
    states = dropin.effective_states(entry, disk)
    last = states[-1] if states else None
    version, exported_at = None, None
    if disk is None:
        state = "missing (the reviewer uses rules only)" if not states else \
            "missing: removed outside trainingd (the reviewer uses rules only)"
    elif last is None or last.get("sha256") != disk:
        state = "not trainingd's (before trainingd)" if last is None else \
            "changed outside trainingd"
    elif last.get("version") is None:
        state = f"not trainingd's ({last.get('origin')})"
    else:
        version, exported_at = last["version"], last.get("at")
        state = "matches (rolled back)" if "restored_at" in last else "matches"
    backups = tuple(sorted(p.name for p in t.backups.glob(f"{t.names[kind]}.*.bak"))) \
        if t.backups.is_dir() else ()
    return replace(
        base, state=state, version=version, sha256=disk, backups=backups,
        exported_at=exported_at,
        can_roll_back=any(dropin.backup_exists(t, s) and s.get("sha256") != disk
                          for s in states[:-1]),
        can_undo=any(dropin.backup_exists(t, s) for s in entry["rolled_back"]))


def _fig(v: Any, pct: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * float(v):.1f}%" if pct else f"{float(v):.3f}"


def _ci(row: dict[str, Any]) -> str:
    ci = row.get("ci")
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{float(ci[0]):+.3f}, {float(ci[1]):+.3f}]"


def render(doc: ModelsListing) -> str:
    lines: list[str] = []
    for kind, entry in doc.kinds.items():
        pct = kind == "ranker"
        champ = entry.champion
        lines.append(f"{kind} (champion: {'v' + str(champ) if champ is not None else 'none'})")
        if entry.versions:
            lines.append(f"  {'version':9} {'promoted':9} {'test':>7} {'best baseline':28} "
                         f"{'n':>5}  {'difference CI':18} notes")
        for row in entry.versions:
            mark = "*" if row["version"] == champ else " "
            base = f"{row['best_baseline'] or '-'} {_fig(row['baseline_score'], pct)}"
            notes = []
            if row["embedder_random"]:
                notes.append("RANDOM WEIGHTS")
            if row["reviewer_exported"]:
                notes.append("exported")
            lines.append(f"  v{row['version']!s:<7}{mark} {'yes' if row['promoted'] else 'no':9} "
                         f"{_fig(row['score'], pct):>7} {base:28} {row['n'] or '-'!s:>5}  "
                         f"{_ci(row):18} {', '.join(notes)}")
        if not entry.versions:
            lines.append("  no versions trained yet")
        lines.append("  reviewer: " + reviewer_line(entry.reviewer))
    lines.append(f"(registry {doc.models_dir}; reviewer folder {doc.reviewer_dir})")
    return "\n".join(lines) + "\n"


def reviewer_line(r: ReviewerState) -> str:
    name = Path(r.file).name
    if not r.folder_exists:
        return f"{name}: folder missing ({Path(r.file).parent}): set reviewer.models_dir"
    state = r.state
    if r.version is not None:
        state = f"trainingd v{r.version}, sha256 {state} (exported {r.exported_at})"
    extra = []
    if r.sha256:
        extra.append(f"sha256 {r.sha256[:12]}")
    extra.append(f"{len(r.backups)} backup(s)")
    if r.can_roll_back:
        extra.append("rollback possible")
    if not r.export_enabled:
        extra.append("export off (reviewer.export = false)")
    return f"{name}: {state}; " + ", ".join(extra)
