"""The embedding stage: image files in, vectors in the content-addressed cache out.

A reader -> mapper -> writer pipeline.  The calling thread plans (a stat and one indexed query
per file: unchanged files cost no read), a pool of decode threads reads, hashes, decodes and
preprocesses (:mod:`.decode`), and the calling thread runs the model on batches and writes
them.  At most ``queue_batches`` batches of files are in flight, so memory stays flat however
many files there are.  Per batch: vectors (atomic ``.npy``) -> index lines -> one DB
transaction; a crash anywhere replays at most that batch without a second model call, because
an existing ``.npy`` is adopted, never recomputed.

It must not decide *when* to run (the worker and the CLI do) nor scan for images on its own
except in :func:`candidates_from_roots`, which the CLI uses.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from daemon.codes import CODES
from daemon.embedding.cache import VectorCache
from daemon.embedding.decode import (
    PILLOW,
    DecodeOptions,
    Job,
    Outcome,
    PngDecoder,
    configure_pillow,
    prepare,
)
from daemon.embedding.ledger import FileRow, Ledger, VectorRow
from daemon.embedding.model import Embedder, load_embedder
from daemon.embedding.ray_backend import hand_to_ray
from daemon.embedding.spng import load_spng
from daemon.errors import EmbeddingError
from daemon.files import DELETE_STAGING_FOLDERS, is_image_name
from daemon.images import parse_stage
from daemon.records import ImageCandidate, Issue
from daemon.settings import Settings
from daemon.similar.live import vectors_written
from daemon.store import StateStore
from daemon.timeparse import iso_utc

log = structlog.get_logger("embedding")

DEFAULT_IMAGE_SIZE = 224
#: failures found before any byte was read: retried on every run (an open() is cheap)
_RETRY_ALWAYS = frozenset({"image_vanished", "image_unreadable"})
#: ``png_decoder`` default: libspng when the pyspng wheel provides it, else Pillow
AUTO: Literal["auto"] = "auto"


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """What one run did.  ``embedded`` counts model inputs; ``moved`` counts files whose bytes
    already had a vector (renamed, moved, copied to another project): zero model calls."""

    seen: int = 0
    embedded: int = 0
    cached: int = 0
    moved: int = 0
    failed: int = 0
    skipped_failed: int = 0
    batches: int = 0
    stopped: bool = False
    duration_s: float = 0.0
    issues: tuple[Issue, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("seen", "embedded", "cached", "moved", "failed",
                                              "skipped_failed", "batches", "stopped")} | {
            "duration_s": round(self.duration_s, 3), "issues": len(self.issues)}


def candidates_from_roots(settings: Settings, project: str | None = None
                          ) -> list[ImageCandidate]:
    """Every .png/.jpg/.jpeg under the configured ``image_roots`` (recursive); images in the
    delete-staging folders get priority 0."""
    if project is not None and project not in settings.projects:
        raise EmbeddingError(f"no [projects.{project}] with image_roots in the configuration")
    names = [project] if project is not None else sorted(settings.projects)
    found: list[ImageCandidate] = []
    for name in names:
        for root in settings.projects[name].image_roots:
            for dirpath, dirnames, filenames in os.walk(settings.resolve(root)):
                dirnames.sort()
                folder = Path(dirpath)
                priority = 0 if folder.name in DELETE_STAGING_FOLDERS else 1
                found.extend(
                    ImageCandidate(name, f, folder / f, priority)
                    for f in sorted(filenames) if is_image_name(f)
                )
    return found


def pick_decode_workers(configured: int, usable_cores: set[int] | None = None) -> int:
    """``embedding.decode_workers``, or (0) one decode thread per core this process may run on:
    its affinity mask (taskset, cgroup cpusets, systemd ``CPUAffinity=``), not the machine's
    core count.  No cap: decoding releases the GIL, and a GPU box is decode-bound."""
    if configured > 0:
        return configured
    cores = usable_cores if usable_cores is not None else os.sched_getaffinity(0)
    return max(1, len(cores))


class EmbeddingStage:
    """Embeds candidates once per content; safe to call repeatedly from the worker."""

    def __init__(self, settings: Settings, store: StateStore, *,
                 embedder: Embedder | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 png_decoder: PngDecoder | Literal["auto"] | None = AUTO) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.ledger = Ledger(store)
        self._embedder = embedder
        self._cache: VectorCache | None = None
        # None: Pillow decodes PNGs (the seam: tests inject a decoder, or none)
        self.png_decoder: PngDecoder | None = (
            load_spng() if isinstance(png_decoder, str) else png_decoder)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            cfg = self.settings.embedding
            self._embedder = load_embedder(
                cfg,
                weights_path=self.settings.resolve(cfg.weights_path) if cfg.weights_path else None,
                hf_cache_dir=self.settings.resolve(cfg.hf_cache_dir) if cfg.hf_cache_dir else None,
            )
        return self._embedder

    @property
    def cache(self) -> VectorCache:
        if self._cache is None:
            cache = VectorCache(self.settings.cache_dir, self.embedder.embedder_id)
            cache.prepare()
            configure_pillow(self.settings.embedding.max_image_pixels)
            self._cache = cache
        return self._cache

    def run(self, candidates: Iterable[ImageCandidate], *, limit: int | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> EmbedResult:
        """Embed what is missing.  ``limit``: at most this many files are read (unchanged,
        already-handled files do not count).  ``progress(done, total)`` is called after each
        batch with the files read so far and the files to read (a bar's figures: ``--limit``
        or fewer).  ``should_stop`` is polled between batches."""
        start = time.perf_counter()
        emb, cache, cfg = self.embedder, self.cache, self.settings.embedding
        ordered = sorted(candidates, key=lambda c: c.priority)  # stable: 0 first
        tally: dict[str, int] = dict.fromkeys(
            ("seen", "embedded", "cached", "moved", "failed", "skipped_failed", "batches"), 0)
        issues: list[Issue] = []
        side = int(getattr(emb, "image_size", DEFAULT_IMAGE_SIZE))
        opts = DecodeOptions(side, cfg.jpeg_draft, cfg.max_image_pixels, self.png_decoder)
        workers = pick_decode_workers(cfg.decode_workers)
        depth = cfg.batch_size * cfg.queue_batches
        # planned up front (a stat and an indexed query per file): the work's size is known
        planned = list(self._plan(ordered, cache, tally, limit))
        if hand_to_ray(cfg, len(planned)):  # an archive-sized backlog goes to the cluster
            from daemon.embedding.ray_backend import embed_planned

            stopped, issues = embed_planned(self, planned, tally, progress=progress,
                                            should_stop=should_stop)
            return EmbedResult(**tally, stopped=stopped, issues=tuple(issues),
                               duration_s=time.perf_counter() - start)
        jobs = iter(planned)
        done = 0
        if progress is not None:
            progress(0, len(planned))
        stopped = False
        with ThreadPoolExecutor(workers, thread_name_prefix="embed-decode") as pool:
            inflight: deque[Future[Outcome]] = deque()

            def fill() -> None:
                while len(inflight) < depth:
                    job = next(jobs, None)
                    if job is None:
                        return
                    inflight.append(pool.submit(prepare, job, opts, cache.has, emb.preprocess))

            fill()
            while inflight:
                if should_stop():
                    stopped = True
                    break
                wait0 = time.perf_counter()
                outcomes: list[Outcome] = []
                decoded = 0
                while inflight and decoded < cfg.batch_size and len(outcomes) < 4 * depth:
                    outcome = inflight.popleft().result()
                    fill()
                    outcomes.append(outcome)
                    decoded += outcome.kind == "decoded"
                wait_ms = (time.perf_counter() - wait0) * 1000
                issues.extend(self._finish(outcomes, tally, wait_ms))
                done += len(outcomes)
                if progress is not None:
                    progress(done, len(planned))
            pool.shutdown(wait=True, cancel_futures=True)
        result = EmbedResult(**tally, stopped=stopped,
                             duration_s=time.perf_counter() - start, issues=tuple(issues))
        log.info("embedding.run_finished", embedder_id=emb.embedder_id, decode_workers=workers,
                 png_decoder=self.png_decoder.name if self.png_decoder else PILLOW,
                 **result.to_dict())
        return result

    # -- planning (calling thread) --------------------------------------------------------------

    def _plan(self, ordered: list[ImageCandidate], cache: VectorCache, tally: dict[str, int],
              limit: int | None) -> Iterator[Job]:
        taken = 0
        for cand in ordered:
            if limit is not None and taken >= limit:
                return
            tally["seen"] += 1
            row = self.ledger.file_row(cand.project, str(cand.path))
            failed_sha = row.sha256 if row is not None and row.status == "failed" else None
            if row is not None:
                try:
                    st = os.stat(cand.path)
                except OSError:
                    st = None
                same = st is not None and (row.size, row.mtime_ns) == (st.st_size,
                                                                       st.st_mtime_ns)
                embedded = row.status == "ok" and row.sha256 is not None \
                    and cache.has(row.sha256)
                # a deleted file keeps its vector and its row: training still needs it
                if embedded and (same or st is None):
                    tally["cached"] += 1
                    continue
                if same and row.status == "failed" and row.code not in _RETRY_ALWAYS:
                    tally["skipped_failed"] += 1
                    continue
            taken += 1
            yield Job(cand, failed_sha=failed_sha)

    # -- model and writes (calling thread) -----------------------------------------------------

    def _finish(self, outcomes: list[Outcome], tally: dict[str, int], wait_ms: float
                ) -> list[Issue]:
        emb, cache = self.embedder, self.cache
        now = self.clock()
        t0 = time.perf_counter()
        fresh: dict[str, Outcome] = {}
        for o in outcomes:
            # re-check: another file of this run may have written these bytes meanwhile
            if o.kind == "decoded" and o.sha256 and o.sha256 not in fresh \
                    and not cache.has(o.sha256):
                fresh[o.sha256] = o
        vectors = np.zeros((0, emb.dim), dtype=np.float32)
        if fresh:
            import torch

            batch = torch.stack([o.tensor for o in fresh.values() if o.tensor is not None])
            vectors = _normalized(emb.embed(batch), len(fresh), emb.dim)
        t1 = time.perf_counter()
        cache.write_vectors(list(zip(fresh, vectors, strict=True)))
        vectors_written(cache, list(zip(fresh, vectors, strict=True)))  # similarity index
        files, vec_rows, entries, issues = self._rows(outcomes, fresh, now)
        cache.append_index(entries)  # after the vectors: an index line never names a missing file
        self.ledger.record(files, vec_rows, now, emb.embedder_id)
        t2 = time.perf_counter()
        kinds = [o.kind for o in outcomes]
        tally["embedded"] += len(fresh)
        reused = sum(k in ("decoded", "cached") for k in kinds) - len(fresh)
        tally["moved"] += reused
        tally["failed"] += kinds.count("failed")
        tally["skipped_failed"] += kinds.count("same_failure")
        tally["batches"] += 1
        decode_ms = sum(o.decode_ms for o in outcomes)
        log.info("embedding.batch_embedded", images=len(fresh), files=len(outcomes),
                 reused=reused, failed=kinds.count("failed"),
                 decode_ms=round(decode_ms, 1), wait_ms=round(wait_ms, 1),
                 infer_ms=round((t1 - t0) * 1000, 1), write_ms=round((t2 - t1) * 1000, 1))
        return issues

    def _rows(self, outcomes: list[Outcome], fresh: dict[str, Outcome], now: datetime
              ) -> tuple[list[FileRow], list[VectorRow], list[dict[str, Any]], list[Issue]]:
        emb = self.embedder
        files: list[FileRow] = []
        vec_rows: dict[str, VectorRow] = {}
        entries: list[dict[str, Any]] = []
        issues: list[Issue] = []
        stamp = iso_utc(now)
        for o in outcomes:
            c = o.job.candidate
            if o.kind in ("failed", "same_failure"):
                prior = self.ledger.file_row(c.project, str(c.path))
                if o.code == "image_vanished" and prior is not None and prior.status == "ok":
                    continue  # deleted after it was embedded: keep what is known of it
                code = o.code or (prior.code if prior else None) or "image_corrupt"
                message = o.message or (prior.message if prior else None) or ""
                files.append(FileRow(c.project, str(c.path), c.file_name, o.size, o.mtime_ns,
                                     o.sha256, "failed", code, message))
                if o.kind == "failed":
                    issues.append(_issue(c, code, message))
                continue
            assert o.sha256 is not None
            files.append(FileRow(c.project, str(c.path), c.file_name, o.size, o.mtime_ns,
                                 o.sha256, "ok", None, None, o.width, o.height))
            if o.sha256 in fresh or not self.ledger.has_vector(o.sha256, emb.embedder_id):
                # new, or a vector adopted after a crash between its write and the commit
                vec_rows[o.sha256] = VectorRow(o.sha256, emb.embedder_id, emb.dim, o.width,
                                               o.height)
            entries.append({"hash": o.sha256, "embedder_id": emb.embedder_id,
                            "project": c.project, "file_name": c.file_name, "path": str(c.path),
                            "width": o.width, "height": o.height,
                            "stage": parse_stage(c.file_name), "time": stamp})
        return files, list(vec_rows.values()), entries, issues


def _normalized(vectors: np.ndarray, rows: int, dim: int) -> np.ndarray:
    """The one convention: float32, L2 norm 1.  A model that returns anything else is a model
    failure, not bad input."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.shape != (rows, dim) or not np.isfinite(arr).all():
        raise EmbeddingError(f"embedder returned shape {arr.shape} (expected {(rows, dim)}) "
                             "or non-finite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise EmbeddingError("embedder returned a zero vector")
    out: np.ndarray = (arr / norms).astype(np.float32)
    return out


def _issue(c: ImageCandidate, code: str, message: str) -> Issue:
    severity = CODES[code].severity if code in CODES else "error"
    log.warning("embedding.image_failed", code=code, project=c.project, path=str(c.path),
                reason=message)
    return Issue(code=code, severity=severity, project=c.project, db_file=str(c.path),
                 group_id=None, rowid=None, field="file", value_repr=repr(c.file_name),
                 message=message)
