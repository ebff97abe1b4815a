"""``trainingd backfill``: the command-line face of :mod:`daemon.backfill`.

Parses arguments, turns them and the settings into :class:`BackfillOptions`, runs the backfill,
writes the inspection report and prints where everything went.  One progress bar (lines of all
inputs, lines/s) on a terminal, ``backfill.progress`` records off one (:mod:`daemon.progress`).
No conversion logic lives here.

Exit codes: 0 done (rejected lines, and CSVs that cannot be read, are reported, not failures);
2 bad arguments (a missing CSV, an output outside the data root or inside the decisions folder or
an image root); 73 a target DB exists already (nothing was written); 74 writing the output failed
(disk full, read-only folder; nothing half-written is left under a target name).

Outputs go to ``<data_root>/backfill/<project>.db`` by default, never into the live decisions
folder: that folder belongs to the reviewer (trainingd reads it, read-only).  The operator checks
the new DB (``trainingd validate --db``) and moves it there as the reviewer's user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.backfill import (
    BackfillError,
    BackfillOptions,
    OutputFailedError,
    TargetExistsError,
    Window,
    parse_window,
    run_backfill,
    write_report,
)
from daemon.backfill.convert import PROJECT_RE, ProjectFrom, overlapping_windows
from daemon.progress import progress
from daemon.settings import Settings

log = structlog.get_logger("backfill")

EXIT_USAGE = 2
#: sysexits.h EX_CANTCREAT: a file the command must create exists already.
EXIT_CANTCREAT = 73
#: sysexits.h EX_IOERR: an output could not be written.
EXIT_IOERR = 74


def default_out_dir(settings: Settings) -> Path:
    """Where backfilled DBs go unless ``--out`` says otherwise: inside the data root, outside
    the decisions folder (the reviewer's) and every image root."""
    return settings.data_root / "backfill"


def _window_arg(text: str) -> Window:
    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _project_arg(text: str) -> str:
    if not PROJECT_RE.match(text):
        raise argparse.ArgumentTypeError(f"not a project name: {text!r}")
    return text


def add_backfill_parser(subparsers: Any, common: argparse.ArgumentParser
                        ) -> argparse.ArgumentParser:
    """Add ``backfill`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "backfill", parents=[common],
        help="convert legacy CSV logs into new v3 decision DBs (dry run unless --execute)",
        description="Read legacy CSV logs and write the inspection report; with --execute also "
                    "write one NEW v3 DB per project. Never overwrites a file. "
                    "See Documents/BACKFILL.md.")
    p.add_argument("csv", nargs="+", type=Path, metavar="CSV", help="legacy CSV log(s)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--project", type=_project_arg,
                     help="every line belongs to this project")
    who.add_argument("--project-from", choices=("folder", "window"),
                     help="take the project from the image folder (default) or from --window "
                          "ranges (default when --window is given)")
    p.add_argument("--window", action="append", type=_window_arg, default=[],
                   metavar="P=START..END",
                   help="lines whose timestamp lies in START..END belong to project P "
                        "(YYYY-MM-DD: whole UTC days, both included); repeatable")
    p.add_argument("--image-root", action="append", type=Path, default=[], metavar="DIR",
                   help="folder searched (recursively) for images whose logged size is unusable;"
                        " repeatable")
    p.add_argument("--out", type=Path, metavar="DB",
                   help="the one DB to create, inside the data root but not inside the "
                        "decisions folder or an image root (default "
                        "<data_root>/backfill/<project>.db)")
    p.add_argument("--execute", action="store_true",
                   help="write the DBs (without it: read only, report only)")
    return p


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    """What an operator asks of a backfill, from the command line or a ``backfill`` trigger:
    the one shape both are turned into, so the two can never disagree on an option."""

    csv: tuple[Path, ...]
    project: str | None = None
    project_from: str | None = None
    windows: tuple[Window, ...] = ()
    image_roots: tuple[Path, ...] = ()
    out: Path | None = None
    execute: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BackfillRequest:
        return cls(tuple(args.csv), args.project, args.project_from, tuple(args.window),
                   tuple(args.image_root), args.out, bool(args.execute))

    @classmethod
    def from_trigger(cls, args: Mapping[str, Any]) -> BackfillRequest:
        """A trigger's checked arguments (:mod:`daemon.triggers`); a bad project name or
        window raises BackfillError with the same sentence the command line prints."""
        project = args.get("project")
        if project is not None and not PROJECT_RE.match(project):
            raise BackfillError(f"not a project name: {project!r}")
        project_from = args.get("project_from")
        if project_from is not None and project_from not in ("folder", "window"):
            raise BackfillError(f"project_from must be 'folder' or 'window', got "
                                f"{project_from!r}")
        if project is not None and project_from is not None:
            raise BackfillError("project and project_from cannot be combined")
        try:
            windows = tuple(parse_window(w) for w in args.get("window", ()))
        except ValueError as exc:
            raise BackfillError(str(exc)) from None
        out = args.get("out")
        return cls(tuple(Path(c) for c in args.get("csv", ())), project, project_from, windows,
                   tuple(Path(r) for r in args.get("image_root", ())),
                   Path(out) if out else None, bool(args.get("execute", False)))


def backfill_options(request: BackfillRequest, settings: Settings) -> BackfillOptions:
    """The options of a run, from a request and the settings (CLI and trigger alike)."""
    windows = request.windows
    clash = overlapping_windows(windows)
    if clash:
        raise BackfillError(f"--window ranges overlap: {clash[0].project} and {clash[1].project}")
    project_from: ProjectFrom
    if request.project:
        project_from = "fixed"
        if windows:
            raise BackfillError("--window cannot be combined with --project")
    elif request.project_from:
        project_from = request.project_from  # type: ignore[assignment]
    else:
        project_from = "window" if windows else "folder"
    return BackfillOptions(
        csv_paths=request.csv,
        out_dir=default_out_dir(settings),
        data_root=settings.data_root,
        forbidden_dirs=(settings.decisions_dir,),
        execute=request.execute,
        project=request.project,
        project_from=project_from,
        windows=windows,
        image_roots=tuple(p.expanduser() for p in request.image_roots),
        project_image_roots={name: tuple(settings.resolve(r) for r in cfg.image_roots)
                             for name, cfg in settings.projects.items()},
        out=request.out.expanduser() if request.out else None,
        full_frame_tolerance=settings.validation.full_frame_tolerance,
        first_rows=settings.validation.report_first_rows,
    )


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``trainingd backfill``; returns the exit code."""
    now = datetime.now(UTC)
    try:
        opts = backfill_options(BackfillRequest.from_args(args), settings)
        with progress("backfill.progress", unit="line", desc="backfill") as report, \
                run_backfill(opts, progress=report) as outcome:
            json_path, md_path = write_report(opts, outcome, settings.summaries_dir, now)
            totals = (outcome.converted, outcome.rejected)
            targets = dict(outcome.targets)
            existing = list(outcome.existing_targets)
            created = list(outcome.created)
            by_code = dict(outcome.by_code)
    except TargetExistsError as exc:
        log.error("backfill.refused", target=str(exc.path))
        print(f"backfill: {exc}", file=sys.stderr)
        return EXIT_CANTCREAT
    except OutputFailedError as exc:
        log.error("backfill.failed", error=str(exc))
        print(f"backfill: {exc}", file=sys.stderr)
        return EXIT_IOERR
    except BackfillError as exc:
        log.error("backfill.failed", error=str(exc))
        print(f"backfill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info("backfill.report_written", report=str(json_path), markdown=str(md_path),
             converted=totals[0], rejected=totals[1], execute=opts.execute)
    print(f"{totals[0] + totals[1]} line(s): {totals[0]} converted, {totals[1]} rejected")
    for code, n in sorted(by_code.items()):
        print(f"  {code:36} {n}")
    if opts.execute:
        for path in created:
            print(f"created {path}")
    else:
        for project, path in sorted(targets.items()):
            state = "EXISTS: --execute would refuse" if path in existing else "would create"
            print(f"{state} {path} ({project})")
    print(f"report: {json_path}")
    print(f"report: {md_path}")
    return 0
