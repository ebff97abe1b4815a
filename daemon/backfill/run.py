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
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from PIL import Image, UnidentifiedImageError

from daemon.backfill.convert import (
    ConvertContext,
    Converted,
    CsvLayout,
    ImageProblem,
    Note,
    ProjectFrom,
    Rejected,
    Window,
    convert_line,
    detect_layout,
)
from daemon.codes import SEVERITY
from daemon.decisions.schema import COLUMNS, INSERT_SQL, create_v3_db
from daemon.errors import DaemonError
from daemon.files import NotRegularFileError, is_image_name, sha256_stream
from daemon.files import open_regular as open_fd
from daemon.fsutil import file_mode, fsync_dir

log = structlog.get_logger("backfill")

COMMIT_EVERY = 5000
SCRATCH_PREFIX = "trainingd-backfill-"


class BackfillError(DaemonError):
    """The backfill cannot run as asked (bad arguments, unreadable CSV); nothing was written."""


class OutputPathError(BackfillError):
    """An output path lies outside the data root, or inside an image root or the decisions
    folder (after resolving symlinks); nothing was written."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"refusing to write {path}: {reason}")
        self.path = path


class OutputFailedError(BackfillError):
    """Writing an output DB failed (disk full, read-only folder); nothing was placed."""


class TargetExistsError(BackfillError):
    """A DB the backfill would create already exists; nothing was written or changed."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"refusing to overwrite existing file {path}: backfill only creates "
                         "new DBs; move it away or choose another --out")
        self.path = path


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """What to convert and where outputs may go.

    ``out_dir`` holds the default targets (``<out_dir>/<project>.db``).  When ``data_root`` is
    set, every output must resolve inside it; outputs never resolve inside ``forbidden_dirs``
    (the live decisions folder) or any image root (``image_roots``, ``project_image_roots``).
    """

    csv_paths: tuple[Path, ...]
    out_dir: Path
    execute: bool = False
    project: str | None = None
    project_from: ProjectFrom = "folder"
    windows: tuple[Window, ...] = ()
    image_roots: tuple[Path, ...] = ()
    project_image_roots: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    out: Path | None = None
    full_frame_tolerance: float = 0.001
    first_rows: int = 50
    data_root: Path | None = None
    forbidden_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class LineIssue:
    """A rejection (error) or a conversion note (warning) for one CSV line."""

    file: str
    line: int
    project: str | None
    code: str
    severity: str
    field: str | None
    value_repr: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "project": self.project,
                "code": self.code, "severity": self.severity, "field": self.field,
                "value_repr": self.value_repr, "message": self.message}


