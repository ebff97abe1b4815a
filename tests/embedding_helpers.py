"""Helpers of the embedding tests: a tiny registered open_clip model with random weights, real
image files, settings with image roots, and an Embedder wrapper that counts model calls.

Run as a script it is the subprocess of the kill -9 test: it embeds a folder slowly (a pause
inside each model call) so the parent can kill it in the middle of a batch.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.embedding.model import OpenClipEmbedder, load_embedder
from daemon.settings import EmbeddingSettings, ProjectSettings, Settings

TINY = "trainingd-tiny"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 1},
}


def register_tiny() -> None:
    import open_clip

    open_clip.factory._MODEL_CONFIGS[TINY] = TINY_CONFIG


def with_embedding(settings: Settings, projects: dict[str, list[Path]] | None = None,
                   **embedding: Any) -> Settings:
    """A copy of ``settings`` with the tiny model (random init) and these image roots."""
    register_tiny()
    fields: dict[str, Any] = {"model": TINY, "pretrained": "none", "batch_size": 4,
                              "decode_workers": 2, "device": "cpu"}
    fields.update(embedding)
    update: dict[str, Any] = {"embedding": EmbeddingSettings(**fields)}
    if projects is not None:
        update["projects"] = {name: ProjectSettings(image_roots=roots)
                              for name, roots in projects.items()}
    new = settings.model_copy(update=update)
    new._base_dir, new._config_file = settings.base_dir, settings.config_file
    return new


class CountingEmbedder:
    """The real tiny model behind the Embedder seam, counting what reaches the model."""

    def __init__(self, inner: OpenClipEmbedder, pause_s: float = 0.0) -> None:
        self.inner = inner
        self.calls = 0
        self.images = 0
        self.pause_s = pause_s

    @property
    def embedder_id(self) -> str:
        return self.inner.embedder_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    def preprocess(self, image: Image.Image) -> Any:
        return self.inner.preprocess(image)

    def embed(self, batch: Any) -> np.ndarray:
        self.calls += 1
        self.images += int(batch.shape[0])
        if self.pause_s:
            time.sleep(self.pause_s)  # the subject's pacing in the kill test, not a test wait
        return self.inner.embed(batch)


def tiny_embedder(settings: Settings, pause_s: float = 0.0) -> CountingEmbedder:
    register_tiny()
    return CountingEmbedder(load_embedder(settings.embedding), pause_s)


# -- real image files ---------------------------------------------------------------------------

def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic colourful RGB picture (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                    ((x + y + seed * 37) % 256)], axis=-1).astype(np.int16)
    arr += rng.integers(-20, 20, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def save(image: Image.Image, path: Path, fmt: str | None = None, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_images(folder: Path, count: int, start_seed: int = 0) -> list[Path]:
    """``count`` distinct PNG/JPEG files with canonical names."""
    paths = []
    for i in range(count):
        seed = start_seed + i
        ext = ".png" if i % 2 else ".jpg"
        name = f"202501{1 + i % 28:02d}_{i:06d}_stage2_upscaled{ext}"
        paths.append(save(photo(80 + i % 5, 64, seed), folder / name))
    return paths


def _main(argv: list[str]) -> int:
    from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
    from daemon.store import StateStore

    data_root, image_root, pause = Path(argv[0]), Path(argv[1]), float(argv[2])
    settings = with_embedding(Settings().with_data_root(data_root), {"p": [image_root]},
                              batch_size=2)
    store = StateStore(settings.state_db)
    stage = EmbeddingStage(settings, store, embedder=tiny_embedder(settings, pause))
    result = stage.run(candidates_from_roots(settings))
    print(result.to_dict(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
