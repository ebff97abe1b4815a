"""PNG decoding with libspng, called so that decode threads really run in parallel.

Why it exists: the workflow's images are PNGs, and on a GPU box the model is ~100x faster than
one core's decode, so embedding throughput is decode throughput.  libspng decodes a PNG in
about half of Pillow's time.  ``pyspng.load`` is the obvious way to call it, but its pybind11
binding holds the GIL for the whole decode: sixteen decode threads would decode one image at a
time, and the model thread would stall behind each one.  So this module calls the libspng that
the ``pyspng`` wheel ships through :mod:`ctypes`, which releases the GIL for every foreign call.
If the wheel is missing, or its library is not libspng 0.7 with the symbols used here,
:func:`load_spng` returns ``None`` and Pillow decodes everything, as before.

What it must not do: decide anything about a bad image, or produce pixels Pillow would not.
:func:`scan_png` sends every file whose pixels or orientation could differ from Pillow's path
(EXIF/XMP orientation, transparency keyed on a colour, sub-byte gray, APNG, compressed text
that Pillow limits) to Pillow, and :meth:`SpngDecoder.decode` returns ``None`` for any libspng
error, so Pillow decodes the file again and its exceptions give the issue code.  Every image
this module returns is, pixel for pixel, what Pillow's ``open().load()`` returns (proved per
PNG colour type and bit depth in ``tests/test_decode_fast.py``).
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np
import structlog
from PIL import Image

log = structlog.get_logger("embedding")

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: text keywords whose values Pillow's ``getexif()`` reads an orientation from (eXIf chunks and
#: these are the only PNG sources of an orientation in Pillow)
_ORIENTATION_KEYWORDS = frozenset({b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp",
                                   b"xmp"})
_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
#: Pillow refuses PNGs whose text totals more than this (PngImagePlugin.MAX_TEXT_MEMORY)
_PILLOW_TEXT_MEMORY = 64 * 1024 * 1024

# libspng 0.7 (spng.h): output formats, decode flags, CRC actions
_FMT_RGBA8, _FMT_RGB8, _FMT_PNG = 1, 4, 256
_DECODE_TRNS = 1
_CRC_ERROR = 0
_CHUNK_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PngHeader:
    """The IHDR fields that decide how a PNG is decoded."""

    width: int
    height: int
    bit_depth: int
    color_type: int  # 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA
    interlace: int


@dataclass(frozen=True, slots=True)
class PngLayout:
    """What the chunk walk found: the header, a ``tRNS`` chunk, and why (if so) only Pillow
    may decode this file."""

    header: PngHeader
    has_trns: bool
    pillow_only: str | None = None


def read_png_header(data: bytes) -> PngHeader | None:
    """The IHDR of ``data`` (always the first chunk, at a fixed offset): a PNG's size is known
    before a byte of pixels is inflated.  ``None`` when ``data`` is not a PNG."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, color, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    return PngHeader(width, height, depth, color, interlace)


def scan_png(data: bytes) -> PngLayout | None:
    """Walk the chunk headers (no inflating: ~1 ms for a large file) to find what decides the
    decoder.  ``None``: not a well-formed chunk sequence, so Pillow decodes (and reports) it."""
    header = read_png_header(data)
    if header is None or struct.unpack_from(">I", data, 8)[0] != 13:
        return None
    pos, end = 8, len(data)
    has_trns = False
    text = 0
    reason: str | None = None
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if body + length + 4 > end:
            return None
        if kind == b"IEND":
            break
        if kind == b"tRNS":
            has_trns = True
        elif kind in (b"eXIf", b"acTL") and reason is None:
            reason = "an eXIf chunk (EXIF orientation)" if kind == b"eXIf" else "APNG"
        elif kind in _TEXT_CHUNKS:
            text += length
            keyword = data[body:body + min(length, 80)].split(b"\0", 1)[0]
            compressed = kind == b"zTXt" or (
                kind == b"iTXt" and length > len(keyword) + 1 and data[body + len(keyword) + 1])
            if keyword in _ORIENTATION_KEYWORDS and reason is None:
                reason = f"a {keyword.decode('latin-1')!r} text chunk (orientation)"
            elif compressed and reason is None:
                reason = "compressed text (Pillow limits its size)"
        pos = body + length + 4
    else:
        return None  # no IEND: truncated, or trailing bytes that are not chunks
    if text > _PILLOW_TEXT_MEMORY and reason is None:
        reason = "more text than Pillow accepts"
    if reason is None:
        reason = _unsupported(header, has_trns)
    return PngLayout(header, has_trns, reason)


def _unsupported(h: PngHeader, has_trns: bool) -> str | None:
    """Colour types and depths whose Pillow pixels this module reproduces exactly: all but
    sub-byte gray (Pillow keeps mode "1") and a tRNS colour key on gray or RGB (Pillow keeps it
    in ``info`` and applies it later, after a reduce)."""
    if h.color_type == 3:
        return None if h.bit_depth in (1, 2, 4, 8) else "an invalid palette depth"
    if h.bit_depth not in (8, 16) or h.color_type not in (0, 2, 4, 6):
        return f"colour type {h.color_type} at {h.bit_depth} bits"
    if has_trns:
        return "a tRNS colour key"
    return None


