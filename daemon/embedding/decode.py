"""Read, hash, decode and preprocess one image file: the work of the decode threads.

Exists so every way an image file can be bad becomes an outcome with a stable issue code
instead of an exception that stops a batch.  It must not touch the state DB or the cache
files (the writer thread owns them); it only asks ``has_vector(sha)`` so that bytes already
embedded (a moved or renamed file, the same file in another project) are never decoded again.
All work here releases the GIL for most of its time (file reads, SHA-256, libspng or Pillow
decoding, resizing, tensor normalisation), so plain threads overlap with model inference and
with each other: the decode pool scales with the cores the process may use.

PNGs go to a faster decoder when one is given (:class:`PngDecoder`; libspng from
:mod:`.spng` in the stage), and only when it gives exactly Pillow's pixels; everything else,
and every file it cannot decode, goes through Pillow, whose exceptions name the issue.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.embedding.spng import PngLayout, read_png_header, scan_png
from daemon.files import NotRegularFileError, read_regular
from daemon.records import ImageCandidate

if TYPE_CHECKING:
    import torch

OutcomeKind = Literal["decoded", "cached", "failed", "same_failure"]
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_EXIF_ORIENTATION = 0x0112
#: modes ``Image.reduce`` accepts; others ("P", "1", "I;16") become RGB first
_REDUCE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "I", "F"})
PILLOW = "pillow"
_pillow_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Job:
    """One file to examine, with what the planner knew of it."""

    candidate: ImageCandidate
    failed_sha: str | None = None  # bytes that failed before: not decoded again


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    kind: OutcomeKind
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    tensor: torch.Tensor | None = None
    code: str | None = None
    message: str | None = None
    decode_ms: float = 0.0
    decoder: str | None = None  # who decoded the pixels: "pillow" or the PNG decoder's name


class PngDecoder(Protocol):
    """A PNG decoder faster than Pillow's (the seam: tests inject one, or none)."""

    @property
    def name(self) -> str: ...

    def decode(self, data: bytes, layout: PngLayout) -> Image.Image | None:
        """Pillow's image for ``data`` (same mode and pixels; a palette comes back expanded
        through its tRNS), or ``None``: Pillow decodes the file instead."""
        ...


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    image_size: int
    jpeg_draft: bool
    max_image_pixels: int
    png: PngDecoder | None = None  # None: Pillow decodes PNGs too


def configure_pillow(max_image_pixels: int) -> None:
    """Pillow's decompression-bomb limit from config; its warning range becomes an error, so a
    too-large image is an outcome, never a half-loaded image or a line on stderr.  (Process
    wide: ``filterwarnings`` replaces an identical filter, so calling this again is harmless.)"""
    with _pillow_lock:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit scaled (not clipped), alpha over white, palette
    expanded through its transparency, CMYK and others through Pillow's converters."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        # convert("L") would clip 16-bit samples at 255 and turn most of the picture white
        arr = np.asarray(image, dtype=np.float32) / 257.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        if image.mode == "RGB":
            return image
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _too_large(width: int, height: int, limit: int) -> Image.DecompressionBombError:
    return Image.DecompressionBombError(
        f"{width}x{height} = {width * height} pixels > embedding.max_image_pixels = {limit}")


def open_oriented(data: bytes, opts: DecodeOptions) -> tuple[Image.Image, int, int]:
    """Decode ``data`` (raising Pillow's exceptions) with draft mode and EXIF orientation;
    returns the image and the stored width and height."""
    image: Image.Image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > opts.max_image_pixels:
        raise _too_large(width, height, opts.max_image_pixels)
    if opts.jpeg_draft and image.format == "JPEG":
        # DCT-domain downscale (1/2, 1/4, 1/8) to no less than the model's input size
        image.draft("RGB", (opts.image_size, opts.image_size))
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    image.load()
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return shrink(image, opts.image_size), width, height


