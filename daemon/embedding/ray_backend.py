"""Bulk embedding on Ray Data: the same work as the local stage, spread over a cluster.

Exists for backlogs one box cannot clear in a reasonable time (an archive backfill of millions
of images).  The driver plans exactly as the local stage does (a stat and an indexed query per
file), turns the files that need work into a Ray Dataset, and lets the cluster do the two
expensive parts: CPU tasks read, hash, decode and preprocess each file with the local path's own
:func:`daemon.embedding.decode.prepare` (JPEG draft mode, libspng for PNGs, the same issue
codes), and actors (one GPU each when the cluster has GPUs, else CPU) run the model, built by
the local path's own :func:`daemon.embedding.model.load_embedder` with the same embedder_id
(an actor whose id differs refuses to start).

It must not write anywhere but through the driver: every result comes back to the driver,
which hands it to the local stage's writer (:meth:`EmbeddingStage._finish`) batch by batch:
vectors (atomic ``.npy``) -> index lines -> one ledger transaction.  So a run killed anywhere
replays at most the batches in flight, an existing ``.npy`` is adopted and never doubled, and
local and Ray runs share one cache and ledger.  Ray is an optional extra (``[ray]``): nothing
here imports it at module level, and without it ``--backend ray`` says how to install it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from daemon.embedding.decode import Job, Outcome
from daemon.errors import ConfigError, DaemonError, EmbeddingError
from daemon.records import Issue
from daemon.settings import EmbeddingSettings, Settings

if TYPE_CHECKING:
    import torch

    from daemon.embedding.model import Embedder
    from daemon.embedding.stage import EmbeddingStage

log = structlog.get_logger("embedding")

INSTALL_HINT = ("the Ray backend needs the optional [ray] extra: pip install -e '.[ray]' "
                "(or pip install 'ray[data]>=2.9'), then run again")


def ray_installed() -> bool:
    """Whether ``import ray`` can work here (without importing it: that costs a second)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError, AttributeError):  # stubbed to None, or a broken install
        return False


def hand_to_ray(cfg: EmbeddingSettings, backlog: int) -> bool:
    """The daemon's rule: a backlog larger than ``ray_min_backlog`` goes to Ray when a cluster
    address is configured and Ray is installed (else the local path runs, as before)."""
    if not cfg.ray_address or backlog <= cfg.ray_min_backlog:
        return False
    if not ray_installed():
        log.warning("embedding.ray_unavailable", backlog=backlog, hint=INSTALL_HINT)
        return False
    return True


def require_ray() -> None:
    """Raise :class:`ConfigError` (exit 78) naming the install command when Ray is missing."""
    if not ray_installed():
        raise ConfigError(INSTALL_HINT)
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc


# -- driver side -------------------------------------------------------------------------------

class _Vectors:
    """The writer's embedder on the driver: the vectors already came from the actors, so
    "embedding" a batch hands them back (the writer re-normalises and checks them)."""

    def __init__(self, embedder_id: str, dim: int) -> None:
        self._id, self._dim = embedder_id, dim

    @property
    def embedder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return self._dim

    def preprocess(self, image: Any) -> torch.Tensor:
        raise EmbeddingError("the Ray writer does not decode images")

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        out: np.ndarray = batch.numpy()
        return out


@contextmanager
def ray_session(address: str, local_cpus: int) -> Iterator[dict[str, float]]:
    """Connect to ``address`` (``auto``, ``ray://HOST:PORT``) or start a cluster of this box
    (``""``/``local``), and leave it as found: a cluster started here is shut down on the way
    out, one that was already running is only disconnected from."""
    import ray

    cluster: Any = ray  # cluster_resources() is untyped
    if ray.is_initialized():  # a caller's session (a notebook, a test): use it, leave it up
        yield dict(cluster.cluster_resources())
        return
    quiet: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    # a daemon never phones home: Ray's usage report is off unless the operator turned it on
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in ("", "local"):
        cpus = local_cpus or len(os.sched_getaffinity(0))
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    try:
        resources = dict(cluster.cluster_resources())
        log.info("embedding.ray_connected", address=address or "local",
                 cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))
        yield resources
    finally:
        ray.shutdown()


