"""The rows an embedding export reads: one per image file with a vector of one embedder.

Why a room of its own: the store owns its tables (their SQL lives in this package), and the
export (:mod:`daemon.export`) must stream a million rows with flat memory through the
read-only, invisible connection of :mod:`daemon.sqlite_ro`, whose fenced reads return whole
result sets.  So rows come in keyset pages ordered by ``(sha256, project, path)``: each page is
one short read (an index seek on ``images_sha``), and the order is the one the export's shards
are written in, which lets it find rows it has not exported by a sorted merge instead of a set
of every key in memory.  This room never writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from daemon.store.db import StateStore

#: rows per read: small enough that one fenced read (a whole result set) stays a few MB
PAGE_ROWS = 10_000


class ExportRow(NamedTuple):
    """One image file whose bytes have a vector of the embedder being exported (a tuple, made
    straight from the SQL row: a million of them are made per export)."""

    sha256: str
    project: str
    path: str
    file_name: str
    stage: float | None
    width: int | None
    height: int | None
    dim: int

    @property
    def key(self) -> tuple[str, str, str]:
        """The export's row identity and sort order (``sha256`` first: cache locality)."""
        return (self[0], self[1], self[2])


def iter_export_rows(store: StateStore, embedder_id: str, projects: Sequence[str] | None,
                     *, page_rows: int = PAGE_ROWS) -> Iterator[ExportRow]:
    """Every file the stage read fine whose bytes have a vector of ``embedder_id``, in key order,
    gone files included (their vectors stay valid, as training keeps them)."""
    scope = ""
    scope_params: tuple[str, ...] = ()
    if projects:
        scope = f" AND i.project IN ({','.join('?' * len(projects))})"
        scope_params = tuple(projects)
    sql = ("SELECT i.sha256, i.project, i.path, i.file_name, i.stage, "
           "coalesce(i.width, e.width), coalesce(i.height, e.height), e.dim "
           "FROM images i JOIN embeddings e ON e.sha256 = i.sha256 AND e.embedder_id = ? "
           "WHERE i.embed_status = 'ok' AND i.sha256 IS NOT NULL{scope}{after} "
           "ORDER BY i.sha256, i.project, i.path LIMIT ?")
    after: tuple[str, str, str] | None = None
    while True:
        if after is None:
            query = sql.format(scope=scope, after="")
            params: tuple[object, ...] = (embedder_id, *scope_params, page_rows)
        else:
            # keyset paging: rows UPDATEd or inserted meanwhile are met in their place, and no
            # page depends on an OFFSET that a concurrent insert would shift
            query = sql.format(scope=scope, after=" AND (i.sha256, i.project, i.path) > (?,?,?)")
            params = (embedder_id, *scope_params, *after, page_rows)
        page = store.conn.execute(query, params).fetchall()
        # the columns are declared TEXT/REAL/INTEGER and written by our own stage
        yield from map(ExportRow._make, page)
        if len(page) < page_rows:
            return
        last = page[-1]
        after = (str(last[0]), str(last[1]), str(last[2]))


def known_projects(store: StateStore) -> set[str]:
    """Projects with at least one image row (``--project`` names one of these or the config's)."""
    return {str(r[0]) for r in store.conn.execute("SELECT DISTINCT project FROM images")}
