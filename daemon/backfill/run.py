"""Streaming backfill: read legacy CSVs line by line, keep cross-line state on disk, write new DBs.

Memory stays flat as the input grows: lines are streamed with the ``csv`` module, and the only
state that grows with the input (which images were seen, which group_ids are taken, every
rejection for the report) lives in a scratch SQLite file, not in Python objects.  Output DBs are
built under a temp name in the target folder and linked into place only when complete, so a
partial DB never sits under a target name; an existing file is never overwritten or modified.

Inputs are hostile: a CSV path may name a FIFO or a folder, a line may hold anything, an image
may be a decompression bomb.  Each of these becomes an issue line and the run goes on; only an
output problem (a target that exists, lies outside the data root or inside a folder we must
never write to, or cannot be written) stops it, before anything is placed.

This room holds the run itself (cross-line state, one line at a time); its neighbours hold the
options and outcome (:mod:`.options`), the input side (:mod:`.inputs`) and the new DBs
(:mod:`.output`).  Their public names are re-exported here for older importers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from daemon.backfill.convert import (
    ConvertContext,
    Converted,
    CsvLayout,
    Note,
    Rejected,
    convert_line,
    detect_layout,
)
from daemon.backfill.inputs import (
    SURROGATE,
    ImageSizer,
    NotReadable,
    count_lines,
    head,
    open_regular,
    read_lines,
    safe_text,
)
from daemon.backfill.options import (
    BackfillError,
    BackfillOptions,
    BackfillOutcome,
    FileSummary,
    LineIssue,
    OutputFailedError,
    OutputPathError,
    TargetExistsError,
    check_output_path,
    target_for,
)
from daemon.backfill.output import COMMIT_EVERY, DbWriter
from daemon.codes import SEVERITY
from daemon.decisions.schema import COLUMNS
from daemon.files import sha256_stream
from daemon.fsutil import hold, remove_unheld

__all__ = [
    "BackfillError", "BackfillOptions", "BackfillOutcome", "FileSummary", "ImageSizer",
    "LineIssue", "OutputFailedError", "OutputPathError", "TargetExistsError", "check_inputs",
    "check_output_path", "count_lines", "run_backfill", "target_for",
]

log = structlog.get_logger("backfill")

SCRATCH_PREFIX = "trainingd-backfill-"

_SCRATCH_DDL = """
CREATE TABLE seen (project TEXT, name TEXT, file TEXT, line INTEGER,
                   PRIMARY KEY (project, name)) WITHOUT ROWID;