def _transform_of(emb: Embedder) -> Callable[[Any], torch.Tensor]:
    transform = getattr(emb, "transform", None) or getattr(getattr(emb, "inner", None),
                                                           "transform", None)
    if transform is None:
        raise EmbeddingError("the Ray backend needs an open_clip embedder (its transform "
                             "travels to the decode tasks)")
    return transform  # type: ignore[no-any-return]


def _model_config(model: str) -> dict[str, Any] | None:
    import open_clip

    cfg = open_clip.get_model_config(model)
    return dict(cfg) if cfg else None


def _dataset(planned: list[Job], stage: EmbeddingStage, emb: Embedder,
             resources: dict[str, float]) -> Any:
    import pyarrow as pa
    import ray.data

    from daemon.embedding.ray_workers import EmbedActor, decode_batch

    settings, cfg = stage.settings, stage.settings.embedding
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    columns = {
        "i": list(range(len(planned))),
        "project": [j.candidate.project for j in planned],
        "file_name": [j.candidate.file_name for j in planned],
        "path": [str(j.candidate.path) for j in planned],
        "priority": [j.candidate.priority for j in planned],
        "failed_sha": [j.failed_sha or "" for j in planned],
    }
    table = pa.table(columns)
    # several blocks per core, so decode tasks run on every core; big enough to amortise a task
    rows = max(cfg.batch_size, min(4096, math.ceil(len(planned) / (4 * cpus))))
    blocks = [table.slice(k, rows) for k in range(0, len(planned), rows)]
    side = int(getattr(emb, "image_size", 224))
    decode: Any = decode_batch  # Ray's UDF union type does not take keyword-only arguments
    ds = ray.data.from_arrow(blocks).map_batches(
        decode, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
        fn_kwargs={"image_size": side, "jpeg_draft": cfg.jpeg_draft,
                   "max_image_pixels": cfg.max_image_pixels,
                   "spng": stage.png_decoder is not None, "transform": _transform_of(emb)})
    actor_args: dict[str, Any] = {
        "cfg": cfg,
        "weights_path": str(settings.resolve(cfg.weights_path)) if cfg.weights_path else None,
        "hf_cache_dir": str(settings.resolve(cfg.hf_cache_dir)) if cfg.hf_cache_dir else None,
        "model_config": _model_config(cfg.model), "embedder_id": emb.embedder_id}
    # one actor per GPU; without GPUs one CPU actor per eight cores, each running the model
    # on its share of them (decode tasks share the cores, as the local path's threads do)
    actors = gpus or max(1, cpus // 8)
    placement: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    actor_args["cpu_threads"] = 0 if gpus else max(1, cpus // actors)
    return ds.map_batches(EmbedActor, fn_constructor_kwargs=actor_args,
                          batch_size=cfg.batch_size, batch_format="numpy", concurrency=actors,
                          **placement)


def _outcomes(batch: dict[str, np.ndarray], planned: list[Job]) -> list[Outcome]:
    import torch

    from daemon.embedding.ray_workers import INT_FIELDS, MISSING, TEXT_FIELDS

    out: list[Outcome] = []
    for k in range(len(batch["i"])):
        fields: dict[str, Any] = {n: (str(batch[n][k]) or None) for n in TEXT_FIELDS}
        fields.update({n: (None if int(batch[n][k]) == MISSING else int(batch[n][k]))
                       for n in INT_FIELDS})
        vector = batch["vector"][k]
        fields["tensor"] = (torch.from_numpy(np.array(vector))
                            if fields["kind"] == "decoded" else None)
        out.append(Outcome(job=planned[int(batch["i"][k])],
                           decode_ms=float(batch["decode_ms"][k]), **fields))
    return out


@contextmanager
def _ray_failures(address: str) -> Iterator[None]:
    """A cluster that cannot be reached, or a task or actor that failed (an embedder_id that
    differs, a node lost), is a model failure of the run (exit 1, the stage's reason in
    status), not a traceback; the daemon's own errors (state DB) pass unchanged."""
    try:
        yield
    except DaemonError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise EmbeddingError(f"the Ray run ({address or 'local'}) failed: "
                             f"{type(exc).__name__}: {text[-600:]}") from exc


class _Feeder:
    """Ray's batch iterator on a thread of its own, so the driver polls ``should_stop`` (which
    also beats the daemon's progress stamp) every second while the cluster starts actors and
    loads models, instead of blocking in ``next()`` for as long as that takes."""

    _END = object()

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._closing = threading.Event()
        self.stopped = False
        self._thread = threading.Thread(target=self._pump, args=(batches,),
                                        name="embed-ray-feeder", daemon=True)
        self._thread.start()

    def _pump(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
        except BaseException as exc:  # handed to the driver thread, raised there
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def until(self, should_stop: Callable[[], bool]) -> Iterator[dict[str, np.ndarray]]:
        while True:
            if should_stop():
                self.stopped = True
                return
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop taking batches; the thread ends at its next batch or when Ray shuts down
        (its iterator then raises), and is joined by the session's exit."""
        self._closing.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def embed_planned(stage: EmbeddingStage, planned: list[Job], tally: dict[str, int], *,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] = lambda: False,
                  address: str | None = None) -> tuple[bool, list[Issue]]:
    """Embed the planned jobs on Ray; results are written by ``stage``'s writer, batch by
    batch, on this thread.  ``tally`` holds the planner's counts (seen, cached, ...) and gets
    the writer's; returns (stopped early, the issues of bad images)."""
    require_ray()
    cfg = stage.settings.embedding
    emb = stage.embedder
    # the stage's own writer around the vectors the actors made (its class: no import cycle)
    writer = type(stage)(stage.settings, stage.store,
                         embedder=_Vectors(emb.embedder_id, emb.dim), clock=stage.clock,
                         png_decoder=None)
    issues: list[Issue] = []
    stopped, done = False, 0
    if progress is not None:
        progress(0, len(planned))
    where = cfg.ray_address if address is None else address
    batches: _Feeder | None = None
    if planned:
        with _ray_failures(where), ray_session(where, cfg.ray_local_cpus) as resources:
            batches = _Feeder(_dataset(planned, stage, emb, resources).iter_batches(
                batch_size=cfg.batch_size, batch_format="numpy",
                prefetch_batches=cfg.queue_batches), cfg.queue_batches)
            try:
                wait0 = time.perf_counter()
                for batch in batches.until(should_stop):
                    wait_ms = (time.perf_counter() - wait0) * 1000
                    outcomes = _outcomes(batch, planned)
                    issues.extend(writer._finish(outcomes, tally, wait_ms))
                    done += len(outcomes)
                    if progress is not None:
                        progress(done, len(planned))
                    wait0 = time.perf_counter()
                stopped = batches.stopped
            finally:
                batches.close()
        batches.join(timeout=30.0)  # Ray is down: its iterator has returned or raised
    log.info("embedding.ray_run_finished", embedder_id=emb.embedder_id, backend="ray",
             address=where or "local", stopped=stopped, issues=len(issues), **tally)
    return stopped, issues


def driver_embedder(settings: Settings) -> Embedder:
    """The driver's model copy, built on the CPU in fp32 (the embedder_id does not name the
    device): it is needed only for the embedder_id, the dimension and the transform."""
    from daemon.embedding.model import load_embedder

    cfg = settings.embedding
    return load_embedder(
        cfg.model_copy(update={"device": "cpu", "precision": "fp32"}),
        weights_path=settings.resolve(cfg.weights_path) if cfg.weights_path else None,
        hf_cache_dir=settings.resolve(cfg.hf_cache_dir) if cfg.hf_cache_dir else None)
