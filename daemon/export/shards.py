"""One export shard written whole, and the keys of the shards already written.

A shard is written in chunks (a few thousand rows) straight to temp files beside its final
names (:func:`daemon.fsutil.atomic_writer`: fsync, the umask's mode, ``os.replace``), so memory
holds one chunk, never a shard.  The ``.npy`` header is written first with a placeholder row
count and rewritten with the real one before the rename (numpy pads headers to a fixed length,
checked).  In the npy format the metadata file is renamed into place before the vectors: a kill
between the two renames leaves a metadata file with no vectors, which readers that pair files
(embedding-reader's ``parquet_npy`` zips the two sorted lists) never pair with anything, and the
next export removes it because the manifest does not list it.

Rows in a shard are in key order (``sha256, project, image_path``), so the exported keys of
all shards are merged in one sorted stream (one record batch per shard in memory) and
compared with the state DB's rows, which come in the same order.
"""

from __future__ import annotations

import contextlib
import heapq
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from daemon.export.layout import KEY_COLUMNS, ExportRefused, Manifest, Shard, shard_names
from daemon.fsutil import atomic_writer
from daemon.store.export_rows import ExportRow

#: the placeholder's row count: as many digits as any real count, so the header keeps its length
_PLACEHOLDER_ROWS = 10**15
KEY_BATCH_ROWS = 8192


def npy_header(rows: int, dim: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": (rows, dim)})
    return buf.getvalue()


def _arrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportRefused("trainingd export needs pyarrow, which is the [export] extra: "
                            "pip install -e '.[export]'") from exc
    return pa, pq


def _schema(pa: Any, fmt: str, dim: int) -> Any:
    fields = [pa.field("image_path", pa.string(), nullable=False),
              pa.field("sha256", pa.string(), nullable=False),
              pa.field("project", pa.string(), nullable=False),
              pa.field("file_name", pa.string(), nullable=False),
              pa.field("stage", pa.float64()),
              pa.field("width", pa.int32()),
              pa.field("height", pa.int32()),
              pa.field("embedder_id", pa.string(), nullable=False)]
    if fmt == "parquet":
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields)


class ShardWriter:
    """``with ShardWriter(...) as w: w.write(rows, vectors)``; whole on a clean exit, absent
    (temp files removed) on an exception.  ``abandon()`` discards a shard that got no rows."""

    def __init__(self, folder: Path, index: int, fmt: str, dim: int, embedder_id: str) -> None:
        self.folder = folder
        self.index = index
        self.fmt = fmt
        self.dim = dim
        self.embedder_id = embedder_id
        self.rows = 0
        self.first_key: tuple[str, str, str] | None = None
        self.last_key: tuple[str, str, str] | None = None
        self.distinct_hashes = 0
        self._last_sha: str | None = None
        self._stack = contextlib.ExitStack()
        self._npy: IO[bytes] | None = None
        self._pa, self._pq = _arrow()
        self._schema = _schema(self._pa, fmt, dim)
        self._meta: Any = None
        self.embeddings, self.metadata = shard_names(index, fmt)

    def __enter__(self) -> ShardWriter:
        stack = self._stack.__enter__()
        try:
            if self.fmt == "npy":
                # entered first, so it is renamed last (the ExitStack unwinds in reverse)
                self._npy = stack.enter_context(atomic_writer(self.folder / self.embeddings,
                                                              "wb", sync_dir=True))
                self._npy.write(npy_header(_PLACEHOLDER_ROWS, self.dim))
                target = self.folder / str(self.metadata)
            else:
                target = self.folder / self.embeddings
            fh = stack.enter_context(atomic_writer(target, "wb", sync_dir=True))
            self._meta = self._pq.ParquetWriter(fh, self._schema, compression="zstd")
            stack.callback(self._meta.close)
        except BaseException:
            self._stack.__exit__(None, None, None)
            raise
        return self

    def write(self, rows: Sequence[ExportRow], vectors: np.ndarray) -> None:
        """Append rows (in key order, after every row written so far) and their vectors."""
        if not rows:
            return
        if self.first_key is None:
            self.first_key = rows[0].key
        self.last_key = rows[-1].key
        sha, project, path, name, stage, width, height, _ = zip(*rows, strict=True)
        self.distinct_hashes += len(set(sha)) - (sha[0] == self._last_sha)
        self._last_sha = sha[-1]
        pa = self._pa
        columns: list[Any] = [
            pa.array(path, pa.string()), pa.array(sha, pa.string()),
            pa.array(project, pa.string()), pa.array(name, pa.string()),
            pa.array(stage, pa.float64()), pa.array(width, pa.int32()),
            pa.array(height, pa.int32()),
            pa.array([self.embedder_id] * len(rows), pa.string()),
        ]
        block = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.fmt == "parquet":
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)),
                                                             self.dim))
        self._meta.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        if self._npy is not None:
            self._npy.write(block.tobytes())
        self.rows += len(rows)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if kind is None and self._npy is not None:
            header = npy_header(self.rows, self.dim)
            if len(header) != len(npy_header(_PLACEHOLDER_ROWS, self.dim)):
                raise AssertionError("npy header length changed with the row count")
            self._npy.seek(0)
            self._npy.write(header)
            self._npy.seek(0, io.SEEK_END)
        return bool(self._stack.__exit__(kind, exc, tb))

    def shard(self, written_at: str) -> Shard:
        assert self.first_key is not None and self.last_key is not None
        return Shard(self.index, self.rows, self.embeddings, self.metadata,
                     self.distinct_hashes, list(self.first_key), list(self.last_key), written_at)


