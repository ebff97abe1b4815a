"""The order of stages for one task.  The only room that imports many rooms.

Runs on the one worker thread: the only writer of the state DB, the only user of the GPU.
Every handler is idempotent (a crash replays the task), decides its work by querying the state
DB and the files themselves (events are only wake-ups), and returns a small dict that becomes
the trigger's result file or the log line.  Stages of later issues (embedding, training) are
imported lazily, so ``validate`` never pays for torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.embedding.lifecycle import EmbedRate, ModelState, needs_new_model
from daemon.errors import DaemonError, EmbeddingError
from daemon.health import Progress
from daemon.images import ImageIndex, iter_files
from daemon.records import ImageCandidate, Issue, ProjectResult
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc
from daemon.validation import ProjectSource, Validator, discover_projects
from daemon.workqueue import Task

log = structlog.get_logger("pipeline")

SIDECAR_KEY = "#sidecar:"
#: the longest a model load may take before it counts as a stall (cold disk, CUDA init)
MODEL_LOAD_SECONDS = 600.0
IMAGE_KEY = "#image:"


class Pipeline:
    def __init__(self, settings: Settings, store: StateStore, put: Callable[[Task], None], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 embedder: Any = None, progress: Progress | None = None) -> None:
        self.settings = settings
        #: bumped as work moves (the service's health tick reads it: daemon.health)
        self.progress = progress if progress is not None else Progress()
        self.store = store
        self.put = put
        self.clock = clock
        self.validator = self._validator(settings)
        self.index = ImageIndex(store)
        self.paused = False
        self.embedder = embedder
        self._embedding: Any = None
        self.embedding_disabled: str | None = None
        self.recent_images: dict[str, set[str]] = {}
        #: read by the service's heartbeat (main thread): replaced whole, never mutated
        self.model = ModelState()
        self.embed_rate = EmbedRate()

    def reconfigure(self, settings: Settings) -> None:
        """Apply reloaded settings between tasks, keeping a loaded model whose own settings did
        not change (a model load costs seconds; a new stage around it costs nothing)."""
        old, self.settings = self.settings, settings
        self.validator = self._validator(settings)
        if self._embedding is not None and not needs_new_model(old, settings):
            if old.embedding != settings.embedding or old.cache_dir != settings.cache_dir:
                from daemon.embedding.stage import EmbeddingStage

                self._embedding = EmbeddingStage(settings, self.store,
                                                 embedder=self._embedding.embedder)
            log.info("embedding.model_kept", embedder_id=self.model.embedder_id)
            return
        if self._embedding is not None:
            log.info("embedding.model_dropped", embedder_id=self.model.embedder_id,
                     reason="embedding settings changed; loaded again when next needed")
        self._embedding = None
        self.embedding_disabled = None  # a reload is the operator's retry of a failed load
        self.model = ModelState(loads=self.model.loads)

    def _validator(self, settings: Settings) -> Validator:
        return Validator(self.store, settings, clock=self.clock, collect_images=True,
                         progress=lambda: self.progress.beat("validating a chunk of rows"))

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        handler = getattr(self, f"_do_{task.kind}", None)
        if handler is None:
            raise DaemonError(f"no handler for task kind {task.kind!r}")
        result: dict[str, Any] = handler(task, should_stop)
        return result

    def image_roots(self) -> dict[Path, str]:
        return image_roots_of(self.settings)

    def projects(self) -> set[str]:
        return {s.project for s in discover_projects(self.settings)}

    def _source(self, project: str) -> ProjectSource | None:
        return next((s for s in discover_projects(self.settings) if s.project == project), None)

    # -- validation -----------------------------------------------------------------------------

    def _do_validate(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        full = bool(task.arg("full", False))
        sources = discover_projects(self.settings)
        if task.project is not None:
            sources = [s for s in sources if s.project == task.project]
        results = []
        for src in sources:
            if should_stop():
                break
            results.append(self._validate(src, full=full, hints=task.hints))
        return {"projects": [r.to_dict() for r in results]}

    def _validate(self, src: ProjectSource, *, full: bool = False,
                  hints: frozenset[str] = frozenset()) -> ProjectResult:
        self.progress.beat(f"validating {src.project}")
        result = self.validator.validate_project(src, full=full, hints=hints)
        names = self.validator.take_checked_images(src.project)
        if names:
            # images of rows just checked are embedded first: their losers are deleted soon
            self.recent_images.setdefault(src.project, set()).update(names)
            self.put(Task("embed", src.project))
        return result

    # -- files ----------------------------------------------------------------------------------

    def _do_image(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        assert task.project is not None
        now = self.clock()
        counts: dict[str, int] = {}
        with self.store.transaction():
            for path in sorted(task.paths):
                state = self.index.observe(task.project, Path(path), now)
                counts[state] = counts.get(state, 0) + 1
        if counts.get("new") or counts.get("changed"):
            self.put(Task("embed", task.project))
        log.info("images.indexed", project=task.project, **counts)
        return counts

    def _do_scan(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        """A folder appeared, moved or vanished under an image root: rescan that project."""
        assert task.project is not None
        return self._scan_project(task.project)

    def _scan_project(self, project: str) -> dict[str, Any]:
        roots = [self.settings.resolve(r) for r in self.settings.projects[project].image_roots]
        self.progress.beat(f"scanning the image roots of {project}")
        counts = self.index.scan(project, [r for r in roots if r.is_dir()], self.clock(),
                                 progress=self.progress.beat)
        sidecars = sorted(str(p) for r in roots if r.is_dir()
                          for p in iter_files(r, frozenset({".decision"})))
        known = {r[0] for r in self.store.conn.execute(
            "SELECT path FROM sidecars WHERE project = ? AND gone_at IS NULL", (project,))}
        stats = self._sidecars(project, set(sidecars) | known)
        if counts["new"] or counts["changed"]:
            self.put(Task("embed", project))
        log.info("images.scanned", project=project, **counts, sidecars=len(sidecars))
        return {"images": counts, "sidecars": stats}

    def _do_sidecar(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        assert task.project is not None
        return self._sidecars(task.project, set(task.paths))

    def _sidecars(self, project: str, paths: set[str]) -> dict[str, Any]:
        """Parse, record and link sidecars; re-check exactly the rows they name."""
        from daemon import sidecars as sc

        now = self.clock()
        roots = [self.settings.resolve(r) for r in self.settings.projects[project].image_roots]
        # the reviewer commits the row before it writes the sidecar: catch up first, so a
        # brand-new sidecar is not reported as an orphan
        src = self._source(project)
        if src is not None:
            self._validate(src)
        hints: dict[str, set[str]] = {}
        stats = {"parsed": 0, "gone": 0, "issues": 0}
        with self.store.transaction():
            for raw in sorted(paths):
                self.progress.beat(f"sidecar {raw}")
                path = Path(raw)
                root = next((r for r in roots if r == path or r in path.parents), None)
                key = SIDECAR_KEY + raw
                # a FIFO, a folder or a link named *.decision is not "gone": parse_sidecar
                # turns it into sidecar_unreadable (it opens regular files only)
                if root is None or not os.path.lexists(path):
                    self.store.conn.execute(
                        "UPDATE sidecars SET gone_at = ? WHERE path = ? AND gone_at IS NULL",
                        (iso_utc(now), raw))
                    self.store.replace_issues(project, [key], [], now)
                    stats["gone"] += 1
                    continue
                parsed = sc.parse_sidecar(path, project=project, image_root=root)
                issues: list[Issue] = []
                size: int | None = None
                mtime_ns: int | None = None
                with contextlib.suppress(OSError):  # vanished since: the next scan says so
                    st = os.lstat(path)
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                if isinstance(parsed, Issue):
                    issues.append(parsed)
                    kind = group_id = project_id = None
                    role = sc.folder_role(path, root)
                else:
                    kind, group_id, project_id = parsed.kind, parsed.group_id, parsed.project_id
                    role = parsed.folder_role
                    row = self.store.conn.execute(
                        "SELECT project FROM row_state WHERE group_id = ? LIMIT 1",
                        (parsed.group_id,)).fetchone()
                    image_present = any(path.with_name(parsed.image_stem + ext).exists()
                                        for ext in (".png", ".jpg", ".jpeg", ".PNG", ".JPG"))
                    issues.extend(sc.check_sidecar_link(
                        parsed, row_exists=row is not None, row_project=row[0] if row else None,
                        image_present=image_present, expected_project=project))
                    if row is not None:
                        hints.setdefault(row[0], set()).add(parsed.group_id)
                self.store.conn.execute(
                    "INSERT OR REPLACE INTO sidecars (path, project, kind, group_id, project_id, "
                    "folder_role, size, mtime_ns, seen_at, gone_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                    (raw, project, kind, group_id, project_id, role, size, mtime_ns,
                     iso_utc(now)))
                self.store.replace_issues(project, [key], [(key, i) for i in issues], now)
                stats["parsed"] += 1
                stats["issues"] += len(issues)
        for target, gids in hints.items():
            self.put(Task("validate", target, hints=frozenset(gids), urgent=True))
        log.info("sidecars.processed", project=project, **stats, rows_to_recheck=sum(
            len(g) for g in hints.values()))
        return stats

    # -- embedding ------------------------------------------------------------------------------

    def _embedding_stage(self) -> Any:
        if self._embedding is None and self.embedding_disabled is None:
            try:
                from daemon.embedding.stage import EmbeddingStage

                started, loads = time.monotonic(), self.model.loads
                self.model = ModelState("loading", since=iso_utc(datetime.now(UTC)),
                                        loads=loads)
                stage = EmbeddingStage(self.settings, self.store, embedder=self.embedder)
                # a cold start (disk, CUDA init) may take minutes: a bounded step, not a stall
                self.progress.allow(MODEL_LOAD_SECONDS, "loading the embedding model")
                _ = stage.embedder  # load now: missing weights must surface here, not later
                self._embedding = stage
                from daemon.embedding.model import describe_device

                self.model = ModelState(
                    "loaded", since=iso_utc(datetime.now(UTC)),
                    load_seconds=round(time.monotonic() - started, 3),
                    embedder_id=stage.embedder.embedder_id,
                    loads=loads + (self.embedder is None), device=describe_device(stage.embedder))
                log.info("embedding.stage_ready", embedder_id=stage.embedder.embedder_id,
                         load_seconds=self.model.load_seconds, loads=self.model.loads)
            except (ImportError, EmbeddingError) as exc:
                self.embedding_disabled = str(exc)
                self.model = ModelState("failed", since=iso_utc(datetime.now(UTC)),
                                        error=str(exc)[:2000], loads=self.model.loads)
                log.error("embedding.stage_disabled", reason=str(exc))
        return self._embedding

    def _do_embed(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        present = self.index.present(task.project)
        recent = set().union(*self.recent_images.values()) if self.recent_images else set()
        # first: images of rows that just arrived, and losers waiting in delete staging: both
        # may be deleted soon after review, and an embedding not taken then is data lost
        candidates = [ImageCandidate(p, name, path, 0 if name in recent or any(
                          part in ("__delete_staging", "delete_staging") for part in path.parts)
                          else 1)
                      for p, name, path in present]
        if not candidates:
            return {"queued": 0, "embedded": 0}
        stage = self._embedding_stage()
        if stage is None:
            # recorded, not lost: the candidates stay in the image index for a later run
            log.info("embedding.queue_recorded", project=task.project, images=len(candidates),
                     reason=self.embedding_disabled)
            return {"queued": len(candidates), "embedded": 0, "disabled": self.embedding_disabled}
        try:
            result = stage.run(candidates, limit=task.arg("limit"), should_stop=should_stop)
        except EmbeddingError as exc:
            self.embedding_disabled = str(exc)
            self._embedding = None
            self.model = ModelState("failed", since=iso_utc(datetime.now(UTC)),
                                    error=str(exc)[:2000], loads=self.model.loads)
            log.error("embedding.stage_failed", error=str(exc))
            return {"error": str(exc)}
        self._after_embed_run(stage, result)
        self.recent_images.clear()
        self._record_image_issues(result)
        return result.to_dict() if hasattr(result, "to_dict") else dict(vars(result))

    def _after_embed_run(self, stage: Any, result: Any) -> None:
        """The recent rate and the device's memory, for the heartbeat (status ETA and GPU)."""
        self.embed_rate.add(int(getattr(result, "embedded", 0)),
                            float(getattr(result, "duration_s", 0.0)))
        if getattr(result, "embedded", 0):
            from daemon.embedding.model import describe_device

            self.model = self.model.with_device(describe_device(stage.embedder))

    def _record_image_issues(self, result: Any) -> None:
        """Bad images become issue records beside bad rows and sidecars (keyed by path), and
        leave again once the file embeds fine (its bytes changed)."""
        now = self.clock()
        with self.store.transaction():
            for issue in getattr(result, "issues", ()):
                key = IMAGE_KEY + issue.db_file
                self.store.replace_issues(issue.project, [key], [(key, issue)], now)
            self.store.conn.execute(
                "DELETE FROM issues WHERE row_key LIKE '#image:%' AND EXISTS (SELECT 1 FROM "
                "embed_files f WHERE f.project = issues.project AND f.status = 'ok' AND "
                "'#image:' || f.path = issues.row_key)")

    # -- training and reports -------------------------------------------------------------------

    def _do_retrain_check(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        try:
            from daemon.training.policy import retrain_decision
        except ImportError:
            return {"skipped": "training room not installed"}
        out: dict[str, Any] = {}
        if self.settings.audit.command:
            self.put(Task("audit", urgent=True))
        for kind in ("ranker", "crop"):
            decision = retrain_decision(self.store, self.settings, kind, self.clock())
            out[kind] = {"due": decision.due, "reason": decision.reason}
            if decision.due and not should_stop():
                out[kind]["outcome"] = self._train(kind, force=False, should_stop=should_stop)
        return out

    def _do_audit(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        """Send rows newly flagged with warnings to the audit hook, within the token budget."""
        from daemon.training.audit import run_audit

        if not self.settings.audit.command:
            return {"status": "disabled"}
        mark = int(self.store.get_meta("audit.last_issue_id") or 0)
        rows = [dict(zip(("issue_id", "project", "group_id", "rowid", "code", "field",
                          "value_repr", "message"), r, strict=True))
                for r in self.store.conn.execute(
                    "SELECT id, project, group_id, src_rowid, code, field, value_repr, message "
                    "FROM issues WHERE id > ? AND severity = 'warning' AND src_rowid IS NOT "
                    "NULL ORDER BY id LIMIT ?", (mark, self.settings.audit.max_rows_per_call))]
        if not rows:
            return {"status": "nothing flagged"}
        # the hook is killed after audit.timeout_seconds: its own bound, not a stall
        self.progress.allow(self.settings.audit.timeout_seconds + 30, "audit hook")
        result = run_audit(self.store, self.settings, rows, self.clock())
        if result.status == "ok":
            with self.store.transaction():
                self.store.set_meta("audit.last_issue_id", str(rows[-1]["issue_id"]))
            from daemon.fsutil import atomic_write_text

            ledger = self.settings.summaries_dir / "audit_verdicts.jsonl"
            old = ledger.read_text() if ledger.exists() else ""
            atomic_write_text(ledger, old + "".join(
                json.dumps({"at": iso_utc(self.clock()), "verdict": v}, default=str) + "\n"
                for v in result.verdicts))
        log.info("training.audit_ran", status=result.status, rows=len(rows),
                 tokens=result.tokens_used, reason=result.reason or None)
        return {"status": result.status, "rows": len(rows), "tokens": result.tokens_used}

    def _do_retrain(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        model = task.arg("model", "ranker")
        return self._train(model, force=bool(task.arg("force", False)), should_stop=should_stop)

    def _train(self, kind: str, *, force: bool, should_stop: Callable[[], bool]) -> dict[str, Any]:
        from daemon.training.runner import train_model

        # the training process is watched through should_stop (polled every second, and
        # bounded by training.timeout_minutes) and its progress events: never a stall
        outcome = train_model(self.settings, kind, force=force,  # type: ignore[arg-type]
                              should_stop=should_stop,
                              progress=lambda e: self.progress.beat(f"training {kind}"))
        return outcome.to_dict() if hasattr(outcome, "to_dict") else dict(vars(outcome))

    def _do_summary(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        from daemon.summary import write_daily_summary, write_missed_summaries

        if task.arg("catch_up"):
            # at start: days missed while the daemon was down, written late from the data
            written = write_missed_summaries(self.settings, self.store, self.clock(),
                                             beat=self.progress.beat, should_stop=should_stop)
            return {"written_late": [str(p) for p in written]}
        json_path, md_path = write_daily_summary(self.settings, self.store, self.clock(),
                                                 beat=self.progress.beat)
        return {"json": str(json_path), "markdown": str(md_path)}

    def _do_inspect(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        from daemon.reports import build_inspection, write_inspection

        sources = discover_projects(self.settings)
        if task.project:
            sources = [s for s in sources if s.project == task.project]
        results = [self._validate(s) for s in sources]
        now = self.clock()
        report = build_inspection(sources, results, self.store, now=now,
                                  first_rows=self.settings.validation.report_first_rows)
        json_path, md_path = write_inspection(report, self.settings.summaries_dir, now)
        return {"json": str(json_path), "markdown": str(md_path), **report["totals"]}

    def _do_backfill(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        from daemon.backfill import run_backfill, write_report
        from daemon.backfill_cli import _options, add_backfill_parser

        argv = ["backfill", *task.arg("csv", [])]
        if task.arg("project"):
            argv += ["--project", task.arg("project")]
        if task.arg("project_from"):
            argv += ["--project-from", task.arg("project_from")]
        for window in task.arg("window", []):
            argv += ["--window", window]
        for root in task.arg("image_root", []):
            argv += ["--image-root", root]
        if task.arg("out"):
            argv += ["--out", task.arg("out")]
        if task.arg("execute"):
            argv.append("--execute")
        args = _parse_strict(add_backfill_parser, argv)
        opts = _options(args, self.settings)
        with run_backfill(opts) as outcome:
            json_path, _ = write_report(opts, outcome, self.settings.summaries_dir,
                                        self.clock())
            result = {"converted": outcome.converted, "rejected": outcome.rejected,
                      "created": [str(p) for p in outcome.created], "report": str(json_path)}
        if opts.execute:
            self.put(Task("reconcile", urgent=True))
        return result

    # -- whole-system passes --------------------------------------------------------------------

    def _do_reconcile(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        """Everything, from scratch: a missed event costs minutes, never data."""
        out: dict[str, Any] = {"validated": [], "scanned": {}}
        if self.image_roots() and self._embedding is None and self.embedding_disabled is None:
            # load (or fail to find) the model now, at startup, not in front of the first commit
            self._embedding_stage()
        for src in discover_projects(self.settings):
            if should_stop():
                return out
            out["validated"].append(self._validate(src).to_dict())
        for project, cfg in self.settings.projects.items():
            if should_stop():
                return out
            if cfg.image_roots:
                out["scanned"][project] = self._scan_project(project)
        self.put(Task("triggers", urgent=True))
        self.put(Task("embed", urgent=True))
        return out

    def _do_triggers(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        raise NotImplementedError  # the service claims triggers itself (it owns the box)

    def _do_pause(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        self.paused = True
        log.info("pipeline.paused")
        return {"paused": True}

    def _do_resume(self, task: Task, should_stop: Callable[[], bool]) -> dict[str, Any]:
        self.paused = False
        log.info("pipeline.resumed")
        return {"paused": False}


def image_roots_of(settings: Settings) -> dict[Path, str]:
    """Every configured image root (absolute) -> its project."""
    roots: dict[Path, str] = {}
    for name, cfg in settings.projects.items():
        for root in cfg.image_roots:
            roots[settings.resolve(root)] = name
    return roots


class _StrictParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never sys.exit inside the worker
        raise ValueError(message)


def _parse_strict(add: Callable[[Any, argparse.ArgumentParser], Any],
                  argv: list[str]) -> argparse.Namespace:
    parser = _StrictParser(prog="trigger")
    common = _StrictParser(add_help=False)
    add(parser.add_subparsers(dest="command", parser_class=_StrictParser), common)
    return parser.parse_args(argv)