CREATE TABLE gids (gid TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE issues (seq INTEGER PRIMARY KEY, file TEXT, line INTEGER, project TEXT, code TEXT,
                     severity TEXT, field TEXT, value_repr TEXT, message TEXT);
CREATE INDEX issues_severity ON issues(severity, seq);
"""


class _Run:
    def __init__(self, opts: BackfillOptions, scratch_dir: Path,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.opts = opts
        #: ``progress(lines read, lines in all inputs)``: a bar's figures, in physical lines
        self.progress = progress
        self.line_counts = {p: count_lines(p) for p in opts.csv_paths} if progress else {}
        self.lines_total = sum(self.line_counts.get(p, 0) for p in opts.csv_paths)
        self.lines_before = 0
        self.out = BackfillOutcome()
        self.scratch = sqlite3.connect(scratch_dir / "scratch.db", isolation_level=None)
        self.scratch.execute("PRAGMA journal_mode=OFF")
        self.scratch.execute("PRAGMA synchronous=OFF")
        self.scratch.executescript(_SCRATCH_DDL)
        self.scratch.execute("BEGIN")
        self.out.scratch = self.scratch
        self.pending = 0
        self.writers: dict[str, DbWriter] = {}
        self.layout: CsvLayout | None = None  # of the file being read, once its header is
        sizer = ImageSizer(opts.image_roots, opts.project_image_roots)
        self.ctx = ConvertContext(
            project_from=opts.project_from, project=opts.project, windows=opts.windows,
            full_frame_tolerance=opts.full_frame_tolerance, size_lookup=sizer,
        )

    def _issue(self, file: str, line: int, project: str | None, note: Note) -> None:
        severity = SEVERITY.get(note.code, "error")
        self.scratch.execute(
            "INSERT INTO issues (file, line, project, code, severity, field, value_repr, message)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (safe_text(file), line, project, note.code, severity, note.field,
             safe_text(note.value_repr), safe_text(note.message)))
        self.out.by_code[note.code] += 1
        self._tick()

    def _tick(self) -> None:
        self.pending += 1
        if self.pending >= COMMIT_EVERY:
            self.scratch.execute("COMMIT")
            self.scratch.execute("BEGIN")
            self.pending = 0

    def _new_project(self, project: str) -> None:
        target = target_for(self.opts, project)
        if self.opts.out is not None and self.out.targets:
            other = next(iter(self.out.targets))
            raise BackfillError(
                f"--out {self.opts.out} takes one project, but the input holds {other!r} and "
                f"{project!r}; use --project, or drop --out to write one DB per project")
        check_output_path(self.opts, target)
        self.out.targets[project] = target
        if os.path.lexists(target):
            self.out.existing_targets.append(target)
            if self.opts.execute:
                raise TargetExistsError(target)
        if self.opts.execute:
            self.writers[project] = DbWriter(
                target, check=lambda path: check_output_path(self.opts, path))

    def _accept(self, file: str, line: int, conv: Converted) -> bool:
        cur = self.scratch.execute(
            "INSERT OR IGNORE INTO seen (project, name, file, line) VALUES (?, ?, ?, ?)",
            (conv.project, conv.chosen_name, file, line))
        if cur.rowcount == 0:
            first = self.scratch.execute("SELECT file, line FROM seen WHERE project = ? AND "
                                         "name = ?", (conv.project, conv.chosen_name)).fetchone()
            self._issue(file, line, conv.project, Note(
                "backfill_duplicate_image", "chosen_path", repr(conv.chosen_name),
                f"the same image of project {conv.project!r} was already converted from "
                f"{first[0]} line {first[1]}; the first line is kept"))
            return False
        if conv.project not in self.out.targets:
            self._new_project(conv.project)
        base = f"{conv.project}_legacy_{conv.stamp}"
        gid, n = base, 1
        while self.scratch.execute("INSERT OR IGNORE INTO gids (gid) VALUES (?)",
                                   (gid,)).rowcount == 0:
            n += 1
            gid = f"{base}_{n}"
        values = {"group_id": gid, **conv.values}
        row = tuple(values[c] for c in COLUMNS)
        for note in conv.notes:
            self._issue(file, line, conv.project, note)
        writer = self.writers.get(conv.project)
        if writer is not None:
            writer.add(row)
        o = self.out
        action = str(values["user_action"])
        o.by_action[action] += 1
        o.by_project[conv.project] += 1
        o.by_project_action.setdefault(conv.project, Counter())[action] += 1
        if len(o.first_rows) < self.opts.first_rows:
            o.first_rows.append({"file": file, "line": str(line),
                                 **{c: repr(values[c]) for c in COLUMNS}})
        self._tick()
        return True

    def read_file(self, path: Path) -> None:
        started = time.perf_counter()
        name = safe_text(str(path))
        summary = FileSummary(file=name, format=None)
        self.out.files.append(summary)
        self.layout = None
        try:
            raw = open_regular(path)
        except NotReadable as exc:
            self._unreadable(summary, 0, str(exc))
            return
        line = 0
        try:
            summary.sha256 = sha256_stream(raw)
            for line, fields, error in read_lines(raw):
                if self.progress is not None:
                    self.progress(self.lines_before + line, self.lines_total)
                if not self._read_line(summary, line, fields, error):
                    break
        except OSError as exc:  # EIO, a file truncated under us: what was read stays read
            self._unreadable(summary, line, f"reading it failed: {exc.strerror or exc}")
        finally:
            raw.close()
            self._file_done(path)
        log.info("backfill.file_read", file=name, format=summary.format, lines=summary.lines,
                 converted=summary.converted, rejected=summary.rejected,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))

    def _file_done(self, path: Path) -> None:
        if self.progress is not None:
            self.lines_before += self.line_counts.get(path, 0)
            self.progress(min(self.lines_before, self.lines_total), self.lines_total)

    def _unreadable(self, summary: FileSummary, line: int, reason: str) -> None:
        summary.error = reason
        self._issue(summary.file, line, None, Note(
            "backfill_csv_unreadable", None, repr(summary.file),
            f"the CSV cannot be read: {reason}; the rest of the file is skipped"))
        log.warning("backfill.csv_unreadable", file=summary.file, line=line, reason=reason)

    def _read_line(self, summary: FileSummary, line: int, fields: list[str] | None,
                   error: str | None) -> bool:
        """Handle one record; False once the file is to be skipped (unknown header)."""
        name = summary.file
        if self.layout is None:
            if fields == []:  # blank lines before the header
                return True
            layout = detect_layout(fields) if fields else None
            if layout is None:
                summary.error = f"line {line} is not a known legacy header"
                self._issue(name, line, None, Note(
                    "backfill_format_unknown", None, repr(fields if fields else error),
                    "the header matches none of the legacy formats (data contract, "
                    "section 5); the file is skipped"))
                return False
            summary.format = layout.format
            self.layout = layout
            return True
        if fields is not None and not any(f.strip() for f in fields):
            summary.blank_lines += 1
            return True
        summary.lines += 1
        if fields is None:
            self._issue(name, line, None, Note("backfill_csv_malformed", None, repr(error),
                                               f"the CSV module cannot read the line: "
                                               f"{error}"))
            summary.rejected += 1
            return True
        if any(SURROGATE.search(f) for f in fields):
            self._issue(name, line, None, Note(
                "backfill_csv_malformed", None, head(repr(fields)),
                "the line is not valid UTF-8 (the bytes shown as \\udcXX); it is not stored "
                "with changed names: re-encode the CSV as UTF-8 and backfill the copy"))
            summary.rejected += 1
            return True
        try:
            outcome = convert_line(self.layout, fields, self.ctx)
        except Exception as exc:  # a bug, not the data's fault: still one line, not the run
            log.exception("backfill.line_failed", file=name, line=line)
            outcome = Rejected(Note(
                "backfill_line_failed", None, head(repr(fields)),
                f"converting the line raised {type(exc).__name__}: {head(str(exc))}; the "
                "line is skipped, the others go on (report this with the log event "
                "backfill.line_failed)"))
        if isinstance(outcome, Converted):
            if self._accept(name, line, outcome):
                summary.converted += 1
            else:
                summary.rejected += 1
        else:
            self._issue(name, line, None, outcome.note)
            summary.rejected += 1
        return True

    def finish(self) -> None:
        self.scratch.execute("COMMIT")
        if not self.opts.execute:
            return
        for writer in self.writers.values():
            writer.finish()
        for writer in self.writers.values():  # all checked before the first is placed
            check_output_path(self.opts, writer.target)
            if os.path.lexists(writer.target):
                raise TargetExistsError(writer.target)
        for project in sorted(self.writers):
            writer = self.writers[project]
            writer.place()
            self.out.created.append(writer.target)
            log.info("backfill.db_written", project=project, db=str(writer.target),
                     rows=writer.rows)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def check_inputs(opts: BackfillOptions) -> None:
    if opts.project_from == "window" and not opts.windows:
        raise BackfillError("--project-from window needs at least one --window P=START..END")
    for path in opts.csv_paths:
        # only a name that is not there at all stops the run (a typo); a folder or a FIFO given
        # as a CSV is reported in the report as backfill_csv_unreadable and the others go on
        if not os.path.lexists(path):
            raise BackfillError(f"no such CSV file: {path}")
    if opts.out is not None:
        check_output_path(opts, opts.out)
        if os.path.lexists(opts.out):
            raise TargetExistsError(opts.out)
    if opts.project_from == "fixed" and opts.project:
        target = target_for(opts, opts.project)
        check_output_path(opts, target)
        if opts.execute and os.path.lexists(target):
            raise TargetExistsError(target)
    inputs = {p.resolve() for p in opts.csv_paths}
    if opts.out is not None and opts.out.resolve() in inputs:
        raise TargetExistsError(opts.out)


@contextlib.contextmanager
def run_backfill(opts: BackfillOptions, *, progress: Callable[[int, int], None] | None = None
                 ) -> Iterator[BackfillOutcome]:
    """Convert every input line; with ``execute`` place the new DBs.  Yields the outcome while
    its scratch state (the issue lists) is still open, for the report to stream from.
    ``progress(done, total)`` is called per line read, in physical lines of all inputs."""
    check_inputs(opts)
    scratch_root = Path(tempfile.gettempdir())
    removed = remove_unheld(scratch_root.glob(f"{SCRATCH_PREFIX}*"))
    if removed:
        log.info("backfill.abandoned_temps_removed", count=removed)
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as scratch_dir:
        lock_fd = hold(Path(scratch_dir))  # a run killed with SIGKILL leaves it unlocked
        try:
            run = _Run(opts, Path(scratch_dir), progress)
            try:
                for path in opts.csv_paths:
                    run.read_file(path)
                run.finish()
            except (OSError, sqlite3.Error) as exc:  # the output side: disk full, read-only
                run.abort()
                run.scratch.close()
                log.error("backfill.write_failed", error=f"{type(exc).__name__}: {exc}")
                raise OutputFailedError(
                    f"writing the backfill output failed ({type(exc).__name__}: {exc}); the "
                    "DBs not yet placed were removed, and a re-run gives the same rows") from exc
            except BaseException:
                run.abort()
                run.scratch.close()
                raise
            try:
                yield run.out
            finally:
                run.scratch.close()
        finally:
            os.close(lock_fd)
