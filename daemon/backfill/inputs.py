"""The backfill's input side: CSV files and image files, opened so that no input can hang or
stop the run.

A CSV path may name a FIFO or a folder, a line may hold bytes that are not UTF-8, an image may be
a decompression bomb or a FIFO named like an image.  Each becomes a :class:`NotReadable` or an
:class:`~daemon.backfill.convert.ImageProblem` that the run turns into an issue line.  Split from
:mod:`daemon.backfill.run`; nothing here writes.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from daemon.backfill.convert import ImageProblem
from daemon.files import NotRegularFileError, is_image_name
from daemon.files import open_regular as open_fd


class NotReadable(Exception):
    """A path that is not a regular readable file; the message says what it is instead."""


def open_regular(path: Path, *, follow_links: bool = True) -> BinaryIO:
    """``path`` open for reading through :func:`daemon.files.open_regular` (never a FIFO or a
    device), with the reason as a :class:`NotReadable`.  A CSV may be a link (the operator
    named it); an image found in an image root may not (``follow_links=False``)."""
    try:
        return os.fdopen(open_fd(path, follow_links=follow_links), "rb")
    except NotRegularFileError as exc:
        raise NotReadable(f"it is {exc.what}, not a regular file") from None
    except OSError as exc:
        raise NotReadable(f"cannot open it: {exc.strerror or exc}") from None


SURROGATE = re.compile(r"[\ud800-\udfff]")


def safe_text(value: str) -> str:
    """``value`` storable as UTF-8: bytes a file name or line held that are not UTF-8 (lone
    surrogates) are written as ``\\udcXX`` instead of raising in SQLite or the report."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def head(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_lines(raw: BinaryIO) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """``(first line number, fields, csv error)`` per record; the header is line 1.  Bytes
    that are not UTF-8 arrive as lone surrogates (``surrogateescape``), never an exception:
    the caller rejects such a line rather than store a name changed to fit."""
    with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        previous = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield previous + 1, None, str(exc)
                previous = reader.line_num
                continue
            yield previous + 1, fields, None
            previous = reader.line_num


def count_lines(path: Path) -> int:
    """Physical lines of a CSV, for a progress total (0 for anything that is not a readable
    regular file: that input becomes an issue line when it is read)."""
    try:
        raw = open_regular(path)
    except NotReadable:
        return 0
    lines, last = 0, b"\n"
    try:
        with raw:
            for chunk in iter(lambda: raw.read(1 << 20), b""):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return lines
    return lines + (last != b"\n")


class ImageSizer:
    """Looks image sizes up under the image roots; the name index is built on first use."""

    def __init__(self, roots: tuple[Path, ...],
                 project_roots: dict[str, tuple[Path, ...]] | None = None) -> None:
        self.roots = roots
        self.project_roots = project_roots or {}
        self._index: dict[Path, dict[str, Path]] = {}

    def _names(self, root: Path) -> dict[str, Path]:
        found = self._index.get(root)
        if found is None:
            found = {}
            for folder, dirs, files in os.walk(root):
                dirs.sort()  # first match in a sorted walk: deterministic
                for name in sorted(files):
                    if is_image_name(name):
                        found.setdefault(name, Path(folder) / name)
            self._index[root] = found
        return found

    def __call__(self, project: str, name: str) -> tuple[int, int] | ImageProblem | None:
        """The first readable size in root order; else the first problem met; else None."""
        problem: ImageProblem | None = None
        for root in (*self.roots, *self.project_roots.get(project, ())):
            path = self._names(root).get(name)
            if path is None:
                continue
            try:
                # a FIFO named like an image must not hang the backfill: regular files only,
                # and a symlink planted in an image root is not followed
                with open_regular(path, follow_links=False) as fh, Image.open(fh) as img:
                    width, height = img.size
            except Image.DecompressionBombError as exc:
                problem = problem or ImageProblem(str(path), (
                    f"it is larger than Pillow's decompression-bomb limit ({exc}); it was not "
                    "decoded. Give the size in a copy of the CSV, or check the file"))
                continue
            except NotReadable as exc:
                problem = problem or ImageProblem(str(path), str(exc))
                continue
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                problem = problem or ImageProblem(str(path), f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # one odd image file never stops the backfill
                problem = problem or ImageProblem(str(path), f"{type(exc).__name__}: {exc}")
                continue
            if width > 0 and height > 0:
                return int(width), int(height)
        return problem