def shrink(image: Image.Image, image_size: int) -> Image.Image:
    """A box reduce when the image is at least 4x the model's input: cheap, and it keeps the
    final bicubic resize small and antialiased.  A mode ``reduce`` refuses (a palette, 1-bit,
    16-bit gray) is made RGB first (it used to be reported as image_corrupt)."""
    short = min(image.size)
    if short < 4 * image_size:
        return image
    if image.mode not in _REDUCE_MODES:
        image = to_rgb(image)
    return image.reduce(short // (2 * image_size))


def decode_image(data: bytes, opts: DecodeOptions) -> tuple[Image.Image, int, int, str]:
    """``data`` -> (image, ready for :func:`to_rgb`; stored width; height; who decoded it).
    Raises Pillow's exceptions for a bad file.  A PNG's size is checked against the pixel
    limit from its header before any decoder inflates a byte."""
    png = opts.png
    header = read_png_header(data) if png is not None else None
    if png is not None and header is not None:
        width, height = header.width, header.height
        if width * height > opts.max_image_pixels:
            raise _too_large(width, height, opts.max_image_pixels)
        layout = scan_png(data)
        if layout is not None and layout.pillow_only is None:
            image = png.decode(data, layout)
            if image is not None:
                if header.color_type == 3:
                    # Pillow's path expands a palette (over white, through its tRNS) before
                    # any reduce, since "P" cannot be reduced: the same order here
                    image = to_rgb(image)
                return shrink(image, opts.image_size), width, height, png.name
    image, width, height = open_oriented(data, opts)
    return image, width, height, PILLOW


def _failure(job: Job, code: str, message: str, **kw: Any) -> Outcome:
    return Outcome(job=job, kind="failed", code=code, message=message, **kw)


def prepare(job: Job, opts: DecodeOptions, has_vector: Callable[[str], bool],
            preprocess: Callable[[Image.Image], torch.Tensor]) -> Outcome:
    """Read, hash and (unless the bytes are cached) decode one file.  Never raises for a bad
    file: every failure is an :class:`Outcome` with an issue code."""
    start = time.perf_counter()
    path = job.candidate.path
    try:
        # never a plain open(): a FIFO named x.png would block this thread, and the worker
        # waiting on it, forever
        data, st = read_regular(path)
    except NotRegularFileError as exc:
        if exc.what == "a folder":  # a plain mistake, reported as before (image_unreadable)
            return _failure(job, "image_unreadable", "cannot read the file: it is a folder")
        return _failure(job, "image_not_regular",
                        f"{exc.what}, not a regular file: trainingd reads only regular files in "
                        "image roots; replace it with the image file or remove it")
    except FileNotFoundError:
        return _failure(job, "image_vanished", "the file disappeared before it could be read")
    except OSError as exc:
        return _failure(job, "image_unreadable", f"cannot read the file: {exc.strerror or exc}")
    size, mtime_ns = st.st_size, st.st_mtime_ns
    if not data:
        return _failure(job, "image_empty", "the file has zero bytes", size=size,
                        mtime_ns=mtime_ns)
    sha = hashlib.sha256(data).hexdigest()
    if sha == job.failed_sha:
        return Outcome(job=job, kind="same_failure", sha256=sha, size=size, mtime_ns=mtime_ns)
    if has_vector(sha):
        width = height = None
        header = read_png_header(data)
        if header is not None:
            width, height = header.width, header.height
        else:
            try:  # header only: the size is worth recording, the pixels are not worth decoding
                with Image.open(io.BytesIO(data)) as probe:
                    width, height = probe.size
            except Exception:  # the vector exists; a size is optional
                pass
        return Outcome(job=job, kind="cached", sha256=sha, width=width, height=height,
                       size=size, mtime_ns=mtime_ns)
    bad: dict[str, Any] = {"sha256": sha, "size": size, "mtime_ns": mtime_ns}
    try:
        image, width, height, decoder = decode_image(data, opts)
        tensor = preprocess(to_rgb(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _failure(job, "image_too_large", str(exc), **bad)
    except UnidentifiedImageError:
        return _failure(job, "image_not_an_image",
                        f"not an image Pillow can identify ({len(data)} bytes)", **bad)
    except (OSError, EOFError, SyntaxError) as exc:
        text = str(exc) or type(exc).__name__
        truncated = isinstance(exc, EOFError) or "truncated" in text or "broken" in text
        code = "image_truncated" if truncated else "image_corrupt"
        return _failure(job, code, f"decoding failed: {text}", **bad)
    except (ValueError, TypeError, MemoryError) as exc:
        return _failure(job, "image_corrupt", f"decoding failed: {exc!r}", **bad)
    return Outcome(job=job, kind="decoded", sha256=sha, width=width, height=height,
                   tensor=tensor, decode_ms=(time.perf_counter() - start) * 1000, size=size,
                   mtime_ns=mtime_ns, decoder=decoder)
