"""What the daemon knows about its embedding model between tasks: loading state, device, rate.

Exists so that ``trainingd status`` can say "loading since 10:02:11", "loaded in 8.1 s on an
NVIDIA H200 in fp16" or "failed: weights not found" and give the backlog an ETA, without
importing torch: the worker records these facts here, the service copies them into its
heartbeat, and status reads the heartbeat.  Also decides which settings changes need a new
model (a reload that changes only ``batch_size`` must not cost an 8 s model load).

:class:`EmbedderLifecycle` owns the embedding stage across tasks: loaded when first needed (on
the heavy lane, the GPU's one user), kept across reloads that do not change the model, disabled
with a reason when the model cannot be had.  Nothing at import time pulls in torch: the stage
and the device description are imported when a model is loaded.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from daemon.errors import EmbeddingError
from daemon.settings import EmbeddingSettings, Settings
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.embedding.stage import EmbeddingStage, EmbedResult
    from daemon.store.db import StateStore

log = structlog.get_logger("embedding")
#: the longest a model load may take before it counts as a stall (cold disk, CUDA init)
MODEL_LOAD_SECONDS = 600.0

#: the keys that decide which weights, on which device, in which precision produce a vector
#: (and the embedder_id): a change of any of them needs a new model; the others (batch size,
#: decode threads, queue depth, pixel limit) only a new stage around the same model
MODEL_KEYS = ("model", "pretrained", "weights_path", "hf_cache_dir", "random_seed", "device",
              "precision", "jpeg_draft")
#: runs the recent rate is measured over
RATE_RUNS = 10


@dataclass(frozen=True, slots=True)
class ModelState:
    """``not_loaded`` -> ``loading`` -> ``loaded`` | ``failed``; ``since`` is when it entered
    the state (ISO UTC)."""

    state: str = "not_loaded"
    since: str | None = None
    load_seconds: float | None = None
    error: str | None = None
    embedder_id: str | None = None
    loads: int = 0  # models loaded by this process (a reload that keeps the model: unchanged)
    device: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "load_seconds": self.load_seconds,
                "error": self.error, "embedder_id": self.embedder_id, "loads": self.loads,
                **self.device}

    def with_device(self, device: dict[str, Any]) -> ModelState:
        return replace(self, device=dict(device))


class EmbedRate:
    """Images per second over the last few embedding runs that embedded something."""

    def __init__(self, runs: int = RATE_RUNS) -> None:
        self._runs: deque[tuple[int, float]] = deque(maxlen=runs)

    def add(self, images: int, seconds: float) -> None:
        if images > 0 and seconds > 0:
            self._runs.append((images, seconds))

    def to_dict(self) -> dict[str, Any]:
        images = sum(n for n, _ in self._runs)
        seconds = sum(s for _, s in self._runs)
        return {"images_per_second": round(images / seconds, 2) if seconds else None,
                "images": images, "seconds": round(seconds, 3), "runs": len(self._runs)}


def model_settings(settings: Settings) -> tuple[Any, ...]:
    """The model's identity as configured, paths resolved (a relative path is not a change)."""
    cfg: EmbeddingSettings = settings.embedding
    values: list[Any] = []
    for key in MODEL_KEYS:
        value = getattr(cfg, key)
        values.append(settings.resolve(value) if key.endswith(("_path", "_dir")) and value
                      else value)
    return tuple(values)


def needs_new_model(old: Settings, new: Settings) -> bool:
    return model_settings(old) != model_settings(new)


class AllowStep(Protocol):
    """:meth:`daemon.health.Progress.allow` as the lifecycle calls it."""

    def __call__(self, seconds: float, note: str, *, abandonable: bool = False) -> None: ...


def _no_allow(seconds: float, note: str, *, abandonable: bool = False) -> None:
    """No progress stamp to tell (one-shot commands)."""


