"""Shapes every room shares about files: which names are images, which folders hold images that
may be deleted soon, how a file is opened safely and how its bytes are hashed.

Each of these was once written in three to five rooms, and the copies drifted (one image suffix
list lacked ``.JPEG``, so a sidecar beside ``X.JPEG`` reported its image missing).  They live
here, once; this module imports nothing from ``daemon`` so that any room may use it.

Every read of a file in a watched folder goes through :func:`open_regular`: a FIFO named
``x.png`` would block a plain ``open()`` forever (and with it a worker), a device or socket has
no business being read, so only regular files are ever opened, and what is not one becomes a
:class:`NotRegularFileError`.  Nothing here writes (writes go through :mod:`daemon.fsutil`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import BinaryIO

#: Image file suffixes, lower case.  The data contract names ``.png`` (sometimes ``.jpg`` /
#: ``.jpeg``); cameras and other tools write them in any case (``X.JPEG``), so a name is
#: compared with :func:`is_image_name`, never with ``in`` on its raw suffix.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
#: the order in which :func:`find_image_beside` tries the exact lower-case names first
_SUFFIX_ORDER: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Folders whose images the reviewer may delete soon after review (data contract section 2):
#: the current name first, then the name older projects use.
DELETE_STAGING_FOLDERS: tuple[str, ...] = ("__delete_staging", "delete_staging")
#: where the reviewer moves losers today
DELETE_STAGING: str = DELETE_STAGING_FOLDERS[0]

_HASH_CHUNK = 1 << 20


def is_image_name(name: str | PurePath) -> bool:
    """Whether a file name has an image suffix, in any case (``a.PNG``, ``b.JPEG``)."""
    return os.path.splitext(str(name))[1].lower() in IMAGE_SUFFIXES


def in_delete_staging(path: PurePath) -> bool:
    """Whether any folder on ``path`` is a delete-staging folder (its images may go soon)."""
    return any(part in DELETE_STAGING_FOLDERS for part in path.parts[:-1])


def find_image_beside(folder: Path, stem: str) -> Path | None:
    """The image named ``stem`` + an image suffix (any case) in ``folder``, or None.

    The lower-case names are tried first (a stat each); only when none exists is the folder
    listed, so ``X.JPEG`` or ``X.Png`` is found too.  An unreadable folder is None, never an
    exception.  A caller asking for many stems in the same folders uses one
    :class:`ImagesBeside` instead, which lists each folder once."""
    return ImagesBeside().find(folder, stem)


class ImagesBeside:
    """Finds the image beside a name: same folder, same stem, an image suffix in any case.

    The suffix's case is the camera's or the tool's (``x.png``, ``X.JPEG``, ``x.Png``), so no
    fixed list of spellings is enough and the folder must be listed; but a pass over 10,000
    orphan sidecars in one folder must not list it 10,000 times (that pass took minutes).  So
    the exact lower-case names are stat'ed first, and each folder is listed at most once in the
    life of this object: make one per pass, so a later pass sees files that appeared since."""

    def __init__(self) -> None:
        #: folder -> {stem: image names with that stem} (empty for a folder that cannot be read)
        self._listed: dict[Path, dict[str, list[str]]] = {}

    def find(self, folder: Path, stem: str) -> Path | None:
        """The image for ``stem`` in ``folder`` (lower-case ``.png``, ``.jpg``, ``.jpeg``
        first, then any other case in that order), or None; never raises."""
        for suffix in _SUFFIX_ORDER:
            candidate = folder / f"{stem}{suffix}"
            with contextlib.suppress(OSError, ValueError):  # ValueError: a NUL in the name
                if candidate.exists():
                    return candidate
        names = self._names(folder).get(stem)
        if not names:
            return None
        return folder / min(names, key=lambda n: (_SUFFIX_ORDER.index(
            os.path.splitext(n)[1].lower()), n))

    def _names(self, folder: Path) -> dict[str, list[str]]:
        if folder not in self._listed:
            found: dict[str, list[str]] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        base, suffix = os.path.splitext(entry.name)
                        if suffix.lower() in IMAGE_SUFFIXES:
                            found.setdefault(base, []).append(entry.name)
            except OSError:
                found = {}
            self._listed[folder] = found
        return self._listed[folder]


# -- safe reading --------------------------------------------------------------------------------

#: never block on a FIFO, never follow a symlink planted in a watched folder, never leak the fd
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"))


class NotRegularFileError(OSError):
    """The path names something other than a regular file (issue code ``image_not_regular``)."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path} is {what}, not a regular file")
        self.path = path
        self.what = what


def describe_mode(mode: int) -> str:
    """``st_mode`` in words: "a FIFO (named pipe)", "a socket", ..."""
    return next((what for test, what in _KINDS if test(mode)), f"a file of mode {mode:o}")


def open_regular(path: Path, *, follow_links: bool = False) -> int:
    """An fd open for reading on ``path``, which must be a regular file (by default not a
    symlink either: a CSV the operator named may be a link, an image found in a root may not).

    A ``stat`` first, so a FIFO or a device is normally never opened at all; ``O_NONBLOCK``
    makes opening one swapped in meanwhile return at once, and ``fstat`` on the open fd (which
    no rename can outrun) then refuses anything that is not a regular file."""
    what = _not_regular(path, follow_links)
    if what is not None:
        raise NotRegularFileError(path, what)
    try:
        fd = os.open(path, _OPEN_FLAGS | (0 if follow_links else _NOFOLLOW))
    except OSError as exc:
        # O_NOFOLLOW on a link fails (ELOOP), so does opening a socket (ENXIO): say what it is
        what = _not_regular(path, follow_links)
        if what is not None:
            raise NotRegularFileError(path, what) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, describe_mode(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_regular(path: Path, follow_links: bool) -> str | None:
    try:
        mode = (os.stat(path) if follow_links else os.lstat(path)).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else describe_mode(mode)


@contextlib.contextmanager
def open_regular_file(path: Path, *, follow_links: bool = False) -> Iterator[BinaryIO]:
    """:func:`open_regular` as a binary file object (for Pillow, which reads only a header)."""
    with os.fdopen(open_regular(path, follow_links=follow_links), "rb") as fh:
        yield fh


def read_regular(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its ``fstat`` (size and mtime of what was read)."""
    with open_regular_file(path) as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), st


# -- hashing -------------------------------------------------------------------------------------

def sha256_stream(fh: BinaryIO) -> str:
    """The SHA-256 of what is left in ``fh``, read in chunks; a seekable ``fh`` is rewound to
    where it was, so the caller can read the same bytes again."""
    start = fh.tell() if fh.seekable() else None
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(_HASH_CHUNK), b""):
        digest.update(block)
    if start is not None:
        fh.seek(start)
    return digest.hexdigest()


def sha256_file(path: Path, *, follow_links: bool = False) -> str:
    """The SHA-256 of a regular file (an image, a CSV, model weights), read in chunks."""
    with open_regular_file(path, follow_links=follow_links) as fh:
        return sha256_stream(fh)
