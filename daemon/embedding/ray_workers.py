"""The Ray backend's worker side: what runs inside Ray processes, never on the driver.

Exists apart from :mod:`.ray_backend` so the code shipped to the cluster is small and plain:
CPU tasks (:func:`decode_batch`) run the local path's :func:`prepare` on each file, actors
(:class:`EmbedActor`) run the local path's :func:`load_embedder` model.  Nothing here writes a
file or touches the state DB: results travel back to the driver, the one writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.embedding.decode import DecodeOptions, Job, configure_pillow, prepare
from daemon.errors import EmbeddingError
from daemon.records import ImageCandidate
from daemon.settings import EmbeddingSettings

if TYPE_CHECKING:
    import torch

#: the Outcome fields that travel as columns (the tensor travels as ``pixels``/``vector``)
TEXT_FIELDS = ("kind", "sha256", "code", "message", "decoder")
INT_FIELDS = ("size", "mtime_ns", "width", "height")
MISSING = -1

_png_decoder: dict[str, Any] = {}


def _worker_png_decoder(wanted: bool) -> Any:
    if not wanted:
        return None
    if "d" not in _png_decoder:
        from daemon.embedding.spng import load_spng

        _png_decoder["d"] = load_spng()
    return _png_decoder["d"]


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, jpeg_draft: bool,
                 max_image_pixels: int, spng: bool, transform: Callable[[Any], torch.Tensor]
                 ) -> dict[str, np.ndarray]:
    """A CPU task: read, hash, decode and preprocess each file with the local path's
    :func:`prepare`.  No cache lookups here (the cache may live on another box): bytes that
    already have a vector are adopted by the driver's writer, not doubled."""
    configure_pillow(max_image_pixels)
    opts = DecodeOptions(image_size, jpeg_draft, max_image_pixels, _worker_png_decoder(spng))
    outcomes = [prepare(_job(batch, k), opts, _never, transform) for k in range(len(batch["i"]))]
    shape = next((tuple(o.tensor.shape) for o in outcomes if o.tensor is not None),
                 (3, image_size, image_size))
    pixels = np.zeros((len(outcomes), *shape), dtype=np.float32)
    for k, o in enumerate(outcomes):
        if o.tensor is not None:
            pixels[k] = o.tensor.numpy()
    out: dict[str, np.ndarray] = {"i": np.asarray(batch["i"], dtype=np.int64), "pixels": pixels,
                                  "decode_ms": np.array([o.decode_ms for o in outcomes])}
    for name in TEXT_FIELDS:
        out[name] = np.array([getattr(o, name) or "" for o in outcomes], dtype=object)
    for name in INT_FIELDS:
        out[name] = np.array([MISSING if getattr(o, name) is None else getattr(o, name)
                              for o in outcomes], dtype=np.int64)
    return out


def _never(sha: str) -> bool:
    return False


def _job(batch: dict[str, np.ndarray], k: int) -> Job:
    cand = ImageCandidate(str(batch["project"][k]), str(batch["file_name"][k]),
                          Path(str(batch["path"][k])), int(batch["priority"][k]))
    failed = str(batch["failed_sha"][k])
    return Job(cand, failed_sha=failed or None)


class EmbedActor:
    """A Ray actor: the configured model on its device (the GPU Ray gave it, or the CPU)."""

    def __init__(self, cfg: EmbeddingSettings, weights_path: str | None,
                 hf_cache_dir: str | None, model_config: dict[str, Any] | None,
                 embedder_id: str, cpu_threads: int = 0) -> None:
        from daemon.embedding.model import load_embedder

        if model_config is not None:  # a config registered at runtime on the driver only
            import open_clip

            open_clip.factory._MODEL_CONFIGS.setdefault(cfg.model, model_config)
        self.embedder = load_embedder(
            cfg, weights_path=Path(weights_path) if weights_path else None,
            hf_cache_dir=Path(hf_cache_dir) if hf_cache_dir else None)
        if cpu_threads and self.embedder.device == "cpu":
            import torch

            # Ray sets OMP_NUM_THREADS to the actor's one CPU; the model on a CPU-only box
            # wants its share of cores (the decode tasks share them, as the local path's do)
            torch.set_num_threads(cpu_threads)
        if self.embedder.embedder_id != embedder_id:
            raise EmbeddingError(
                f"a Ray worker built embedder {self.embedder.embedder_id!r}, the driver "
                f"{embedder_id!r}: every node needs the same weights file, trainingd and "
                "open_clip versions")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        start = time.perf_counter()
        pixels = batch.pop("pixels")
        decoded = np.asarray(batch["kind"] == "decoded")
        vectors = np.zeros((len(decoded), self.embedder.dim), dtype=np.float32)
        if decoded.any():
            vectors[decoded] = self.embedder.embed(torch.from_numpy(
                np.ascontiguousarray(pixels[decoded])))
        batch["vector"] = vectors
        batch["infer_ms"] = np.full(len(decoded), (time.perf_counter() - start) * 1000)
        return batch
