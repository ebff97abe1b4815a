"""Issue 11, item 6: PNGs decode with libspng (GIL released), pixel for pixel as Pillow does.

Every PNG colour type and bit depth is written by a small raw encoder below (Pillow cannot write
Adam7, 16-bit RGB or 16-bit gray+alpha), decoded on both paths, and compared after the same
conversion to RGB and through the whole ``prepare`` (reduce, resize, normalise).  Bad files keep
their issue codes, the pixel limit applies before libspng inflates anything, the decoder is an
injectable seam (and absent when ``pyspng`` cannot be imported), vectors of the tiny open_clip
model agree, and the decode pool follows the CPU affinity of the process.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from daemon.embedding.decode import (
    DecodeOptions,
    Job,
    Outcome,
    configure_pillow,
    decode_image,
    open_oriented,
    prepare,
    to_rgb,
)
from daemon.embedding.spng import PngLayout, SpngDecoder, load_spng, scan_png
from daemon.records import ImageCandidate
from daemon.settings import Settings
from tests.embedding_helpers import photo, tiny_embedder, with_embedding

ROOT = Path(__file__).resolve().parents[1]
SPNG = load_spng()
needs_spng = pytest.mark.skipif(SPNG is None, reason="pyspng (libspng) is not installed")


# -- a raw PNG encoder: every colour type, depth, palette, tRNS, Adam7 ---------------------------

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _rows(samples: np.ndarray, depth: int) -> bytes:
    """Scanlines (filter 0) of a (h, w, c) sample array."""
    out = bytearray()
    for row in samples:
        out.append(0)
        flat = row.reshape(-1)
        if depth == 16:
            out += flat.astype(">u2").tobytes()
        elif depth == 8:
            out += flat.astype(np.uint8).tobytes()
        else:
            out += np.packbits(np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, -depth:]
                               .reshape(-1)).tobytes()
    return bytes(out)


def encode_png(samples: np.ndarray, color_type: int, depth: int = 8, *,
               palette: np.ndarray | None = None, trns: bytes | None = None,
               interlace: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG of ``samples`` ((h, w) or (h, w, c) integers) exactly as given."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    h, w = samples.shape[:2]
    if interlace:
        raw = b"".join(_rows(samples[y0::dy, x0::dx], depth) for x0, y0, dx, dy in _ADAM7
                       if samples[y0::dy, x0::dx].size)
    else:
        raw = _rows(samples, depth)
    body = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0,
                                       int(interlace)))
    if palette is not None:
        body += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        body += _chunk(b"tRNS", trns)
    for kind, data in extra:
        body += _chunk(kind, data)
    return (b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def _noise(h: int, w: int, c: int, high: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = ((x * 7 + y * 3)[:, :, None] * (high // 256 + 1) * np.arange(1, c + 1)) % (high + 1)
    return np.clip(base + rng.integers(0, high // 8 + 2, (h, w, c)), 0, high).squeeze()


def png_cases(h: int = 45, w: int = 37) -> dict[str, bytes]:
    """One PNG per colour type / depth / variant the issue names, plus the sub-byte ones."""
    pal = np.random.default_rng(1).integers(0, 256, (256, 3))
    cases = {
        "rgb8": encode_png(_noise(h, w, 3, 255, 0), 2),
        "rgba8": encode_png(_noise(h, w, 4, 255, 1), 6),
        "gray8": encode_png(_noise(h, w, 1, 255, 2), 0),
        "gray16": encode_png(_noise(h, w, 1, 65535, 3), 0, 16),
        "rgb16": encode_png(_noise(h, w, 3, 65535, 4), 2, 16),
        "rgba16": encode_png(_noise(h, w, 4, 65535, 5), 6, 16),
        "gray_alpha8": encode_png(_noise(h, w, 2, 255, 6), 4),
        "gray_alpha16": encode_png(_noise(h, w, 2, 65535, 7), 4, 16),
        "palette8": encode_png(_noise(h, w, 1, 255, 8), 3, palette=pal),
        "palette4": encode_png(_noise(h, w, 1, 15, 9), 3, 4, palette=pal[:16]),
        "palette1": encode_png(_noise(h, w, 1, 1, 10), 3, 1, palette=pal[:2]),
        "palette_trns": encode_png(_noise(h, w, 1, 255, 11), 3, palette=pal,
                                   trns=bytes(range(0, 256, 2))),
        "palette_one_clear": encode_png(_noise(h, w, 1, 255, 12), 3, palette=pal,
                                        trns=b"\xff" * 5 + b"\x00"),
        "rgb8_adam7": encode_png(_noise(h, w, 3, 255, 13), 2, interlace=True),
        "rgba16_adam7": encode_png(_noise(h, w, 4, 65535, 14), 6, 16, interlace=True),
        "palette_adam7": encode_png(_noise(h, w, 1, 255, 15), 3, palette=pal, interlace=True),
        "gray2": encode_png(_noise(h, w, 1, 3, 16), 0, 2),
        "gray8_trns": encode_png(_noise(h, w, 1, 255, 17), 0, trns=b"\x00\x07"),
        "rgb8_trns": encode_png(_noise(h, w, 3, 255, 18), 2, trns=b"\x00\x01\x00\x02\x00\x03"),
    }
    return cases


FAST = ("rgb8", "rgba8", "gray8", "gray16", "rgb16", "rgba16", "gray_alpha8", "gray_alpha16",
        "palette8", "palette4", "palette1", "palette_trns", "palette_one_clear", "rgb8_adam7",
        "rgba16_adam7", "palette_adam7")
PILLOW_ONLY = ("gray2", "gray8_trns", "rgb8_trns")


class RecordingDecoder:
    """The real libspng decoder behind the seam, recording what reached it."""

    def __init__(self, inner: SpngDecoder | None = None) -> None:
        self.inner = inner
        self.calls: list[PngLayout] = []

    @property
    def name(self) -> str:
        return "recording"

    def decode(self, data: bytes, layout: PngLayout) -> Image.Image | None:
        self.calls.append(layout)
        return None if self.inner is None else self.inner.decode(data, layout)


def _opts(png: Any, size: int = 32, limit: int = 50_000_000) -> DecodeOptions:
    return DecodeOptions(image_size=size, jpeg_draft=True, max_image_pixels=limit, png=png)


def _pillow_rgb(data: bytes, size: int = 32) -> np.ndarray:
    image, _, _ = open_oriented(data, _opts(None, size))
    return np.asarray(to_rgb(image))


def _fast_rgb(data: bytes, size: int = 32) -> tuple[np.ndarray, str]:
    image, _, _, who = decode_image(data, _opts(SPNG, size))
    return np.asarray(to_rgb(image)), who


@needs_spng
class TestPixelsEqualPillow:
    @pytest.mark.parametrize("case", FAST)
    def test_each_colour_type_and_depth_decodes_to_pillows_pixels(self, case: str) -> None:
        """libspng decodes every colour type, depth, palette/tRNS and Adam7 case to exactly
        Pillow's RGB pixels."""
        data = png_cases()[case]
        fast, who = _fast_rgb(data)
        assert who.startswith("libspng ")
        assert np.array_equal(fast, _pillow_rgb(data))

    @pytest.mark.parametrize("case", FAST)
    def test_reduced_large_images_match_too(self, case: str) -> None:
        """At four times the model's side the box reduce runs, and the pixels still match."""
        data = png_cases(150, 133)[case]
        fast, who = _fast_rgb(data)
        assert who.startswith("libspng ") and fast.shape[0] < 150
        assert np.array_equal(fast, _pillow_rgb(data))

    @pytest.mark.parametrize("case", PILLOW_ONLY)
    def test_colour_keys_and_sub_byte_gray_go_to_pillow(self, case: str) -> None:
        """Transparency keyed on a colour and 2-bit gray are left to Pillow, which decodes them."""
        data = png_cases()[case]
        rec = RecordingDecoder(SPNG)
        image, _, _, who = decode_image(data, _opts(rec))
        assert who == "pillow" and rec.calls == []
        assert np.array_equal(np.asarray(to_rgb(image)), _pillow_rgb(data))

    def test_pillow_written_png_matches(self, tmp_path: Path) -> None:
        """A PNG as the upstream tools write it (Pillow, text chunks) takes the fast path."""
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "steps: 30")
        info.add_text("workflow", json.dumps({"nodes": list(range(50))}))
        buf = io.BytesIO()
        photo(120, 90, 3).save(buf, "PNG", pnginfo=info)
        fast, who = _fast_rgb(buf.getvalue())
        assert who.startswith("libspng ")
        assert np.array_equal(fast, _pillow_rgb(buf.getvalue()))

    def test_large_palette_png_is_embedded_not_corrupt(self) -> None:
        """A palette PNG big enough to be reduced used to fail (Pillow cannot reduce "P"): both
        paths now expand it first and agree."""
        data = png_cases(200, 160)["palette_trns"]
        fast, _ = _fast_rgb(data)
        assert np.array_equal(fast, _pillow_rgb(data))


