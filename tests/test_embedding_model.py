"""Model loading (weights resolution without network, device choice, embedder_id) and image
decoding (every Pillow mode to RGB, EXIF orientation, JPEG draft mode) with real files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.embedding.decode import DecodeOptions, open_oriented, to_rgb
from daemon.embedding.model import load_embedder, pick_device, pick_precision, resolve_weights
from daemon.errors import EmbeddingError
from daemon.settings import EmbeddingSettings, Settings
from tests.embedding_helpers import TINY, jpeg_bytes, photo, register_tiny, with_embedding


def _tiny_cfg(**kw: object) -> EmbeddingSettings:
    register_tiny()
    fields: dict[str, object] = {"model": TINY, "pretrained": "none", "device": "cpu"}
    fields.update(kw)
    return EmbeddingSettings(**fields)  # type: ignore[arg-type]


class TestWeights:
    def test_random_init_is_explicit_seeded_and_normalized(self) -> None:
        """pretrained = "none" builds a deterministic model and says so in its embedder_id."""
        a, b = load_embedder(_tiny_cfg()), load_embedder(_tiny_cfg())
        assert "random-init" in a.embedder_id and a.embedder_id == b.embedder_id
        batch = torch.stack([a.preprocess(photo(seed=s)) for s in range(3)])
        va, vb = a.embed(batch), b.embed(batch)
        assert va.dtype == np.float32 and va.shape == (3, a.dim) == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(va, vb)
        other = load_embedder(_tiny_cfg(random_seed=7))
        assert other.embedder_id != a.embedder_id

    def test_missing_tag_weights_name_the_key_and_paths(self, tmp_path: Path) -> None:
        """A tag absent from the local HF cache fails naming embedding.pretrained and the paths
        tried, without any download."""
        cfg = EmbeddingSettings(model="ViT-B-32", pretrained="openai")
        with pytest.raises(EmbeddingError) as err:
            resolve_weights(cfg, None, tmp_path / "hf")
        text = str(err.value)
        assert "embedding.pretrained" in text and str(tmp_path / "hf") in text
        assert "models--timm--vit_base_patch32_clip_224.openai" in text

    def test_missing_weights_file_names_the_key(self, tmp_path: Path) -> None:
        """A weights_path that does not exist fails naming embedding.weights_path."""
        missing = tmp_path / "nope.pt"
        with pytest.raises(EmbeddingError, match=r"embedding\.weights_path.*nope\.pt"):
            load_embedder(_tiny_cfg(), weights_path=missing)

    def test_unknown_tag_is_refused(self) -> None:
        """A tag open_clip does not know for the model is an error, not random weights."""
        with pytest.raises(EmbeddingError, match="not a known tag"):
            resolve_weights(_tiny_cfg(pretrained="laion-bogus"), None, None)

    def test_local_checkpoint_loads_and_is_digested(self, tmp_path: Path) -> None:
        """A local checkpoint file reproduces the saved model; its digest enters the id."""
        source = load_embedder(_tiny_cfg(random_seed=3))
        ckpt = tmp_path / "tiny.pt"
        torch.save(source._model.state_dict(), ckpt)
        loaded = load_embedder(_tiny_cfg(random_seed=0), weights_path=ckpt)
        assert "random-init" not in loaded.embedder_id and ":sha256-" in loaded.embedder_id
        batch = torch.stack([source.preprocess(photo(seed=1))])
        np.testing.assert_allclose(loaded.embed(batch), source.embed(batch), atol=1e-6)

    def test_tag_resolves_from_an_existing_hf_cache(self, tmp_path: Path) -> None:
        """A pretrained tag is found in a local Hugging Face cache snapshot, offline."""
        import open_clip.pretrained as pre

        source = load_embedder(_tiny_cfg(random_seed=5))
        pre._PRETRAINED[TINY] = {"demo": pre._pcfg(hf_hub="trainingd/tiny/")}
        snap = tmp_path / "hf" / "models--trainingd--tiny" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        torch.save(source._model.state_dict(), snap / "open_clip_pytorch_model.bin")
        (tmp_path / "hf" / "models--trainingd--tiny" / "refs").mkdir()
        (tmp_path / "hf" / "models--trainingd--tiny" / "refs" / "main").write_text("abc123")
        try:
            loaded = load_embedder(_tiny_cfg(pretrained="demo"), hf_cache_dir=tmp_path / "hf")
        finally:
            del pre._PRETRAINED[TINY]
        assert loaded.embedder_id.startswith(f"{TINY}:demo:sha256-")
        batch = torch.stack([source.preprocess(photo(seed=2))])
        np.testing.assert_allclose(loaded.embed(batch), source.embed(batch), atol=1e-6)

    def test_settings_paths_reach_the_loader(self, settings: Settings, tmp_path: Path) -> None:
        """weights_path is resolved against the config folder like every other path."""
        s = with_embedding(settings, weights_path=Path("w/missing.pt"))
        assert s.embedding.weights_path is not None
        assert s.resolve(s.embedding.weights_path) == tmp_path / "w" / "missing.pt"


class TestDevice:
    @pytest.mark.parametrize(("pref", "cuda", "mps", "want"), [
        ("auto", True, True, "cuda"), ("auto", False, True, "mps"),
        ("auto", False, False, "cpu"), ("cpu", True, True, "cpu"), ("mps", False, True, "mps"),
    ])
    def test_auto_prefers_cuda_then_mps_then_cpu(self, pref: str, cuda: bool, mps: bool,
                                                 want: str) -> None:
        """Device choice follows CUDA, then MPS, then CPU, unless forced."""
        assert pick_device(pref, cuda=cuda, mps=mps) == want

    def test_forced_absent_device_is_an_error(self) -> None:
        """Forcing CUDA on a machine without it fails instead of silently using the CPU."""
        with pytest.raises(EmbeddingError, match=r"embedding\.device"):
            pick_device("cuda", cuda=False, mps=False)

    def test_half_precision_on_gpu_only(self) -> None:
        """auto precision is fp16 on a GPU and fp32 on the CPU; an explicit choice wins."""
        assert pick_precision("auto", "cuda") == "fp16"
        assert pick_precision("auto", "cpu") == "fp32"
        assert pick_precision("bf16", "cuda") == "bf16"


OPTS = DecodeOptions(image_size=32, jpeg_draft=True, max_image_pixels=50_000_000)


class TestModes:
    def test_palette_with_transparency_goes_over_white(self) -> None:
        """A palette image's transparent index becomes white, not its hidden colour."""
        img = Image.new("P", (4, 4), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.putpixel((0, 0), 1)
        img.info["transparency"] = 0
        out = to_rgb(img)
        assert out.mode == "RGB"
        assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)

    def test_alpha_composites_over_white(self) -> None:
        """RGBA and LA images are composited over white."""
        rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
        rgba.putpixel((1, 0), (10, 20, 30, 255))
        out = to_rgb(rgba)
        assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
        assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)

    def test_sixteen_bit_png_is_scaled_not_clipped(self, tmp_path: Path) -> None:
        """A 16-bit grayscale PNG at half intensity decodes to mid-gray, not white."""
        arr = np.full((8, 8), 32768, dtype=np.uint16)
        path = tmp_path / "g16.png"
        Image.fromarray(arr).save(path)
        image, w, h = open_oriented(path.read_bytes(), OPTS)
        assert image.mode in ("I;16", "I")
        assert to_rgb(image).getpixel((3, 3)) == (128, 128, 128) and (w, h) == (8, 8)

    def test_cmyk_and_grayscale_jpeg_become_rgb(self) -> None:
        """CMYK and L JPEGs decode to RGB with sensible colours."""
        cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
        image, _, _ = open_oriented(jpeg_bytes(cmyk), OPTS)
        r, g, b = to_rgb(image).getpixel((8, 8))  # type: ignore[misc]
        assert r > 200 and g < 60 and b < 60
        gray, _, _ = open_oriented(jpeg_bytes(Image.new("L", (16, 16), 77)), OPTS)
        assert to_rgb(gray).mode == "RGB"

    def test_exif_orientation_is_applied(self) -> None:
        """A landscape JPEG tagged 'rotate 90' is decoded as portrait; stored size recorded."""
        exif = Image.Exif()
        exif[0x0112] = 6
        data = jpeg_bytes(photo(64, 32), exif=exif.tobytes())
        image, w, h = open_oriented(data, OPTS)
        assert (w, h) == (64, 32) and image.size == (32, 64)

    def test_large_jpeg_decodes_in_draft_mode(self) -> None:
        """A 2048x1024 JPEG is decoded at reduced scale, never at full size."""
        data = jpeg_bytes(photo(2048, 1024))
        image, w, h = open_oriented(data, OPTS)
        assert (w, h) == (2048, 1024)
        assert image.size[0] <= 256 and min(image.size) >= 32
        full, _, _ = open_oriented(data, DecodeOptions(32, False, 50_000_000))
        assert full.size[0] < 2048  # without draft a box reduce still shrinks before resize
        assert Image.open(io.BytesIO(data)).size == (2048, 1024)