class SpngDecoder:
    """libspng through ctypes (the GIL is released while it inflates)."""

    def __init__(self, lib: ctypes.CDLL, version: str) -> None:
        self._lib = lib
        self.name = f"libspng {version}"

    def decode(self, data: bytes, layout: PngLayout) -> Image.Image | None:
        """The image Pillow's ``open().load()`` gives for ``data`` (same mode, same pixels),
        except a palette image, which comes back expanded (RGB, or RGBA through its tRNS) as
        Pillow's ``convert`` expands it.  ``None`` on any libspng error: Pillow decides."""
        h = layout.header
        if h.color_type == 3:
            fmt, flags = (_FMT_RGBA8, _DECODE_TRNS) if layout.has_trns else (_FMT_RGB8, 0)
        else:  # the samples as stored (16-bit ones host-endian), narrowed below as Pillow does
            fmt, flags = _FMT_PNG, 0
        raw = self._decode(data, fmt, flags)
        if raw is None:
            return None
        shape = (h.height, h.width)
        if h.color_type == 3:
            return Image.fromarray(raw.reshape(*shape, 4 if layout.has_trns else 3))
        if h.bit_depth == 8:
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[h.color_type]
            # the array's shape picks Pillow's mode: L, LA, RGB, RGBA
            return Image.fromarray(raw.reshape(shape) if channels == 1
                                   else raw.reshape(*shape, channels))
        wide = raw.view(np.uint16)
        if h.color_type == 0:
            return Image.fromarray(wide.reshape(shape))  # "I;16", unscaled, as Pillow
        # Pillow's 16-bit unpackers ("RGB;16B", "RGBA;16B", "LA;16B") keep the high byte
        high = (wide >> 8).astype(np.uint8)
        if h.color_type == 2:
            return Image.fromarray(high.reshape(*shape, 3))
        if h.color_type == 6:
            return Image.fromarray(high.reshape(*shape, 4))
        gray_alpha = high.reshape(*shape, 2)  # Pillow opens 16-bit gray+alpha as RGBA
        gray = gray_alpha[..., 0]
        return Image.fromarray(np.stack([gray, gray, gray, gray_alpha[..., 1]], axis=-1))

    def _decode(self, data: bytes, fmt: int, flags: int) -> np.ndarray | None:
        lib = self._lib
        ctx = lib.spng_ctx_new(0)
        if not ctx:
            return None
        try:
            size = ctypes.c_size_t(0)
            # any CRC error, critical or not, stops libspng: Pillow then decides (it refuses a
            # bad CRC in any chunk before the image data)
            if lib.spng_set_crc_action(ctx, _CRC_ERROR, _CRC_ERROR) \
                    or lib.spng_set_chunk_limits(ctx, _CHUNK_LIMIT, _CHUNK_LIMIT) \
                    or lib.spng_set_png_buffer(ctx, data, len(data)) \
                    or lib.spng_decoded_image_size(ctx, fmt, ctypes.byref(size)):
                return None
            out = np.empty(size.value, dtype=np.uint8)
            # the one long call: ctypes drops the GIL for it
            if lib.spng_decode_image(ctx, out.ctypes.data, size.value, fmt, flags):
                return None
            return out
        finally:
            lib.spng_ctx_free(ctx)


def load_spng() -> SpngDecoder | None:
    """libspng from the installed ``pyspng`` wheel, or ``None`` (then Pillow decodes PNGs);
    logs the choice once per call."""
    try:
        import pyspng._pyspng_c as ext  # type: ignore[import-untyped]

        lib = ctypes.CDLL(str(ext.__file__))
        lib.spng_version_string.restype = ctypes.c_char_p
        lib.spng_version_string.argtypes = []
        version = (lib.spng_version_string() or b"").decode("ascii", "replace")
        if not version.startswith("0.7."):
            raise OSError(f"libspng {version}: only the 0.7 ABI is known")
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        for name, restype, argtypes in (
                ("spng_ctx_new", vp, [ctypes.c_int]),
                ("spng_ctx_free", None, [vp]),
                ("spng_set_crc_action", ctypes.c_int, [vp, ctypes.c_int, ctypes.c_int]),
                ("spng_set_chunk_limits", ctypes.c_int, [vp, size, size]),
                ("spng_set_png_buffer", ctypes.c_int, [vp, ctypes.c_char_p, size]),
                ("spng_decoded_image_size", ctypes.c_int,
                 [vp, ctypes.c_int, ctypes.POINTER(size)]),
                ("spng_decode_image", ctypes.c_int, [vp, vp, size, ctypes.c_int, ctypes.c_int])):
            func = getattr(lib, name)
            func.restype, func.argtypes = restype, argtypes
        decoder = SpngDecoder(lib, version)
        if decoder.decode(_PROBE, scan_png(_PROBE)) is None:  # type: ignore[arg-type]
            raise OSError("libspng could not decode a 1x1 probe PNG")
    except (ImportError, OSError, AttributeError, ValueError) as exc:
        log.info("embedding.png_decoder_chosen", decoder="pillow",
                 reason=f"libspng unavailable: {exc!r}"[:300])
        return None
    log.info("embedding.png_decoder_chosen", decoder=decoder.name)
    return decoder


def _png(width: int, height: int, color_type: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


_PROBE: Final = _png(1, 1, 2, b"\x00\x10\x20\x30")
