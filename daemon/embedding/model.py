"""The CLIP model behind the cache: weights resolution, device choice, the ``Embedder`` seam.

Exists so that exactly one place decides which weights produce a vector and names them in an
``embedder_id``.  It must never download anything: a pretrained tag is resolved only from an
existing local Hugging Face cache, and missing weights raise :class:`EmbeddingError` naming the
config key and every path tried.  Random weights happen only on an explicit
``pretrained = "none"`` and are then written into the embedder_id (``random-init``).
torch and open_clip are imported inside functions: ``trainingd status`` must not pay for them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from daemon.errors import EmbeddingError
from daemon.files import sha256_file

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from daemon.settings import EmbeddingSettings

log = structlog.get_logger("embedding")

#: Bump when decoding or preprocessing changes the pixels the model sees (mode conversion,
#: EXIF handling, resize): vectors of another version are not comparable.
PREPROCESS_VERSION = 1
_HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class Embedder(Protocol):
    """What the extraction pipeline needs from a model (tests count calls through it).  An
    optional ``image_size`` attribute (the model's input side) sizes JPEG draft decoding;
    without it 224 is assumed."""

    @property
    def embedder_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> the model's input tensor (C, H, W).  Thread-safe."""
        ...

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) -> (N, dim) L2-normalized float32 vectors."""
        ...


@dataclass(frozen=True, slots=True)
class ResolvedWeights:
    """Which weights a model gets: a local file, or explicit random init."""

    path: Path | None  # None: random init
    label: str  # the tag, "file" or "random-init"
    pretrained_cfg: dict[str, Any]


def pick_device(preference: str, *, cuda: bool, mps: bool) -> str:
    """``auto`` -> CUDA, then MPS, then CPU; a forced device that is absent is an error."""
    if preference == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (preference == "cuda" and not cuda) or (preference == "mps" and not mps):
        raise EmbeddingError(
            f"embedding.device = {preference!r}, but no {preference.upper()} device is available"
        )
    return preference


def pick_precision(preference: str, device: str) -> str:
    """``auto``: half precision on a GPU, fp32 on the CPU."""
    if preference != "auto":
        return preference
    return "fp16" if device in ("cuda", "mps") else "fp32"


def resolve_weights(cfg: EmbeddingSettings, weights_path: Path | None,
                    hf_cache_dir: Path | None) -> ResolvedWeights:
    """Find the weights file without any network access; raise naming what was tried."""
    import open_clip

    tag = cfg.pretrained.strip()
    pcfg: dict[str, Any] = {}
    if tag.lower() != "none":
        pcfg = dict(open_clip.get_pretrained_cfg(cfg.model, tag) or {})
    if weights_path is not None:
        if not weights_path.is_file():
            raise EmbeddingError(
                f"embedding.weights_path = {str(weights_path)!r}: no such file "
                f"(tried {weights_path})"
            )
        return ResolvedWeights(weights_path, "file" if not pcfg else tag, pcfg)
    if tag.lower() == "none":
        return ResolvedWeights(None, "random-init", {})
    if not pcfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(cfg.model)) or "none"
        raise EmbeddingError(
            f"embedding.pretrained = {tag!r} is not a known tag of model {cfg.model!r} "
            f"(known: {known}); set embedding.weights_path to a local checkpoint instead"
        )
    tried: list[str] = []
    hub = str(pcfg.get("hf_hub") or "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        # open_clip's convention: "org/repo/" means the default file names, "org/repo/f.bin"
        # one file (whose .safetensors twin is preferred)
        repo_id, file_name = os.path.split(hub)
        names: tuple[str, ...] = _HF_WEIGHT_NAMES
        if file_name:
            stem, ext = os.path.splitext(file_name)
            names = (stem + ".safetensors", file_name) if ext in (".bin", ".pth") else (file_name,)
        cache = str(hf_cache_dir) if hf_cache_dir else HF_HUB_CACHE
        for name in names:
            # reads the local snapshot only: this call never opens a connection
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache)
            tried.append(f"{cache}/models--{repo_id.replace('/', '--')}/snapshots/*/{name}")
            if isinstance(hit, str) and Path(hit).is_file():
                return ResolvedWeights(Path(hit), tag, pcfg)
    raise EmbeddingError(
        f"embedding.pretrained = {tag!r}: weights for {cfg.model} are not in the local Hugging "
        f"Face cache and are never downloaded; tried: {'; '.join(tried) or '(no hf_hub entry)'}. "
        "Set embedding.weights_path to a local checkpoint, embedding.hf_cache_dir to the cache "
        "holding them, or pretrained = \"none\" for random weights (tests and demos only)"
    )


def make_embedder_id(model: str, weights: ResolvedWeights, digest: str | None, seed: int,
                     jpeg_draft: bool) -> str:
    pp = f"pp{PREPROCESS_VERSION}{'-draft' if jpeg_draft else ''}"
    if weights.path is None:
        return f"{model}:random-init-seed{seed}:{pp}"
    return f"{model}:{weights.label}:sha256-{(digest or '')[:16]}:{pp}"


class OpenClipEmbedder:
    """The image tower of an open_clip model on one device."""

    def __init__(self, model: Any, preprocess: Any, *, embedder_id: str, device: str,
                 precision: str, image_size: int, dim: int) -> None:
        self._model = model
        self._preprocess = preprocess
        self._id = embedder_id
        self.device = device
        self.precision = precision
        self._image_size = image_size
        self._dim = dim

    @property
    def embedder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def transform(self) -> Any:
        """open_clip's preprocessing transform alone (picklable, without the model): what the
        Ray backend's decode tasks run."""
        return self._preprocess

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self._preprocess(image)
        return tensor

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision,
                                                                     torch.float32)
        with torch.inference_mode():
            x = batch.to(self.device, dtype=dtype, non_blocking=True)
            feats = self._model.encode_image(x).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        out: np.ndarray = feats.cpu().numpy().astype("float32", copy=False)
        return out