@needs_spng
class TestOrientation:
    def test_exif_orientation_in_a_png_goes_to_pillow_and_is_applied(self) -> None:
        """A PNG with an eXIf chunk (orientation 6) is decoded by Pillow and comes out rotated,
        as before."""
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        photo(40, 24, 4).save(buf, "PNG", exif=exif.tobytes())
        data = buf.getvalue()
        layout = scan_png(data)
        assert layout is not None and layout.pillow_only is not None
        image, width, height, who = decode_image(data, _opts(SPNG))
        assert who == "pillow" and image.size == (24, 40) and (width, height) == (40, 24)
        assert np.array_equal(np.asarray(to_rgb(image)), _pillow_rgb(data))

    @pytest.mark.parametrize("keyword", [b"Raw profile type exif", b"XML:com.adobe.xmp"])
    def test_orientation_text_chunks_go_to_pillow(self, keyword: bytes) -> None:
        """Text chunks Pillow reads an orientation from send the file to Pillow."""
        xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
        data = encode_png(_noise(20, 30, 3, 255, 0), 2,
                          extra=((b"tEXt", keyword + b"\0" + xmp),))
        image, _, _, who = decode_image(data, _opts(SPNG))
        assert who == "pillow"
        assert np.array_equal(np.asarray(to_rgb(image)), _pillow_rgb(data))


