"""What the daemon knows about its embedding model between tasks: loading state, device, rate.

Exists so that ``trainingd status`` can say "loading since 10:02:11", "loaded in 8.1 s on an
NVIDIA H200 in fp16" or "failed: weights not found" and give the backlog an ETA, without
importing torch: the worker records these facts here, the service copies them into its
heartbeat, and status reads the heartbeat.  Also decides which settings changes need a new
model (a reload that changes only ``batch_size`` must not cost an 8 s model load).
Pure bookkeeping: nothing here imports torch, touches files or raises.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.settings import EmbeddingSettings, Settings

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
