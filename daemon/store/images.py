"""The ``images`` table: one row per image file (project, path) the daemon has seen.

The image index (:class:`daemon.images.ImageIndex`) decides when a file is new, changed or gone;
the embedding stage records what it read of the same file (:mod:`daemon.store.embeddings`).
Both write this one table (migration ``0005_images_merge_embed_files``): ``size``, ``mtime_ns``
and ``sha256`` describe one observation of the bytes, and the stage's verdict (``embed_status``)
holds only for those bytes, so an observation of other bytes clears it.  This room knows the
table, not the rules; it runs no file-system call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from daemon.store.chunks import in_chunks
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.store.db import StateStore


@dataclass(frozen=True, slots=True)
class ImageSeen:
    """What the index last recorded of one path."""

    size: int | None
    mtime_ns: int | None
    gone_at: str | None


@dataclass(frozen=True, slots=True)
class PresentImage:
    project: str
    file_name: str
    path: str


class ImageFacts(NamedTuple):
    """One image on disk with what the embedding stage learned of it (a tuple: a prediction
    pass reads tens of thousands of these, and a tuple is built at C speed)."""

    file_name: str
    path: str
    sha256: str | None
    width: int | None
    height: int | None
    stage: float | None
    embed_code: str | None


_FACTS = ("SELECT file_name, path, sha256, width, height, stage, embed_code FROM images "
          "WHERE project = ? AND gone_at IS NULL")


class ImageRepo:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    def seen(self, project: str, path: str) -> ImageSeen | None:
        r = self._store.conn.execute(
            "SELECT size, mtime_ns, gone_at FROM images WHERE project = ? AND path = ?",
            (project, path)).fetchone()
        return None if r is None else ImageSeen(r[0], r[1], r[2])

    def upsert_seen(self, project: str, path: str, file_name: str, size: int, mtime_ns: int,
                    stage: float | None, now: datetime) -> None:
        """The file is on disk with this size and mtime.  Bytes other than the ones last
        hashed forget their hash and the stage's verdict, so the stage reads them again."""
        self._store.conn.execute(
            "INSERT INTO images (project, path, file_name, size, mtime_ns, sha256, stage, "
            "seen_at, gone_at) VALUES (?,?,?,?,?,NULL,?,?,NULL) "
            "ON CONFLICT (project, path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, seen_at = excluded.seen_at, gone_at = NULL, "
            "sha256 = CASE WHEN same THEN images.sha256 END, "
            "embed_status = CASE WHEN same THEN images.embed_status END, "
            "embed_code = CASE WHEN same THEN images.embed_code END, "
            "embed_message = CASE WHEN same THEN images.embed_message END, "
            "width = CASE WHEN same THEN images.width END, "
            "height = CASE WHEN same THEN images.height END".replace(
                "same", "images.size IS excluded.size AND images.mtime_ns IS excluded.mtime_ns"),
            (project, path, file_name, size, mtime_ns, stage, iso_utc(now)),
        )

    def mark_gone(self, project: str, paths: Sequence[str], now: datetime) -> None:
        """The files are no longer on disk; the row (and its hash) stays for training."""
        self._store.conn.executemany(
            "UPDATE images SET gone_at = ? WHERE project = ? AND path = ? AND gone_at IS NULL",
            [(iso_utc(now), project, p) for p in paths])

    def present_paths(self, project: str) -> list[str]:
        return [r[0] for r in self._store.conn.execute(
            "SELECT path FROM images WHERE project = ? AND gone_at IS NULL", (project,))]

    def present(self, project: str | None = None) -> list[PresentImage]:
        """Every image currently on disk, oldest seen first."""
        sql = "SELECT project, file_name, path FROM images WHERE gone_at IS NULL"
        params: tuple[str, ...] = ()
        if project is not None:
            sql += " AND project = ?"
            params = (project,)
        sql += " ORDER BY project, seen_at, path"
        return [PresentImage(*r) for r in self._store.conn.execute(sql, params)]

    def latest_path(self, project: str, file_name: str) -> str | None:
        """The path on disk most recently seen for a file name, or None when none is."""
        r = self._store.conn.execute(
            "SELECT path FROM images WHERE project = ? AND file_name = ? AND gone_at IS NULL "
            "ORDER BY seen_at DESC LIMIT 1", (project, file_name)).fetchone()
        return None if r is None else str(r[0])

    def facts(self, project: str, paths: Sequence[str] | None = None) -> list[ImageFacts]:
        """The project's images on disk (or those of ``paths`` among them), by path, with what
        the embedding stage learned of each (the prediction pass's input)."""
        conn = self._store.conn
        if paths is None:
            return list(map(ImageFacts._make, conn.execute(_FACTS + " ORDER BY path",
                                                           (project,))))
        out: list[ImageFacts] = []
        for part, marks in in_chunks(list(dict.fromkeys(paths))):
            out.extend(map(ImageFacts._make, conn.execute(
                f"{_FACTS} AND path IN ({marks})", (project, *part))))
        return sorted(out, key=lambda f: f.path)

    def with_sha(self, sha256: str, *, limit: int = 5) -> list[tuple[str, str]]:
        """(project, path) of up to ``limit`` files with these bytes, by project and path."""
        return [(str(r[0]), str(r[1])) for r in self._store.conn.execute(
            "SELECT project, path FROM images WHERE sha256 = ? ORDER BY project, path LIMIT ?",
            (sha256, limit))]

    def present_counts(self) -> dict[str, int]:
        """Per project: images on disk."""
        return {str(p): int(n) for p, n in self._store.conn.execute(
            "SELECT project, count(*) FROM images WHERE gone_at IS NULL GROUP BY 1")}