def _prepare(path: Path, png: Any, limit: int = 50_000_000) -> Outcome:
    cand = ImageCandidate("p", path.name, path)
    return prepare(Job(cand), _opts(png, limit=limit), lambda _sha: False,
                   lambda im: np.asarray(im, dtype=np.float32))  # type: ignore[arg-type,return-value]


@needs_spng
class TestBadFiles:
    def _write(self, tmp_path: Path, name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    def test_bad_files_keep_their_issue_codes(self, tmp_path: Path) -> None:
        """Zero bytes, truncated, garbage, a bad CRC and a text-only PNG give the same code on
        both paths."""
        good = png_cases()["rgb8"]
        crc_bad = bytearray(good)
        crc_bad[29] ^= 0xFF  # IHDR's CRC
        files = {"empty.png": b"", "truncated.png": good[: len(good) // 2],
                 "garbage.png": b"\x89PNG\r\n\x1a\n" + b"junk" * 40,
                 "crc.png": bytes(crc_bad), "text.png": b"hello, not an image"}
        for name, data in files.items():
            path = self._write(tmp_path, name, data)
            fast, slow = _prepare(path, SPNG), _prepare(path, None)
            assert fast.kind == slow.kind == "failed", name
            assert fast.code == slow.code, (name, fast.code, slow.code)
        assert _prepare(tmp_path / "truncated.png", SPNG).code == "image_truncated"
        assert _prepare(tmp_path / "empty.png", SPNG).code == "image_empty"

    def test_bomb_limit_applies_before_libspng_inflates(self, tmp_path: Path) -> None:
        """A PNG whose header claims 60000x60000 pixels is image_too_large and never reaches
        the decoder (it would need 10 GB)."""
        ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
        data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b""))
        rec = RecordingDecoder(SPNG)
        out = _prepare(self._write(tmp_path, "bomb.png", data), rec, limit=100_000_000)
        assert out.kind == "failed" and out.code == "image_too_large"
        assert "60000x60000" in (out.message or "") and rec.calls == []

    def test_limit_is_the_configured_one(self, tmp_path: Path) -> None:
        """The same pixel limit as Pillow's path: one pixel over it is refused before decode."""
        path = self._write(tmp_path, "a.png", png_cases(45, 37)["rgb8"])
        rec = RecordingDecoder(SPNG)
        assert _prepare(path, rec, limit=45 * 37 - 1).code == "image_too_large"
        assert rec.calls == []
        assert _prepare(path, rec, limit=45 * 37).kind == "decoded" and len(rec.calls) == 1

    def test_every_truncation_agrees_with_pillow(self) -> None:
        """Cut anywhere, a PNG is either decoded by libspng to Pillow's pixels or left to
        Pillow: never accepted by one and refused by the other."""
        configure_pillow(50_000_000)
        data = png_cases(30, 20)["rgba8"]
        for cut in range(8, len(data), 3):
            part = data[:cut]
            try:
                slow: np.ndarray | None = _pillow_rgb(part)
            except Exception:
                slow = None
            try:
                image, _, _, _ = decode_image(part, _opts(SPNG))
                fast: np.ndarray | None = np.asarray(to_rgb(image))
            except Exception:
                fast = None
            assert (fast is None) == (slow is None), cut
            if fast is not None and slow is not None:
                assert np.array_equal(fast, slow), cut

    def test_corrupt_bytes_agree_with_pillow(self) -> None:
        """Flipped bytes (CRCs recomputed, so only libspng's and zlib's own checks act) give the
        same decision and pixels on both paths."""
        rng = np.random.default_rng(5)
        data = png_cases(30, 20)["rgb8"]
        idat = data.index(b"IDAT")
        length = struct.unpack(">I", data[idat - 4: idat])[0]
        for _ in range(150):
            body = bytearray(data[idat + 4: idat + 4 + length])
            for pos in rng.integers(0, length, 2):
                body[pos] = int(rng.integers(0, 256))
            mutated = (data[: idat - 4] + _chunk(b"IDAT", bytes(body))
                       + data[idat + 4 + length + 4:])
            try:
                slow: np.ndarray | None = _pillow_rgb(mutated)
            except Exception:
                slow = None
            try:
                image, _, _, _ = decode_image(mutated, _opts(SPNG))
                fast: np.ndarray | None = np.asarray(to_rgb(image))
            except Exception:
                fast = None
            assert (fast is None) == (slow is None)
            if fast is not None and slow is not None:
                assert np.array_equal(fast, slow)


