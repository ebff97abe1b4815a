"""The embedding ledger's SQL: ``embeddings`` and the stage's columns of ``images``.

``embeddings``: one row per (content SHA-256, embedder_id) whose ``.npy`` exists.
``images.embed_*``: what the stage last learned of each (project, path): the size, mtime and
content hash it read, and the failure code of a bad file, so a failed file is retried only when
its bytes change.  Rows stay when an image is deleted: rejected images vanish soon after review,
and training still needs their vectors by project + file name.  This room knows tables, not
policy (the stage decides what to embed).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from daemon.store.chunks import in_chunks
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.store.db import StateStore

META_EMBEDDER = "embedding.embedder_id"
_FILE_COLUMNS = ("project, path, file_name, size, mtime_ns, sha256, embed_status, embed_code, "
                 "embed_message, width, height")


@dataclass(frozen=True, slots=True)
class FileRow:
    project: str
    path: str
    file_name: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str  # "ok" | "failed"
    code: str | None = None
    message: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class VectorRow:
    sha256: str
    embedder_id: str
    dim: int
    width: int | None
    height: int | None


class EmbeddingRepo:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def file_row(self, project: str, path: str) -> FileRow | None:
        """What the stage learned of these bytes; None when it has not read them yet."""
        r = self.store.conn.execute(
            f"SELECT {_FILE_COLUMNS} FROM images WHERE project = ? AND path = ? "
            "AND embed_status IS NOT NULL", (project, path),
        ).fetchone()
        return None if r is None else FileRow(*r)

    def has_vector(self, sha: str, embedder_id: str) -> bool:
        return self.store.conn.execute(
            "SELECT 1 FROM embeddings WHERE sha256 = ? AND embedder_id = ?", (sha, embedder_id)
        ).fetchone() is not None

    def record(self, files: Sequence[FileRow], vectors: Sequence[VectorRow], now: datetime,
               embedder_id: str) -> None:
        """One transaction per batch: the vectors, then the files they came from."""
        stamp = iso_utc(now)
        with self.store.transaction() as conn:
            _insert_vectors(conn, [(v, stamp) for v in vectors])
            # the stage just read these files: on disk, unless it could not even stat one
            _upsert_files(conn, [(f, stamp, f.size is not None) for f in files])
            self.store.set_meta(META_EMBEDDER, embedder_id)

    def restore(self, files: Sequence[tuple[FileRow, str]],
                vectors: Sequence[tuple[VectorRow, str]], embedder_id: str | None) -> None:
        """Refill from the cache's index after a rebuild (each row with its time).  Whether
        each file is still on disk is unknown: gone until the next index scan sees it."""
        with self.store.transaction() as conn:
            _insert_vectors(conn, vectors)
            _upsert_files(conn, [(f, stamp, False) for f, stamp in files])
            if embedder_id is not None:
                self.store.set_meta(META_EMBEDDER, embedder_id)

    def is_empty(self) -> bool:
        """No file has an embedding verdict yet (a fresh or rebuilt state DB)."""
        return self.store.conn.execute(
            "SELECT 1 FROM images WHERE embed_status IS NOT NULL LIMIT 1").fetchone() is None

    def shas_for(self, project: str, file_names: Sequence[str]) -> dict[str, str]:
        """``file_name -> sha256`` of known bytes; a name the stage read fine wins over one
        only hashed, and the latest observation over older ones."""
        out: dict[str, str] = {}
        for part, marks in in_chunks(list(dict.fromkeys(file_names))):
            for name, sha in self.store.conn.execute(
                "SELECT file_name, sha256 FROM images WHERE project = ? AND sha256 IS NOT NULL "
                f"AND file_name IN ({marks}) ORDER BY embed_status IS 'ok', "
                "CASE WHEN embed_status IS 'ok' THEN embedded_at ELSE seen_at END",
                (project, *part),
            ):
                out[name] = sha
        return out

    def vector_rows(self, embedder_id: str | None = None) -> list[VectorRow]:
        sql = "SELECT sha256, embedder_id, dim, width, height FROM embeddings"
        params: tuple[str, ...] = ()
        if embedder_id is not None:
            sql += " WHERE embedder_id = ?"
            params = (embedder_id,)
        return [VectorRow(*r) for r in self.store.conn.execute(sql, params)]

    def file_rows(self) -> list[FileRow]:
        return [FileRow(*r) for r in self.store.conn.execute(
            f"SELECT {_FILE_COLUMNS} FROM images WHERE embed_status IS NOT NULL "
            "ORDER BY project, path")]

    def coverage(self, embedder_id: str | None) -> dict[str, dict[str, int]]:
        """Per project, counted by file name (what decision rows name): seen, embedded (a
        readable file whose bytes have a vector of ``embedder_id``), failed (only failed)."""
        out: dict[str, dict[str, int]] = {}
        conn = self.store.conn
        for project, seen in conn.execute(
            "SELECT project, count(DISTINCT file_name) FROM images GROUP BY project"
        ):
            out[project] = {"seen": seen, "embedded": 0, "failed": 0}
        for project, embedded in conn.execute(
            "SELECT f.project, count(DISTINCT f.file_name) FROM images f "
            "JOIN embeddings e ON e.sha256 = f.sha256 AND e.embedder_id = ? "
            "WHERE f.embed_status = 'ok' GROUP BY f.project", (embedder_id or "",),
        ):
            out.setdefault(project, {"seen": 0, "embedded": 0, "failed": 0})["embedded"] = embedded
        for project, failed in conn.execute(
            "SELECT f.project, count(DISTINCT f.file_name) FROM images f "
            "WHERE f.embed_status = 'failed' AND NOT EXISTS (SELECT 1 FROM images g "
            "WHERE g.project = f.project AND g.file_name = f.file_name "
            "AND g.embed_status = 'ok') GROUP BY f.project"
        ):
            out.setdefault(project, {"seen": 0, "embedded": 0, "failed": 0})["failed"] = failed
        return out

    def fates(self, embedder_id: str | None) -> dict[str, dict[str, int]]:
        """Per project, every image file name ever seen, by what became of it: ``embedded``
        (a readable file whose bytes have a vector of ``embedder_id``), ``failed`` (still
        present, only failed reads), ``waiting`` (still present, not embedded yet) and
        ``lost`` (gone from every image root before it was embedded).  A file counts once, in
        the first of those that applies, so a vanished image never counts as covered."""
        out: dict[str, dict[str, int]] = {}
        for project, embedded, failed, waiting, lost in self.store.conn.execute(
            "WITH names AS (SELECT DISTINCT project, file_name FROM images), "
            "marked AS (SELECT n.project, "
            "  EXISTS (SELECT 1 FROM images f JOIN embeddings e ON e.sha256 = f.sha256 "
            "    AND e.embedder_id = ? WHERE f.project = n.project AND f.file_name = n.file_name "
            "    AND f.embed_status = 'ok') AS embedded, "
            "  EXISTS (SELECT 1 FROM images i WHERE i.project = n.project "
            "    AND i.file_name = n.file_name AND i.gone_at IS NULL) AS present, "
            "  EXISTS (SELECT 1 FROM images f WHERE f.project = n.project "
            "    AND f.file_name = n.file_name AND f.embed_status = 'failed') AS failed "
            "  FROM names n) "
            "SELECT project, sum(embedded), sum(NOT embedded AND present AND failed), "
            "sum(NOT embedded AND present AND NOT failed), sum(NOT embedded AND NOT present) "
            "FROM marked GROUP BY project ORDER BY project", (embedder_id or "",),
        ):
            out[project] = {"embedded": int(embedded or 0), "failed": int(failed or 0),
                            "waiting": int(waiting or 0), "lost": int(lost or 0)}
        return out

    def backlog(self, embedder_id: str | None) -> dict[str, int]:
        """Per project: images on disk with neither a vector of ``embedder_id`` nor a recorded
        failure (a failed file is retried only when its bytes change: not work waiting)."""
        return {str(p): int(n) for p, n in self.store.conn.execute(
            "SELECT i.project, count(*) FROM images i WHERE i.gone_at IS NULL "
            "AND i.embed_status IS NOT 'failed' AND NOT EXISTS (SELECT 1 FROM embeddings e "
            "WHERE e.sha256 = i.sha256 AND e.embedder_id = ?) GROUP BY 1",
            (embedder_id or "",))}

    def last_embedded_at(self) -> str | None:
        value = self.store.conn.execute("SELECT max(embedded_at) FROM images").fetchone()[0]
        return None if value is None else str(value)


def _insert_vectors(conn: sqlite3.Connection, vectors: Sequence[tuple[VectorRow, str]]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO embeddings (sha256, embedder_id, dim, width, height, "
        "created_at) VALUES (?,?,?,?,?,?)",
        [(v.sha256, v.embedder_id, v.dim, v.width, v.height, stamp) for v, stamp in vectors])


def _upsert_files(conn: sqlite3.Connection, files: Sequence[tuple[FileRow, str, bool]]) -> None:
    """``(row, time, on_disk)``: the stage's observation replaces the bytes the row describes;
    the index's own columns (``seen_at``, ``gone_at``) change only for a row new to it."""
    from daemon.images import parse_stage

    conn.executemany(
        "INSERT INTO images (project, path, file_name, size, mtime_ns, sha256, stage, "
        "seen_at, gone_at, embed_status, embed_code, embed_message, width, height, "
        "embedded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (project, path) DO UPDATE SET file_name = excluded.file_name, "
        "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
        "embed_status = excluded.embed_status, embed_code = excluded.embed_code, "
        "embed_message = excluded.embed_message, width = excluded.width, "
        "height = excluded.height, embedded_at = excluded.embedded_at",
        [(f.project, f.path, f.file_name, f.size, f.mtime_ns, f.sha256,
          parse_stage(f.file_name), stamp, None if on_disk else stamp,
          f.status, f.code, f.message, f.width, f.height, stamp)
         for f, stamp, on_disk in files])