@dataclass
class FileSummary:
    file: str
    format: str | None
    sha256: str = ""
    lines: int = 0
    converted: int = 0
    rejected: int = 0
    blank_lines: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BackfillOutcome:
    """Everything the report needs; the issue lists stay in the scratch DB (see ``issues``)."""

    files: list[FileSummary] = field(default_factory=list)
    first_rows: list[dict[str, str]] = field(default_factory=list)
    by_action: Counter[str] = field(default_factory=Counter)
    by_project: Counter[str] = field(default_factory=Counter)
    by_project_action: dict[str, Counter[str]] = field(default_factory=dict)
    by_code: Counter[str] = field(default_factory=Counter)
    targets: dict[str, Path] = field(default_factory=dict)
    existing_targets: list[Path] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    scratch: sqlite3.Connection | None = None

    @property
    def converted(self) -> int:
        return sum(f.converted for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(f.rejected for f in self.files)

    def issues(self, severity: str, limit: int | None = None) -> Iterator[LineIssue]:
        if self.scratch is None:
            return
        sql = ("SELECT file, line, project, code, severity, field, value_repr, message "
               "FROM issues WHERE severity = ? ORDER BY seq")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.scratch.execute(sql, (severity,)):
            yield LineIssue(*row)


# -- image sizes ----------------------------------------------------------------------------------


class ImageSizer:
    """Looks image sizes up under the image roots; the name index is built on first use."""

    def __init__(self, roots: tuple[Path, ...],
                 project_roots: dict[str, tuple[Path, ...]] | None = None) -> None:
        self.roots = roots
        self.project_roots = project_roots or {}
        self._index: dict[Path, dict[str, Path]] = {}

    def _names(self, root: Path) -> dict[str, Path]:
        found = self._index.get(root)
        if found is None:
            found = {}
            for folder, dirs, files in os.walk(root):
                dirs.sort()  # first match in a sorted walk: deterministic
                for name in sorted(files):
                    if is_image_name(name):
                        found.setdefault(name, Path(folder) / name)
            self._index[root] = found
        return found

    def __call__(self, project: str, name: str) -> tuple[int, int] | ImageProblem | None:
        """The first readable size in root order; else the first problem met; else None."""
        problem: ImageProblem | None = None
        for root in (*self.roots, *self.project_roots.get(project, ())):
            path = self._names(root).get(name)
            if path is None:
                continue
            try:
                # a FIFO named like an image must not hang the backfill: regular files only,
                # and a symlink planted in an image root is not followed
                with open_regular(path, follow_links=False) as fh, Image.open(fh) as img:
                    width, height = img.size
            except Image.DecompressionBombError as exc:
                problem = problem or ImageProblem(str(path), (
                    f"it is larger than Pillow's decompression-bomb limit ({exc}); it was not "
                    "decoded. Give the size in a copy of the CSV, or check the file"))
                continue
            except NotReadable as exc:
                problem = problem or ImageProblem(str(path), str(exc))
                continue
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                problem = problem or ImageProblem(str(path), f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # one odd image file never stops the backfill
                problem = problem or ImageProblem(str(path), f"{type(exc).__name__}: {exc}")
                continue
            if width > 0 and height > 0:
                return int(width), int(height)
        return problem


# -- output DBs -----------------------------------------------------------------------------------


def _hold(path: Path) -> int:
    """Take an exclusive ``flock`` on ``path`` for the life of this run.  The kernel drops it
    when the process ends, however it ends: a temp file whose lock is free was abandoned."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_abandoned(paths: Iterator[Path], *, extra: tuple[str, ...] = ()) -> int:
    """Delete each path (and ``path + suffix`` for each of ``extra``) that no live run holds:
    what a backfill killed with SIGKILL left behind.  Returns how many were removed."""
    removed = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run's
            os.close(fd)
            continue
        try:  # deleted while we hold the lock, so no new run can have taken it meanwhile
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                for p in (path, *(Path(f"{path}{suffix}") for suffix in extra)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.info("backfill.abandoned_temps_removed", count=removed)
    return removed


class _DbWriter:
    """One project's new DB, built under a temp name beside the target."""

    def __init__(self, target: Path, check: Callable[[Path], None] | None = None) -> None:
        self.check = check
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target.parent.glob(f".{target.name}.*.tmp"), extra=("-journal",))
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self.lock_fd = _hold(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the umask decides, as for open()
        self.target, self.tmp = target, Path(tmp)
        self.rows = 0
        self.conn = create_v3_db(self.tmp, wal=False)
        # the file is fsynced once before it is linked into place; a crash leaves only the temp
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("BEGIN")

    def add(self, row: tuple[Any, ...]) -> None:
        self.conn.execute(INSERT_SQL, row)
        self.rows += 1
        if self.rows % COMMIT_EVERY == 0:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN")

    def finish(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())

    def discard(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        for path in (self.tmp, Path(f"{self.tmp}-journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._release()

    def _release(self) -> None:
        if self.lock_fd >= 0:  # once: the number may belong to another file afterwards
            os.close(self.lock_fd)
            self.lock_fd = -1

    def place(self) -> None:
        """Put the finished DB under its target name without ever replacing a file there."""
        if self.check is not None:
            self.check(self.target)  # again: a folder may have been swapped for a link
        try:
            os.link(self.tmp, self.target)  # fails if the target appeared meanwhile
        except FileExistsError:
            raise TargetExistsError(self.target) from None
        except OSError:
            # no hard links on this file system: check, then rename
            if self.target.exists():
                raise TargetExistsError(self.target) from None
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink()
        self._release()
        fsync_dir(self.target.parent)


# -- the run --------------------------------------------------------------------------------------


_SCRATCH_DDL = """
CREATE TABLE seen (project TEXT, name TEXT, file TEXT, line INTEGER,
                   PRIMARY KEY (project, name)) WITHOUT ROWID;
CREATE TABLE gids (gid TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE issues (seq INTEGER PRIMARY KEY, file TEXT, line INTEGER, project TEXT, code TEXT,
                     severity TEXT, field TEXT, value_repr TEXT, message TEXT);
CREATE INDEX issues_severity ON issues(severity, seq);
"""


class NotReadable(Exception):
    """A path that is not a regular readable file; the message says what it is instead."""


def open_regular(path: Path, *, follow_links: bool = True) -> BinaryIO:
    """``path`` open for reading through :func:`daemon.files.open_regular` (never a FIFO or a
    device), with the reason as a :class:`NotReadable`.  A CSV may be a link (the operator
    named it); an image found in an image root may not (``follow_links=False``)."""
    try:
        return os.fdopen(open_fd(path, follow_links=follow_links), "rb")
    except NotRegularFileError as exc:
        raise NotReadable(f"it is {exc.what}, not a regular file") from None
    except OSError as exc:
        raise NotReadable(f"cannot open it: {exc.strerror or exc}") from None


def target_for(opts: BackfillOptions, project: str) -> Path:
    """``--out``, else ``<out_dir>/<project>.db`` (the CLI's ``out_dir`` is
    ``<data_root>/backfill``: never the live decisions folder, which belongs to the reviewer)."""
    return opts.out if opts.out is not None else opts.out_dir / f"{project}.db"


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text(value: str) -> str:
    """``value`` storable as UTF-8: bytes a file name or line held that are not UTF-8 (lone
    surrogates) are written as ``\\udcXX`` instead of raising in SQLite or the report."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _head(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_path(opts: BackfillOptions, path: Path) -> None:
    """Refuse (:class:`OutputPathError`) an output that, with every symlink resolved, lies
    outside the data root, or inside the decisions folder or an image root."""
    real = os.path.realpath(path)
    if opts.data_root is not None:
        root = os.path.realpath(opts.data_root)
        if not _within(real, root) or real == root:
            raise OutputPathError(path, f"it resolves to {real}, outside the data root {root}; "
                                        "backfill writes only inside the data root")
    forbidden = [(d, "the decisions folder (the reviewer's, read-only to trainingd): write "
                     "elsewhere, check the DB, then move it there as the reviewer's user")
                 for d in opts.forbidden_dirs]
    roots = {*opts.image_roots, *(r for rs in opts.project_image_roots.values() for r in rs)}
    forbidden += [(r, "an image root (the upstream's folder)") for r in sorted(roots)]
    for folder, what in forbidden:
        real_folder = os.path.realpath(folder)
        if _within(real, real_folder):
            raise OutputPathError(path, f"it resolves to {real}, inside {real_folder}, {what}")


def _read_lines(raw: BinaryIO) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """``(first line number, fields, csv error)`` per record; the header is line 1.  Bytes
    that are not UTF-8 arrive as lone surrogates (``surrogateescape``), never an exception:
    the caller rejects such a line rather than store a name changed to fit."""
    with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        previous = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield previous + 1, None, str(exc)
                previous = reader.line_num
                continue
            yield previous + 1, fields, None
            previous = reader.line_num


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
        self.writers: dict[str, _DbWriter] = {}
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
            (_text(file), line, project, note.code, severity, note.field,
             _text(note.value_repr), _text(note.message)))
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
            self.writers[project] = _DbWriter(
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
        name = _text(str(path))
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
            for line, fields, error in _read_lines(raw):
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
        if any(_SURROGATE.search(f) for f in fields):
            self._issue(name, line, None, Note(
                "backfill_csv_malformed", None, _head(repr(fields)),
                "the line is not valid UTF-8 (the bytes shown as \\udcXX); it is not stored "
                "with changed names: re-encode the CSV as UTF-8 and backfill the copy"))
            summary.rejected += 1
            return True
        try:
            outcome = convert_line(self.layout, fields, self.ctx)
        except Exception as exc:  # a bug, not the data's fault: still one line, not the run
            log.exception("backfill.line_failed", file=name, line=line)
            outcome = Rejected(Note(
                "backfill_line_failed", None, _head(repr(fields)),
                f"converting the line raised {type(exc).__name__}: {_head(str(exc))}; the "
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


def count_lines(path: Path) -> int:
    """Physical lines of a CSV, for a progress total (0 for anything that is not a readable
    regular file: that input becomes an issue line when it is read)."""
    try:
        raw = open_regular(path)
    except NotReadable:
        return 0
    lines, last = 0, b"\n"
    try:
        with raw:
            for chunk in iter(lambda: raw.read(1 << 20), b""):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return lines
    return lines + (last != b"\n")


@contextlib.contextmanager
def run_backfill(opts: BackfillOptions, *, progress: Callable[[int, int], None] | None = None
                 ) -> Iterator[BackfillOutcome]:
    """Convert every input line; with ``execute`` place the new DBs.  Yields the outcome while
    its scratch state (the issue lists) is still open, for the report to stream from.
    ``progress(done, total)`` is called per line read, in physical lines of all inputs."""
    check_inputs(opts)
    scratch_root = Path(tempfile.gettempdir())
    remove_abandoned(scratch_root.glob(f"{SCRATCH_PREFIX}*"))
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as scratch_dir:
        lock_fd = _hold(Path(scratch_dir))  # a run killed with SIGKILL leaves it unlocked
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
