"""The one helper for ``IN (...)`` queries over many ids.

SQLite limits the bound parameters of one statement (``SQLITE_MAX_VARIABLE_NUMBER``: 999 on old
builds, 32766 on new ones), so a query over thousands of keys runs in chunks.  Every room that
asks "these rows, by key" (the state DB's repositories, the read-only decision reader) uses this
helper, so the chunk size and the placeholder string are written once.  Pure: it runs no SQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

#: stays far below SQLITE_MAX_VARIABLE_NUMBER on every build, with room for a few more params
IN_CHUNK = 500


def in_chunks(ids: Iterable[T], size: int = IN_CHUNK) -> Iterator[tuple[list[T], str]]:
    """``(part, marks)`` per chunk of at most ``size`` ids, in order; ``marks`` is the
    ``?,?,...`` to put inside ``IN (...)``.  No ids, no chunk (so no ``IN ()`` is ever run)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size!r}")
    items: Sequence[T] = ids if isinstance(ids, list | tuple) else list(ids)
    for start in range(0, len(items), size):
        part = list(items[start : start + size])
        yield part, ",".join("?" * len(part))