def load_embedder(cfg: EmbeddingSettings, *, weights_path: Path | None = None,
                  hf_cache_dir: Path | None = None) -> OpenClipEmbedder:
    """Build the configured model (paths already resolved by the caller's settings)."""
    started = time.perf_counter()
    # a phase of its own: importing torch and building the model takes 10-20 s on a small box
    log.info("embedding.model_loading", model=cfg.model, pretrained=cfg.pretrained,
             device=cfg.device)
    import open_clip
    import torch

    weights = resolve_weights(cfg, weights_path, hf_cache_dir)
    device = pick_device(cfg.device, cuda=torch.cuda.is_available(),
                         mps=torch.backends.mps.is_available())
    precision = pick_precision(cfg.precision, device)
    digest = sha256_file(weights.path, follow_links=True) if weights.path is not None else None
    kwargs: dict[str, Any] = {}
    pcfg = weights.pretrained_cfg
    if pcfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                     ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if pcfg.get(key):
            kwargs[arg] = pcfg[key]
    torch.manual_seed(cfg.random_seed)  # random init is deterministic under its seed
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=str(weights.path) if weights.path else None,
            precision=precision, device=device, weights_only=True, **kwargs)
    except RuntimeError as exc:  # shape mismatch: the file is not this model's weights
        raise EmbeddingError(f"embedding: cannot load {weights.path} into {cfg.model}: {exc}"
                             ) from exc
    model.eval()
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, tuple | list) else size)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device,
                            dtype=next(model.parameters()).dtype)
        dim = int(model.encode_image(probe).shape[-1])
    embedder_id = make_embedder_id(cfg.model, weights, digest, cfg.random_seed, cfg.jpeg_draft)
    if weights.path is None:
        log.warning("embedding.random_weights", model=cfg.model, embedder_id=embedder_id,
                    hint='pretrained = "none": vectors are for tests and demos only')
    log.info("embedding.model_loaded", model=cfg.model, embedder_id=embedder_id, device=device,
             precision=precision, dim=dim, weights=str(weights.path) if weights.path else None,
             seconds=round(time.perf_counter() - started, 2))
    return OpenClipEmbedder(model, preprocess, embedder_id=embedder_id, device=device,
                            precision=precision, image_size=image_size, dim=dim)


def describe_device(embedder: object) -> dict[str, Any]:
    """What ``trainingd status`` shows of the device the model runs on: name, precision and
    memory (bytes).  Called on the worker thread after a load or a run, never by ``status``
    (which must not import torch); every fact that cannot be read is ``None``, never raised."""
    device = getattr(embedder, "device", None)
    facts: dict[str, Any] = {"device": None if device is None else str(device),
                             "precision": getattr(embedder, "precision", None),
                             "device_name": None, "memory_total_bytes": None,
                             "memory_used_bytes": None, "memory_process_bytes": None}
    if device is None:
        return facts
    try:
        if str(device).startswith("cuda"):
            facts.update(_cuda_facts(str(device)))
        elif str(device) == "cpu":
            facts.update(_cpu_facts())
        elif str(device) == "mps":
            import torch

            facts["device_name"] = "Apple MPS"
            facts["memory_process_bytes"] = int(torch.mps.current_allocated_memory())
    except Exception as exc:  # a driver hiccup must not cost the heartbeat
        log.warning("embedding.device_facts_failed", device=str(device), error=repr(exc)[:300])
    return facts


def _cuda_facts(device: str) -> dict[str, Any]:
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    return {"device_name": torch.cuda.get_device_name(index), "memory_total_bytes": int(total),
            "memory_used_bytes": int(total - free),
            "memory_process_bytes": int(torch.cuda.memory_reserved(index))}


def _cpu_facts() -> dict[str, Any]:
    import platform

    name = platform.processor() or None
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name")), name)
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                meminfo[key] = int(rest.split()[0]) * 1024
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    total = meminfo.get("MemTotal")
    available = meminfo.get("MemAvailable")
    return {"device_name": name or "CPU", "memory_total_bytes": total,
            "memory_used_bytes": total - available if total and available else None,
            "memory_process_bytes": rss}