class TestDecoderSeam:
    def test_a_decoder_that_declines_falls_back_to_pillow(self, tmp_path: Path) -> None:
        """An injected decoder that returns None leaves the file to Pillow, with the same
        tensor."""
        path = tmp_path / "a.png"
        path.write_bytes(png_cases()["rgba8"])
        rec = RecordingDecoder(None)
        out, ref = _prepare(path, rec), _prepare(path, None)
        assert len(rec.calls) == 1 and out.decoder == ref.decoder == "pillow"
        assert out.tensor is not None and ref.tensor is not None
        assert np.array_equal(np.asarray(out.tensor), np.asarray(ref.tensor))

    @needs_spng
    def test_jpeg_never_reaches_the_png_decoder_and_keeps_draft_mode(self) -> None:
        """A large JPEG is decoded by Pillow in draft mode whatever PNG decoder is given."""
        buf = io.BytesIO()
        photo(1024, 768, 1).save(buf, "JPEG", quality=90)
        rec = RecordingDecoder(SPNG)
        image, width, height, who = decode_image(buf.getvalue(), _opts(rec))
        assert who == "pillow" and rec.calls == [] and (width, height) == (1024, 768)
        assert max(image.size) <= 512  # draft scaled it in the DCT domain

    @pytest.mark.slow
    def test_pyspng_unimportable_means_pillow(self, tmp_path: Path) -> None:
        """With ``pyspng`` made unimportable, a real subprocess embeds PNGs through Pillow and
        gets the vectors the libspng path gets."""
        images = tmp_path / "images"
        images.mkdir()
        for i, case in enumerate(("rgb8", "palette_trns", "gray16")):
            (images / f"2025010{i + 1}_00000{i}_stage2_upscaled.png").write_bytes(
                png_cases(140, 120)[case])
        script = (
            "import sys, json\n"
            "if sys.argv[1] == 'absent':\n"
            "    sys.modules['pyspng'] = None\n"
            "    sys.modules['pyspng._pyspng_c'] = None\n"
            "from tests.test_decode_fast import embed_folder\n"
            "print(json.dumps(embed_folder(sys.argv[2], sys.argv[3])))\n")
        docs = {}
        for mode in ("absent", "present"):
            out = subprocess.run(
                [sys.executable, "-c", script, mode, str(tmp_path / mode), str(images)],
                cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"})
            docs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        assert docs["absent"]["decoder"] == "pillow"
        if SPNG is not None:
            assert docs["present"]["decoder"].startswith("libspng ")
        assert docs["absent"]["embedded"] == docs["present"]["embedded"] == 3
        for name, vec in docs["absent"]["vectors"].items():
            cos = float(np.dot(vec, docs["present"]["vectors"][name]))
            assert cos >= 0.9999, (name, cos)


def embed_folder(data_root: str, image_root: str) -> dict[str, Any]:
    """Embed every PNG in ``image_root`` with the tiny model (the subprocess of the test
    above); the vectors by file name and which PNG decoder the stage chose."""
    from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
    from daemon.store import StateStore

    settings = with_embedding(Settings().with_data_root(Path(data_root)),
                              {"p": [Path(image_root)]})
    store = StateStore(settings.state_db)
    stage = EmbeddingStage(settings, store, embedder=tiny_embedder(settings))
    result = stage.run(candidates_from_roots(settings))
    vectors = {}
    for cand in candidates_from_roots(settings):
        row = stage.ledger.file_row(cand.project, str(cand.path))
        assert row is not None and row.sha256 is not None
        vectors[cand.file_name] = stage.cache.load(row.sha256).tolist()
    store.close()
    return {"decoder": stage.png_decoder.name if stage.png_decoder else "pillow",
            "embedded": result.embedded, "vectors": vectors}


class TestDecodeWorkers:
    def test_default_follows_the_cpu_affinity(self) -> None:
        """With ``decode_workers = 0`` the pool has one thread per core the process may use,
        read from its real affinity mask (set here in a child process)."""
        script = (
            "import os, json\n"
            "from daemon.embedding.stage import pick_decode_workers\n"
            "res = {'all': pick_decode_workers(0)}\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "res['one'] = pick_decode_workers(0)\n"
            "res['configured'] = pick_decode_workers(5)\n"
            "print(json.dumps(res))\n")
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True)
        res = json.loads(out.stdout)
        assert res == {"all": len(os.sched_getaffinity(0)), "one": 1, "configured": 5}

    def test_no_cap_at_eight(self) -> None:
        """Sixteen usable cores give sixteen decode threads (the GPU box), not eight."""
        from daemon.embedding.stage import pick_decode_workers

        assert pick_decode_workers(0, usable_cores=set(range(16))) == 16
        assert pick_decode_workers(3, usable_cores=set(range(16))) == 3
