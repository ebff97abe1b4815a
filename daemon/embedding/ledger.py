"""The embedding room's tables in the state DB (migration ``0003_embeddings``).

``embeddings``: one row per (content SHA-256, embedder_id) whose ``.npy`` exists.
``embed_files``: what the stage last learned of each (project, path): size, mtime, content hash,
and the failure code of a bad file, so a failed file is retried only when its bytes change.
Rows stay when an image is deleted: rejected images vanish soon after review, and training still
needs their vectors by project + file name.  This room knows tables, not policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from daemon.store import StateStore
from daemon.timeparse import iso_utc

META_EMBEDDER = "embedding.embedder_id"
_IN_CHUNK = 500


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


class Ledger:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def file_row(self, project: str, path: str) -> FileRow | None:
        r = self.store.conn.execute(
            "SELECT project, path, file_name, size, mtime_ns, sha256, status, code, message, "
            "width, height FROM embed_files WHERE project = ? AND path = ?", (project, path),
        ).fetchone()
        return None if r is None else FileRow(*r)

    def has_vector(self, sha: str, embedder_id: str) -> bool:
        return self.store.conn.execute(
            "SELECT 1 FROM embeddings WHERE sha256 = ? AND embedder_id = ?", (sha, embedder_id)
        ).fetchone() is not None

    def record(self, files: Sequence[FileRow], vectors: Sequence[VectorRow], now: datetime,
               embedder_id: str) -> None:
        """One transaction per batch: the vectors, the files, the image index's hashes."""
        stamp = iso_utc(now)
        with self.store.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO embeddings (sha256, embedder_id, dim, width, height, "
                "created_at) VALUES (?,?,?,?,?,?)",
                [(v.sha256, v.embedder_id, v.dim, v.width, v.height, stamp) for v in vectors],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO embed_files (project, path, file_name, size, mtime_ns, "
                "sha256, status, code, message, width, height, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(f.project, f.path, f.file_name, f.size, f.mtime_ns, f.sha256, f.status, f.code,
                  f.message, f.width, f.height, stamp) for f in files],
            )
            # the daemon's image index learns the content hash of what was read
            conn.executemany(
                "UPDATE images SET sha256 = ? WHERE project = ? AND path = ? "
                "AND sha256 IS NOT ?",
                [(f.sha256, f.project, f.path, f.sha256) for f in files if f.sha256],
            )
            self.store.set_meta(META_EMBEDDER, embedder_id)

    def shas_for(self, project: str, file_names: Sequence[str]) -> dict[str, str]:
        """``file_name -> sha256`` of readable files (latest observation wins); falls back to
        the daemon's image index for names this room has not seen."""
        out: dict[str, str] = {}
        names = list(dict.fromkeys(file_names))
        for i in range(0, len(names), _IN_CHUNK):
            part = names[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            for name, sha in self.store.conn.execute(
                "SELECT file_name, sha256 FROM images WHERE project = ? AND sha256 IS NOT NULL "
                f"AND file_name IN ({marks}) ORDER BY seen_at", (project, *part),
            ):
                out[name] = sha
            for name, sha in self.store.conn.execute(
                "SELECT file_name, sha256 FROM embed_files WHERE project = ? AND status = 'ok' "
                f"AND file_name IN ({marks}) ORDER BY updated_at", (project, *part),
            ):
                out[name] = sha
        return out

    def vector_rows(self, embedder_id: str | None = None) -> Iterable[VectorRow]:
        sql = "SELECT sha256, embedder_id, dim, width, height FROM embeddings"
        params: tuple[str, ...] = ()
        if embedder_id is not None:
            sql += " WHERE embedder_id = ?"
            params = (embedder_id,)
        return [VectorRow(*r) for r in self.store.conn.execute(sql, params)]

    def file_rows(self) -> list[FileRow]:
        return [FileRow(*r) for r in self.store.conn.execute(
            "SELECT project, path, file_name, size, mtime_ns, sha256, status, code, message, "
            "width, height FROM embed_files ORDER BY project, path")]

    def coverage(self, embedder_id: str | None) -> dict[str, dict[str, int]]:
        """Per project, counted by file name (what decision rows name): seen (image index or
        stage), embedded (a readable file whose bytes have a vector of ``embedder_id``), failed
        (only failed observations)."""
        out: dict[str, dict[str, int]] = {}
        conn = self.store.conn
        for project, seen in conn.execute(
            "SELECT project, count(*) FROM (SELECT project, file_name FROM images "
            "UNION SELECT project, file_name FROM embed_files) GROUP BY project"
        ):
            out[project] = {"seen": seen, "embedded": 0, "failed": 0}
        for project, embedded in conn.execute(
            "SELECT f.project, count(DISTINCT f.file_name) FROM embed_files f "
            "JOIN embeddings e ON e.sha256 = f.sha256 AND e.embedder_id = ? "
            "WHERE f.status = 'ok' GROUP BY f.project", (embedder_id or "",),
        ):
            out.setdefault(project, {"seen": 0, "embedded": 0, "failed": 0})["embedded"] = embedded
        for project, failed in conn.execute(
            "SELECT f.project, count(DISTINCT f.file_name) FROM embed_files f "
            "WHERE f.status = 'failed' AND NOT EXISTS (SELECT 1 FROM embed_files g "
            "WHERE g.project = f.project AND g.file_name = f.file_name AND g.status = 'ok') "
            "GROUP BY f.project"
        ):
            out.setdefault(project, {"seen": 0, "embedded": 0, "failed": 0})["failed"] = failed
        return out

    def fates(self, embedder_id: str | None) -> dict[str, dict[str, int]]:
        """Per project, every image file name ever seen (image index or stage), by what became
        of it: ``embedded`` (a readable file whose bytes have a vector of ``embedder_id``),
        ``failed`` (still present, only failed reads), ``waiting`` (still present, not embedded
        yet) and ``lost`` (gone from every image root before it was embedded: its data is
        lost).  A file counts once, in the first of those that applies; the summary's coverage
        is ``embedded / total``, so a vanished image never counts as covered."""
        out: dict[str, dict[str, int]] = {}
        for project, embedded, failed, waiting, lost in self.store.conn.execute(
            "WITH names AS (SELECT project, file_name FROM images "
            "  UNION SELECT project, file_name FROM embed_files), "
            "marked AS (SELECT n.project, "
            "  EXISTS (SELECT 1 FROM embed_files f JOIN embeddings e ON e.sha256 = f.sha256 "
            "    AND e.embedder_id = ? WHERE f.project = n.project AND f.file_name = n.file_name "
            "    AND f.status = 'ok') AS embedded, "
            "  EXISTS (SELECT 1 FROM images i WHERE i.project = n.project "
            "    AND i.file_name = n.file_name AND i.gone_at IS NULL) AS present, "
            "  EXISTS (SELECT 1 FROM embed_files f WHERE f.project = n.project "
            "    AND f.file_name = n.file_name AND f.status = 'failed') AS failed "
            "  FROM names n) "
            "SELECT project, sum(embedded), sum(NOT embedded AND present AND failed), "
            "sum(NOT embedded AND present AND NOT failed), sum(NOT embedded AND NOT present) "
            "FROM marked GROUP BY project ORDER BY project", (embedder_id or "",),
        ):
            out[project] = {"embedded": int(embedded or 0), "failed": int(failed or 0),
                            "waiting": int(waiting or 0), "lost": int(lost or 0)}
        return out
