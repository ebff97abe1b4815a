"""The order of stages for one task.  The only room that imports many rooms.

Each :class:`~daemon.tasks.TaskKind` has one handler in :attr:`Pipeline.handlers` (an explicit
map: no dispatch by string), and each handler only orders the stages of rooms that own the
work: validation (:mod:`daemon.validation`), sidecars (:mod:`daemon.sidecar_record`), the image
index (:mod:`daemon.images`), the embedder's lifecycle (:mod:`daemon.embedding.lifecycle`), the
audit pass (:mod:`daemon.training.audit`), training, reports, backfill
(:mod:`daemon.backfill_cli` shares its options with the trigger).  Handlers return typed
results (:mod:`daemon.tasks`).

Handlers run on two lanes (:mod:`daemon.lanes`): the fast lane (validate, sidecar, image, scan,
reconcile, inspect, pause/resume) and the heavy lane (embed, train, audit, summary, backfill).
What both touch is the state DB (the store's transaction lock makes them take turns) and
``recent_images`` (guarded here).  Every handler is idempotent (a crash replays the task) and
decides its work by querying the state DB and the files themselves (events are only wake-ups).
Heavy rooms are imported lazily, so ``validate`` never pays for torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.embedding.lifecycle import EmbedderLifecycle, EmbedRate, ModelState
from daemon.errors import DaemonError, EmbeddingError
from daemon.files import in_delete_staging
from daemon.health import Progress
from daemon.images import ImageIndex, iter_files
from daemon.lanes import ThreadProgress
from daemon.records import ImageCandidate, ProjectResult
from daemon.settings import Settings
from daemon.sidecar_record import record_sidecars
from daemon.store.db import StateStore
from daemon.store.issue_repo import IMAGE_KEY, IssueRepo
from daemon.store.sidecar_repo import SidecarRepo
from daemon.tasks import (
    BackfillRan,
    EmbedSkipped,
    ImagesIndexed,
    Lane,
    Paused,
    Reconciled,
    ReportWritten,
    RetrainChecked,
    Scanned,
    SidecarsRecorded,
    SummariesWrittenLate,
    TaskKind,
    TaskResult,
    Validated,
    kind_of,
)
from daemon.validation import ProjectSource, Validator, discover_projects
from daemon.workqueue import Task

log = structlog.get_logger("pipeline")

ShouldStop = Callable[[], bool]
Handler = Callable[[Task, ShouldStop], TaskResult]


class Pipeline:
    def __init__(self, settings: Settings, store: StateStore, put: Callable[[Task], None], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 embedder: Any = None, progress: Progress | ThreadProgress | None = None
                 ) -> None:
        self.settings = settings
        #: bumped as work moves (the service's health tick reads it per lane: daemon.health)
        self.progress = progress if progress is not None else Progress()
        self.store = store
        self.put = put
        self.clock = clock
        self.validator = self._validator(settings)
        self.index = ImageIndex(store)
        self.paused = False
        self.embedding = EmbedderLifecycle(settings, store, embedder=embedder,
                                           allow=self.progress.allow)
        #: file names of rows just validated (fast lane) that the next embed takes first
        #: (heavy lane)
        self._recent: dict[str, set[str]] = {}
        self._recent_lock = threading.Lock()
        self.handlers: Mapping[TaskKind, Handler] = {
            TaskKind.VALIDATE: self._do_validate, TaskKind.IMAGE: self._do_image,
            TaskKind.SCAN: self._do_scan, TaskKind.SIDECAR: self._do_sidecar,
            TaskKind.EMBED: self._do_embed, TaskKind.RETRAIN_CHECK: self._do_retrain_check,
            TaskKind.AUDIT: self._do_audit, TaskKind.RETRAIN: self._do_retrain,
            TaskKind.SUMMARY: self._do_summary, TaskKind.INSPECT: self._do_inspect,
            TaskKind.BACKFILL: self._do_backfill, TaskKind.RECONCILE: self._do_reconcile,
            TaskKind.PAUSE: self._do_pause, TaskKind.RESUME: self._do_resume,
            TaskKind.PREDICT: self._do_predict,
        }

    # -- what the heartbeat reads (main thread) ---------------------------------------------------

    @property
    def model(self) -> ModelState:
        return self.embedding.model

    @property
    def embed_rate(self) -> EmbedRate:
        return self.embedding.rate

    @property
    def embedding_disabled(self) -> str | None:
        return self.embedding.disabled

    def reconfigure(self, settings: Settings) -> None:
        """Apply reloaded settings between tasks (a loaded model is kept when its own settings
        did not change: :class:`EmbedderLifecycle`)."""
        self.settings = settings
        self.validator = self._validator(settings)
        self.embedding.reconfigure(settings)

    def reconfigure_lane(self, lane: Lane, settings: Settings) -> None:
        """The part of :meth:`reconfigure` a lane owns, applied by that lane between its own
        tasks: the fast lane's validator, the heavy lane's embedding stage."""
        if lane is Lane.FAST:
            self.settings = settings
            self.validator = self._validator(settings)
        else:
            self.embedding.reconfigure(settings)

    def _validator(self, settings: Settings) -> Validator:
        return Validator(self.store, settings, clock=self.clock, collect_images=True,
                         progress=lambda: self.progress.beat("validating a chunk of rows"))

    # -- dispatch -------------------------------------------------------------------------------

    def run(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        """The typed result of ``task``; DaemonError for a kind no handler takes."""
        kind = kind_of(task.kind)
        handler = self.handlers.get(kind) if kind is not None else None
        if handler is None:
            raise DaemonError(f"no handler for task kind {task.kind!r}")
        return handler(task, should_stop)

    def handle(self, task: Task, should_stop: ShouldStop) -> dict[str, Any]:
        """:meth:`run`, as the dict the trigger result file and the log line hold."""
        return self.run(task, should_stop).to_dict()

    def image_roots(self) -> dict[Path, str]:
        return image_roots_of(self.settings)

    def projects(self) -> set[str]:
        return {s.project for s in discover_projects(self.settings)}

    def _source(self, project: str) -> ProjectSource | None:
        return next((s for s in discover_projects(self.settings) if s.project == project), None)

    def _roots(self, project: str) -> list[Path]:
        return [self.settings.resolve(r) for r in self.settings.projects[project].image_roots]

    # -- validation (fast lane) -----------------------------------------------------------------

    def _do_validate(self, task: Task, should_stop: ShouldStop) -> Validated:
        full = bool(task.arg("full", False))
        sources = discover_projects(self.settings)
        if task.project is not None:
            sources = [s for s in sources if s.project == task.project]
        results = []
        for src in sources:
            if should_stop():
                break
            results.append(self._validate(src, full=full, hints=task.hints))
        return Validated(tuple(results))

    def _validate(self, src: ProjectSource, *, full: bool = False,
                  hints: frozenset[str] = frozenset(), verify: bool = False) -> ProjectResult:
        self.progress.beat(f"validating {src.project}")
        result = self.validator.validate_project(src, full=full, hints=hints, verify=verify)
        names = self.validator.take_checked_images(src.project)
        if names:
            # images of rows just checked are embedded first: their losers are deleted soon
            with self._recent_lock:
                self._recent.setdefault(src.project, set()).update(names)
            self.put(Task(TaskKind.EMBED, src.project))
        return result

    # -- files (fast lane) ----------------------------------------------------------------------

    def _do_image(self, task: Task, should_stop: ShouldStop) -> ImagesIndexed:
        assert task.project is not None
        now = self.clock()
        counts: dict[str, int] = {}
        with self.store.transaction():
            for path in sorted(task.paths):
                state = self.index.observe(task.project, Path(path), now)
                counts[state] = counts.get(state, 0) + 1
        result = ImagesIndexed(counts)
        if result.needs_embedding:
            self.put(Task(TaskKind.EMBED, task.project))
        log.info("images.indexed", project=task.project, **counts)
        return result

    def _do_scan(self, task: Task, should_stop: ShouldStop) -> Scanned:
        """A folder appeared, moved or vanished under an image root: rescan that project."""
        assert task.project is not None
        return self._scan_project(task.project)

    def _scan_project(self, project: str) -> Scanned:
        roots = [r for r in self._roots(project) if r.is_dir()]
        self.progress.beat(f"scanning the image roots of {project}")
        images = ImagesIndexed(self.index.scan(project, roots, self.clock(),
                                               progress=self.progress.beat))
        sidecars = {str(p) for r in roots for p in iter_files(r, frozenset({".decision"}))}
        stats = self._sidecars(project, sidecars | SidecarRepo(self.store).known_paths(project))
        if images.needs_embedding:
            self.put(Task(TaskKind.EMBED, project))
        log.info("images.scanned", project=project, **images.counts, sidecars=len(sidecars))
        return Scanned(images, stats)

    def _do_sidecar(self, task: Task, should_stop: ShouldStop) -> SidecarsRecorded:
        assert task.project is not None
        return self._sidecars(task.project, set(task.paths))

    def _sidecars(self, project: str, paths: set[str]) -> SidecarsRecorded:
        # the reviewer commits the row before it writes the sidecar: catch up first, so a
        # brand-new sidecar is not reported as an orphan
        src = self._source(project)
        if src is not None:
            self._validate(src)
        done = record_sidecars(self.store, project, paths, self._roots(project), self.clock(),
                               beat=self.progress.beat)
        for target, gids in done.recheck.items():
            self.put(Task(TaskKind.VALIDATE, target, hints=gids, urgent=True))
        log.info("sidecars.processed", project=project, **done.stats.to_dict(),
                 rows_to_recheck=sum(len(g) for g in done.recheck.values()))
        return done.stats

    # -- embedding (heavy lane) -----------------------------------------------------------------

    def _do_embed(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        if self.image_roots():
            # load (or fail to find) the model at the first embed task (the startup
            # reconcile queues one), on this lane: the operator learns of missing weights at
            # once, and the fast lane never waits for the load
            self.embedding.ready_stage()
        present = self.index.present(task.project)
        with self._recent_lock:
            recent = set().union(*self._recent.values()) if self._recent else set()
        # first: images of rows that just arrived, and losers waiting in delete staging: both
        # may be deleted soon after review, and an embedding not taken then is data lost
        candidates = [ImageCandidate(p, name, path, 0 if name in recent
                                     or in_delete_staging(path) else 1)
                      for p, name, path in present]
        if not candidates:
            return EmbedSkipped()
        stage = self.embedding.ready_stage()
        if stage is None:
            # recorded, not lost: the candidates stay in the image index for a later run
            log.info("embedding.queue_recorded", project=task.project, images=len(candidates),
                     reason=self.embedding.disabled)
            return EmbedSkipped(len(candidates), disabled=self.embedding.disabled)
        try:
            result = stage.run(candidates, limit=task.arg("limit"), should_stop=should_stop)
        except EmbeddingError as exc:
            self.embedding.fail(exc)
            return EmbedSkipped(error=str(exc))
        self.embedding.ran(result)
        with self._recent_lock:
            self._recent.clear()
        self._record_image_issues(result.issues)
        self.put(Task(TaskKind.PREDICT, task.project))  # settled images: predict their groups
        return result

    def _do_predict(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        from daemon.predict.run import predict_task

        return predict_task(self.settings, self.store, task.project, self.clock(),
                            bulk=bool(task.arg("bulk", False)), stage=self.embedding.ready_stage,
                            beat=self.progress.beat, should_stop=should_stop)

    def _record_image_issues(self, issues: Any) -> None:
        """Bad images become issue records beside bad rows and sidecars (keyed by path), and
        leave again once the file embeds fine (its bytes changed)."""
        now = self.clock()
        with self.store.transaction():
            for issue in issues:
                key = IMAGE_KEY + issue.db_file
                self.store.replace_issues(issue.project, [key], [(key, issue)], now)
            IssueRepo(self.store).clear_healed_image_issues()

    # -- training and reports (heavy lane) ------------------------------------------------------

    def _do_retrain_check(self, task: Task, should_stop: ShouldStop) -> RetrainChecked:
        try:
            from daemon.training.policy import retrain_decision
        except ImportError:
            return RetrainChecked(skipped="training room not installed")
        if self.settings.audit.command:
            self.put(Task(TaskKind.AUDIT, urgent=True))
        decisions: dict[str, tuple[bool, str, TaskResult | None]] = {}
        for kind in ("ranker", "crop"):
            decision = retrain_decision(self.store, self.settings, kind, self.clock())
            outcome = (self._train(kind, force=False, should_stop=should_stop)
                       if decision.due and not should_stop() else None)
            decisions[kind] = (decision.due, decision.reason, outcome)
        return RetrainChecked(decisions=decisions)

    def _do_audit(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        from daemon.training.audit import run_audit_pass

        return run_audit_pass(self.store, self.settings, self.clock(),
                              allow=self.progress.allow)

    def _do_retrain(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        model = task.arg("model", "ranker")
        return self._train(model, force=bool(task.arg("force", False)), should_stop=should_stop)

    def _train(self, kind: str, *, force: bool, should_stop: ShouldStop) -> TaskResult:
        from daemon.training.runner import train_model

        # the training process is watched through should_stop (polled every second, and
        # bounded by training.timeout_minutes) and its progress events: never a stall.  The
        # run is recorded through our store: no second writable connection in the process
        return train_model(self.settings, kind, force=force,  # type: ignore[arg-type]
                           should_stop=should_stop, store=self.store,
                           progress=lambda e: self.progress.beat(f"training {kind}"))

    def _do_summary(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        from daemon.summary import write_daily_summary, write_missed_summaries

        if task.arg("catch_up"):
            # at start: days missed while the daemon was down, written late from the data
            written = write_missed_summaries(self.settings, self.store, self.clock(),
                                             beat=self.progress.beat, should_stop=should_stop)
            return SummariesWrittenLate(tuple(str(p) for p in written))
        json_path, md_path = write_daily_summary(self.settings, self.store, self.clock(),
                                                 beat=self.progress.beat)
        return ReportWritten(str(json_path), str(md_path))

    def _do_inspect(self, task: Task, should_stop: ShouldStop) -> ReportWritten:
        from daemon.reports import build_inspection, write_inspection

        sources = discover_projects(self.settings)
        if task.project:
            sources = [s for s in sources if s.project == task.project]
        results = [self._validate(s) for s in sources]
        now = self.clock()
        report = build_inspection(sources, results, self.store, now=now,
                                  first_rows=self.settings.validation.report_first_rows)
        json_path, md_path = write_inspection(report, self.settings.summaries_dir, now)
        return ReportWritten(str(json_path), str(md_path), dict(report["totals"]))

    def _do_backfill(self, task: Task, should_stop: ShouldStop) -> TaskResult:
        from daemon.backfill import run_backfill, write_report
        from daemon.backfill_cli import BackfillRequest, backfill_options

        opts = backfill_options(BackfillRequest.from_trigger(dict(task.args)), self.settings)
        with run_backfill(opts) as outcome:
            json_path, _ = write_report(opts, outcome, self.settings.summaries_dir,
                                        self.clock())
            result = BackfillRan(outcome.converted, outcome.rejected,
                                 tuple(str(p) for p in outcome.created), str(json_path))
        if opts.execute:
            self.put(Task(TaskKind.RECONCILE, urgent=True))
        return result

    # -- whole-system passes (fast lane) --------------------------------------------------------

    def _do_reconcile(self, task: Task, should_stop: ShouldStop) -> Reconciled:
        """Everything, from scratch: a missed event costs minutes, never data.  The model is
        loaded by the embed task this queues, on the heavy lane: never in front of a commit."""
        validated: list[ProjectResult] = []
        scanned: dict[str, Scanned] = {}
        for src in discover_projects(self.settings):
            if should_stop():
                return Reconciled(tuple(validated), scanned, stopped=True)
            validated.append(self._validate(src, verify=True))
        for project, cfg in self.settings.projects.items():
            if should_stop():
                return Reconciled(tuple(validated), scanned, stopped=True)
            if cfg.image_roots:
                scanned[project] = self._scan_project(project)
        self.put(Task(TaskKind.TRIGGERS, urgent=True))
        self.put(Task(TaskKind.EMBED, urgent=True))
        return Reconciled(tuple(validated), scanned)

    def _do_pause(self, task: Task, should_stop: ShouldStop) -> Paused:
        self.paused = True
        log.info("pipeline.paused")
        return Paused(True)

    def _do_resume(self, task: Task, should_stop: ShouldStop) -> Paused:
        self.paused = False
        log.info("pipeline.resumed")
        return Paused(False)


def image_roots_of(settings: Settings) -> dict[Path, str]:
    """Every configured image root (absolute) -> its project."""
    roots: dict[Path, str] = {}
    for name, cfg in settings.projects.items():
        for root in cfg.image_roots:
            roots[settings.resolve(root)] = name
    return roots
