"""The thin command line: parse arguments, load settings, call one room, print, exit.

Exit codes of every command are in ONE table, Documents/OPERATIONS.md ("Exit codes"); that of
``status`` follows LSB (0 running, 1 dead or hung, 3 not running, 4 unknown: daemon.status).
Those of ``validate`` (``inspect`` alike, except that data errors do not fail it: its result is
the report)::

    0   clean: no error-severity issue (warnings may exist)
    1   errors found in the data (a verdict, not a failure: the timer unit counts it a success)
    2   usage (argparse)
    70  internal failure: an unexpected exception, a project whose validation failed
        (``project_check_failed``) or our own state DB failing; logged as a structured error
        with its traceback, never a bare traceback
    75  a source DB stayed locked by its writer for the whole retry budget (nothing else failed)
    78  configuration: bad config.toml / environment, unknown ``--project``, missing ``--db``,
        a missing decisions folder (unless ``paths.create_missing``); ``run`` also a missing
        image root

A crash is a bug, never a verdict: no exception leaves ``main`` as Python's exit status 1.
Logs go to stdout for the service and to stderr for one-shot commands, whose stdout carries
their result (so ``trainingd validate --json | jq`` works).  Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from daemon import __version__
from daemon.codes import render_markdown_table
from daemon.decisions.schema import project_name_from_db
from daemon.errors import EXIT_CONFIG, EXIT_TEMPFAIL, ConfigError, DaemonError, StoreError
from daemon.logs import configure_logging
from daemon.records import ProjectResult
from daemon.settings import Settings, check_input_folders, load_settings
from daemon.status import print_status, status_document
from daemon.store.db import StateStore
from daemon.validation import ProjectSource, Validator, discover_projects

log = structlog.get_logger("cli")
#: sysexits.h EX_SOFTWARE: an internal failure, never to be mistaken for "errors found" (1)
EXIT_INTERNAL = 70
#: commands whose exit status 1 is a verdict on the data, so a failure must not read as 1
_VERDICT_COMMANDS = frozenset({"validate", "inspect"})
ERROR_LINES_SHOWN = 200
DEMO_MARKER = ".trainingd-demo"


#: sub-commands that live in their own room: name -> (module, its parser adder, its runner);
#: adding one is one line here (the runner is imported only when its command runs)
ROOM_COMMANDS: dict[str, tuple[str, str, str]] = {
    "backfill": ("daemon.backfill_cli", "add_backfill_parser", "cmd_backfill"),
    "embed": ("daemon.embedding.cli", "add_embed_parser", "cmd_embed"),
    "train": ("daemon.training.cli", "add_train_parser", "cmd_train"),
    "summary": ("daemon.summary.cli", "add_summary_parser", "cmd_summary"),
    "similar": ("daemon.similar.cli", "add_similar_parser", "cmd_similar"),
    "models": ("daemon.models_cli", "add_models_parser", "cmd_models"),
    "export": ("daemon.export.cli", "add_export_parser", "cmd_export"),
    "predict": ("daemon.predict.cli", "add_predict_parser", "cmd_predict"),
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="config.toml (default: $TRAININGD_CONFIG, "
                        "./config.toml, else the embedded defaults)")
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    common.add_argument("--log-format", choices=("auto", "json", "console"))

    parser = argparse.ArgumentParser(prog="trainingd", description=__doc__.splitlines()[0],
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"trainingd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run the service: watch, validate, "
                       "embed, train, report (systemd Type=notify)")
    p.add_argument("--for-seconds", type=float, help="stop by itself after this long (demos)")

    p = sub.add_parser("validate", parents=[common],
                       help="check new and changed rows of every project DB")
    p.add_argument("--project", action="append", default=[], help="only this project "
                   "(repeatable)")
    p.add_argument("--db", action="append", type=Path, default=[],
                   help="check this DB file ad hoc (backup, temp DB); state is not kept")
    p.add_argument("--full", action="store_true",
                   help="re-check every row, not only new and changed ones")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = sub.add_parser("inspect", parents=[common],
                       help="validate, then write the inspection report (JSON + Markdown)")
    p.add_argument("--project", action="append", default=[])
    p.add_argument("--db", action="append", type=Path, default=[])

    p = sub.add_parser("status", parents=[common], help="per-project validation figures")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", parents=[common], help="run the daemon on a self-contained "
                       "demo tree fed by the upstream simulator until its work is done")
    p.add_argument("--out", type=Path, help="demo tree (default: <data_root>/demo)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="cap: the demo runs until its work is done, at most this long "
                   "(default 600); hitting it names what was pending and exits 75")
    p.add_argument("--groups", type=int, default=40, help="groups the simulator reviews")

    for module, adder, _ in ROOM_COMMANDS.values():
        getattr(importlib.import_module(module), adder)(sub, common)

    p = sub.add_parser("codes", parents=[common], help="print the table of issue codes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-doc", type=Path, nargs="?", const=Path("Documents/ISSUE_CODES.md"),
                   help="(maintainers) regenerate Documents/ISSUE_CODES.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"trainingd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level or settings.logging.level,
                      args.log_format or settings.logging.format,
                      stream=sys.stdout if args.command == "run" else sys.stderr)
    handler = {"run": cmd_run, "validate": cmd_validate, "inspect": cmd_inspect,
               "status": cmd_status, "demo": cmd_demo, "codes": cmd_codes}.get(args.command)
    if handler is None:  # a room's own command, imported only when it runs
        module, _, runner = ROOM_COMMANDS[args.command]
        handler = getattr(importlib.import_module(module), runner)
    try:
        return handler(args, settings)
    except BrokenPipeError:  # `trainingd validate | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        print(f"trainingd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        log.error("cli.state_db_failed", error=str(exc))
        print(f"trainingd: {exc}", file=sys.stderr)
        return EXIT_INTERNAL if args.command in _VERDICT_COMMANDS else 1
    except DaemonError as exc:
        print(f"trainingd: {exc}", file=sys.stderr)
        return EXIT_INTERNAL if args.command in _VERDICT_COMMANDS else 1
    except Exception as exc:  # a bug: one structured record with the traceback, then 70
        log.error("cli.internal_failure", command=args.command, error_type=type(exc).__name__,
                  error=str(exc)[:500], exc_info=exc)
        print(f"trainingd: internal failure ({type(exc).__name__}: {str(exc)[:200]}); "
              "see the cli.internal_failure log record", file=sys.stderr)
        return EXIT_INTERNAL


# -- helpers ------------------------------------------------------------------------------------


def _select_sources(settings: Settings, projects: list[str], dbs: list[Path]
                    ) -> tuple[list[ProjectSource], bool]:
    """The sources to work on, and whether they are ad-hoc files (no persistent state)."""
    if dbs:
        missing = [str(p) for p in dbs if not p.is_file()]
        if missing:
            raise ConfigError(f"--db: no such file: {', '.join(missing)}")
        return [ProjectSource(project_name_from_db(p), p.resolve()) for p in dbs], True
    # a typo'd decisions folder is a config error (78), not "no project DBs found" and exit 0;
    # image roots are not checked here: validate never reads them (validate-only machines)
    for created in check_input_folders(settings, image_roots=False):
        log.info("cli.folder_created", folder=str(created), key="paths.create_missing")
    sources = discover_projects(settings)
    if projects:
        known = {s.project for s in sources}
        unknown = sorted(set(projects) - known)
        if unknown:
            raise ConfigError(
                f"--project: unknown project(s) {', '.join(unknown)} in "
                f"{settings.decisions_dir} (known: {', '.join(sorted(known)) or 'none'})"
            )
        sources = [s for s in sources if s.project in set(projects)]
    return sources, False


def _run_validation(settings: Settings, store: StateStore, sources: list[ProjectSource],
                    *, full: bool) -> list[ProjectResult]:
    validator = Validator(store, settings)
    return [validator.validate_project(s, full=full) for s in sources]


def _exit_code(results: list[ProjectResult]) -> int:
    """The table in the module docstring: a failure outranks a verdict on the data."""
    if any(r.schema_kind == "failed" for r in results):
        return EXIT_INTERNAL
    if any(r.errors for r in results):
        return 1
    if any(r.schema_kind == "busy" for r in results):
        return EXIT_TEMPFAIL
    return 0


# -- commands -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.service import Service

    return Service(settings, config_path=settings.config_file,
                   run_seconds=args.for_seconds).run()


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    sources, ad_hoc = _select_sources(settings, args.project, args.db)
    store = StateStore(":memory:" if ad_hoc else settings.state_db)
    try:
        results = _run_validation(settings, store, sources, full=args.full or ad_hoc)
        issues = [i for s in sources for i in store.issues(s.project)]
    finally:
        store.close()
    if args.json:
        doc = {
            "trainingd_version": __version__,
            "totals": {
                "projects": len(results),
                "rows": sum(r.rows_total for r in results),
                "rows_checked": sum(r.rows_checked for r in results),
                "errors": sum(r.errors for r in results),
                "warnings": sum(r.warnings for r in results),
            },
            "projects": [r.to_dict() for r in results],
            "issues": [i.to_dict() for i in issues],
        }
        json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return _exit_code(results)
    from daemon.reports import issue_line

    if not results:
        print(f"no project DBs found in {settings.decisions_dir}")
    for r in results:
        extra = f" ({r.reason})" if r.reason else ""
        print(f"{r.project}: {r.mode}{extra}; {r.rows_total} rows, {r.rows_checked} checked, "
              f"{r.errors} error(s), {r.warnings} warning(s) [{r.schema_kind}]")
    by_code = Counter((i.severity, i.code) for i in issues)
    if by_code:
        print("\nissues by code:")
        for (sev, code), n in sorted(by_code.items()):
            print(f"  {sev:7} {code:36} {n}")
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        print("\nerrors:")
        for i in errors[:ERROR_LINES_SHOWN]:
            print("  " + issue_line(i))
        if len(errors) > ERROR_LINES_SHOWN:
            print(f"  ... {len(errors) - ERROR_LINES_SHOWN} more: use --json or trainingd inspect")
    return _exit_code(results)


def cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.reports import build_inspection, write_inspection

    sources, ad_hoc = _select_sources(settings, args.project, args.db)
    store = StateStore(":memory:" if ad_hoc else settings.state_db)
    now = datetime.now(UTC)
    try:
        results = _run_validation(settings, store, sources, full=ad_hoc)
        report = build_inspection(
            sources, results, store, now=now, first_rows=settings.validation.report_first_rows,
            busy_timeout_ms=settings.sources.busy_timeout_ms,
            busy_budget_seconds=settings.sources.busy_retry_seconds,
        )
    finally:
        store.close()
    json_path, md_path = write_inspection(report, settings.summaries_dir, now)
    log.info("reports.inspection_written", json=str(json_path), markdown=str(md_path),
             **report["totals"])
    print(json_path)
    print(md_path)
    # the report is the result, so errors in the data do not fail inspect; a failure does
    return EXIT_INTERNAL if any(r.schema_kind == "failed" for r in results) else 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """LSB exit status (0 running, 1 dead or hung, 3 not running, 4 unknown): daemon.status."""
    if args.json:
        doc = status_document(settings)
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        for problem in doc["problems"]:
            print(f"trainingd: {problem}", file=sys.stderr)
        return int(doc["exit_code"])
    return print_status(settings)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.demo.run import run_demo

    root = (args.out or settings.data_root / "demo").resolve()
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).exists():
            raise ConfigError(f"--out: {root} is not empty and not an earlier demo; "
                              "choose another folder")
        shutil.rmtree(root)
    return run_demo(root, max_seconds=args.max_seconds, groups=args.groups,
                    marker=DEMO_MARKER)










def cmd_codes(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.codes import CODES, render_issue_codes_doc

    if args.write_doc:
        from daemon.fsutil import atomic_write_text

        atomic_write_text(args.write_doc, render_issue_codes_doc())
        print(args.write_doc)
    elif args.json:
        json.dump({c.code: {"severity": c.severity, "room": c.room, "meaning": c.meaning,
                            "action": c.action} for c in CODES.values()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_markdown_table())
    return 0