class EmptyShard(Exception):
    """Raised inside a :class:`ShardWriter` to discard it: every row of it was skipped."""


def shard_rows_on_disk(folder: Path, shard: Shard) -> tuple[int, int] | str:
    """``(rows in the vectors file, rows in the metadata file)``, or why they cannot be read."""
    _, pq = _arrow()
    try:
        if shard.metadata is None:
            n = int(pq.ParquetFile(folder / shard.embeddings).metadata.num_rows)
            return n, n
        with (folder / shard.embeddings).open("rb") as fh:
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read(fh)
        meta_rows = int(pq.ParquetFile(folder / shard.metadata).metadata.num_rows)
        return int(shape[0]), meta_rows
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _shard_keys(folder: Path, manifest: Manifest, shard: Shard) -> Iterator[tuple[str, ...]]:
    _, pq = _arrow()
    source = folder / (shard.metadata or shard.embeddings)
    previous: tuple[str, ...] | None = None
    with pq.ParquetFile(source) as pf:
        for batch in pf.iter_batches(batch_size=KEY_BATCH_ROWS, columns=list(KEY_COLUMNS)):
            for key in zip(*(batch.column(c).to_pylist() for c in KEY_COLUMNS), strict=True):
                if previous is not None and key <= previous:
                    raise ExportRefused(
                        f"{source}: rows are not in key order at {key!r}: the shard was not "
                        "written by trainingd export (or was changed); export to a new --out")
                previous = key
                yield key


def exported_keys(folder: Path, manifest: Manifest) -> Iterator[tuple[str, ...]]:
    """Every key the manifest's shards hold, in key order (a k-way merge: one batch per shard
    in memory)."""
    return heapq.merge(*(_shard_keys(folder, manifest, s) for s in manifest.shards))


def new_rows(rows: Iterator[ExportRow], done: Iterator[tuple[str, ...]]) -> Iterator[ExportRow]:
    """``rows`` whose key is not in ``done`` (both in key order): a sorted anti-join."""
    head = next(done, None)
    for row in rows:
        key = row.key
        while head is not None and head < key:
            head = next(done, None)
        if head != key:
            yield row