class EmbedderLifecycle:
    """The embedding stage between tasks: ``not_loaded`` -> ``loading`` -> ``loaded`` or
    ``failed`` (disabled until a reload).  ``model`` and ``rate`` are read by the heartbeat
    on the main thread: they are replaced whole, never mutated."""

    def __init__(self, settings: Settings, store: StateStore, *, embedder: Any = None,
                 allow: AllowStep | None = None) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder  # an injected Embedder (tests, the demo), or None: load one
        self.allow: AllowStep = allow if allow is not None else _no_allow
        self.stage: EmbeddingStage | None = None
        self.disabled: str | None = None
        self.model = ModelState()
        self.rate = EmbedRate()

    def ready_stage(self) -> EmbeddingStage | None:
        """The loaded stage, loading the model if needed; None while disabled."""
        if self.stage is not None or self.disabled is not None:
            return self.stage
        # a cold start (importing torch, disk, CUDA init) may take minutes: a bounded step, not
        # a stall; and it writes nothing, so a SIGTERM meanwhile still ends in a clean stop
        self.allow(MODEL_LOAD_SECONDS, "loading the embedding model", abandonable=True)
        try:
            from daemon.embedding.stage import EmbeddingStage

            started, loads = time.monotonic(), self.model.loads
            self.model = ModelState("loading", since=_now(), loads=loads)
            stage = EmbeddingStage(self.settings, self.store, embedder=self.embedder)
            self.allow(MODEL_LOAD_SECONDS, "loading the embedding model", abandonable=True)
            _ = stage.embedder  # load now: missing weights must surface here, not later
            from daemon.embedding.model import describe_device

            self.stage = stage
            self.model = ModelState(
                "loaded", since=_now(), load_seconds=round(time.monotonic() - started, 3),
                embedder_id=stage.embedder.embedder_id, loads=loads + (self.embedder is None),
                device=describe_device(stage.embedder))
            log.info("embedding.stage_ready", embedder_id=stage.embedder.embedder_id,
                     load_seconds=self.model.load_seconds, loads=self.model.loads)
        except (ImportError, EmbeddingError) as exc:
            self.fail(exc, event="embedding.stage_disabled")
        return self.stage

    def fail(self, exc: BaseException, *, event: str = "embedding.stage_failed") -> None:
        """The model cannot be had or broke: disabled until a reload (the candidates stay
        recorded in the image index)."""
        self.disabled = str(exc)
        self.stage = None
        self.model = ModelState("failed", since=_now(), error=str(exc)[:2000],
                                loads=self.model.loads)
        log.error(event, reason=str(exc))

    def ran(self, result: EmbedResult) -> None:
        """The recent rate and the device's memory, for the heartbeat (status ETA and GPU)."""
        self.rate.add(result.embedded, result.duration_s)
        if result.embedded and self.stage is not None:
            from daemon.embedding.model import describe_device

            self.model = self.model.with_device(describe_device(self.stage.embedder))

    def reconfigure(self, settings: Settings) -> None:
        """Apply reloaded settings, keeping a loaded model whose own settings did not change
        (a model load costs seconds; a new stage around it costs nothing)."""
        old, self.settings = self.settings, settings
        if self.stage is not None and not needs_new_model(old, settings):
            if old.embedding != settings.embedding or old.cache_dir != settings.cache_dir:
                from daemon.embedding.stage import EmbeddingStage

                self.stage = EmbeddingStage(settings, self.store, embedder=self.stage.embedder)
            log.info("embedding.model_kept", embedder_id=self.model.embedder_id)
            return
        if self.stage is not None:
            log.info("embedding.model_dropped", embedder_id=self.model.embedder_id,
                     reason="embedding settings changed; loaded again when next needed")
        self.stage = None
        self.disabled = None  # a reload is the operator's retry of a failed load
        self.model = ModelState(loads=self.model.loads)


def _now() -> str:
    return iso_utc(datetime.now(UTC))
