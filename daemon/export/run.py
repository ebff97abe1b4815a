"""``trainingd export embeddings``: new cached vectors into new shards of an export folder.

What it must never do: write to the state DB or the cache (both are read through
:class:`daemon.store.StateStore` ``read_only=True`` and plain reads of the ``.npy`` files), hold
all vectors in memory (rows stream in key order, a shard is written chunk by chunk), or leave a
manifest that lists a shard that is not whole.

One export folder holds one vector space.  A folder exported with another embedder is refused,
not extended and not silently replaced by a fresh export in another folder: vectors of two
embedders are not comparable, so mixing them breaks every search over the folder, and a fresh
folder beside it would leave whoever reads ``--out`` reading the old vectors without a word.
The operator names a new ``--out`` (the refusal says so).  Format and project scope are held
to the manifest for the same reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from daemon.embedding.cache import VectorCache
from daemon.embedding.vector_reader import Skipped, VectorReader, bad_norms, not_unit
from daemon.errors import DaemonError
from daemon.export.layout import (
    EMB_DIR,
    LOCK_NAME,
    META_DIR,
    ExportRefused,
    Manifest,
    Shard,
    foreign_entries,
    read_manifest,
    unlisted_files,
    write_manifest,
)
from daemon.export.shards import (
    EmptyShard,
    ShardWriter,
    exported_keys,
    new_rows,
    shard_rows_on_disk,
)
from daemon.fsutil import remove_abandoned_temps
from daemon.store.export_rows import ExportRow, iter_export_rows
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.store.db import StateStore

log = structlog.get_logger("export")

SHARD_ROWS = 100_000
CHUNK_ROWS = 8192
#: skipped rows named one by one in the result (all are counted)
SKIPPED_LISTED = 100


class ExportBusy(DaemonError):
    """Another export is writing into the same folder now (exit 75: try again later)."""


@dataclass(slots=True)
class ExportResult:
    out: Path
    embedder_id: str
    format: str
    rows_before: int
    orphans_removed: int
    shards: list[Shard] = field(default_factory=list)
    skipped_total: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def rows_written(self) -> int:
        return sum(s.rows for s in self.shards)

    def skip(self, item: Skipped) -> None:
        self.skipped_total += 1
        if len(self.skipped) < SKIPPED_LISTED:
            self.skipped.append(item)
            log.warning("export.row_skipped", code=item.code, sha256=item.sha256,
                        project=item.project, path=item.path, value=item.value,
                        reason=item.message)


def export_embeddings(store: StateStore, cache_dir: Path, out: Path, *, embedder_id: str,
                      projects: Sequence[str] | None, fmt: str, shard_rows: int = SHARD_ROWS,
                      chunk_rows: int = CHUNK_ROWS, now: datetime | None = None
                      ) -> ExportResult:
    """Append every exportable row not yet in ``out`` as new shards; see the module docstring."""
    scope = sorted(set(projects)) if projects else None
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        manifest, removed = _open_folder(out, embedder_id, fmt, scope)
        result = ExportResult(out, embedder_id, fmt, manifest.rows, removed)
        rows = new_rows(iter_export_rows(store, embedder_id, scope), exported_keys(out, manifest))
        cache = VectorCache(cache_dir, embedder_id)
        readers: dict[int, VectorReader] = {}
        pending: list[ExportRow] = []
        source = iter(rows)
        while True:
            first = next(source, None)
            if first is None:
                break
            pending = [first]
            shard = _write_shard(out, manifest, source, pending, cache, readers, result,
                                 shard_rows=shard_rows, chunk_rows=chunk_rows,
                                 now=now or datetime.now(UTC))
            if shard is None:
                continue
            manifest.shards.append(shard)
            manifest.dim = manifest.dim or first.dim
            # the commit point: from here the shard is part of the export
            write_manifest(out, manifest)
            result.shards.append(shard)
            log.info("export.shard_written", out=str(out), shard=shard.index, rows=shard.rows,
                     file=shard.embeddings, total_rows=manifest.rows)
    log.info("export.finished", out=str(out), embedder_id=embedder_id, format=fmt,
             rows_written=result.rows_written, rows_before=result.rows_before,
             shards_written=len(result.shards), skipped=result.skipped_total,
             orphans_removed=removed)
    return result


def _write_shard(out: Path, manifest: Manifest, source: Iterator[ExportRow],
                 pending: list[ExportRow], cache: VectorCache, readers: dict[int, VectorReader],
                 result: ExportResult, *, shard_rows: int, chunk_rows: int, now: datetime
                 ) -> Shard | None:
    """One shard of up to ``shard_rows`` rows from ``pending`` + ``source``; None when every
    row was skipped (nothing is written then)."""
    dim = manifest.dim or pending[0].dim
    reader = readers.setdefault(dim, VectorReader(cache, dim))
    writer = ShardWriter(out, manifest.next_index(), manifest.format, dim, manifest.embedder_id)
    try:
        with writer:
            exhausted = False
            while writer.rows < shard_rows and not exhausted:
                want = min(chunk_rows, shard_rows - writer.rows)
                while len(pending) < want:
                    row = next(source, None)
                    if row is None:
                        exhausted = True
                        break
                    pending.append(row)
                chunk, pending[:] = pending[:want], pending[want:]
                kept, vectors = _read_chunk(chunk, reader, result)
                writer.write(kept, vectors)
            if writer.rows == 0:
                raise EmptyShard
    except EmptyShard:
        return None
    if pending:
        raise AssertionError("rows left over after a shard")  # want never exceeds pending
    return writer.shard(iso_utc(now))


def _read_chunk(chunk: Sequence[ExportRow], reader: VectorReader, result: ExportResult
                ) -> tuple[list[ExportRow], np.ndarray]:
    """The chunk's vectors; rows whose vector is missing or damaged become skips."""
    block = np.empty((len(chunk), reader.dim), dtype=np.float32)
    problems = reader.read_into([r.sha256 for r in chunk], block)
    for i, r in enumerate(chunk):
        if r.dim != reader.dim:
            problems.append((i, "export_vector_shape", repr(r.dim),
                             f"the ledger records dim {r.dim}; this export's vectors have "
                             f"{reader.dim}"))
    bad = {p[0] for p in problems}
    for i in bad_norms(block).tolist():
        if i not in bad:
            problems.append((i, *not_unit(reader.path(chunk[i].sha256), block, i)))
    if not problems:
        return list(chunk), block
    for i, code, value, message in sorted(problems):
        r = chunk[i]
        result.skip(Skipped(code, r.sha256, r.project, r.path, value, message))
    keep = np.ones(len(chunk), dtype=bool)
    keep[[p[0] for p in problems]] = False
    return [r for r, k in zip(chunk, keep.tolist(), strict=True) if k], block[keep]


def _open_folder(out: Path, embedder_id: str, fmt: str, scope: list[str] | None
                 ) -> tuple[Manifest, int]:
    """The folder's manifest (written now for a new folder), its shards checked whole, and
    the leftovers of a killed export removed; returns the manifest and how many files went."""
    manifest = read_manifest(out)
    if manifest is None:
        foreign = foreign_entries(out)
        if foreign:
            raise ExportRefused(
                f"--out {out} holds {', '.join(foreign[:5])} but no {out / 'manifest.json'}: "
                "not a trainingd export; name an empty or new folder")
        manifest = Manifest(embedder_id, fmt, scope)
        # before any shard: a first export killed mid-way still leaves a folder we recognise
        write_manifest(out, manifest)
        return manifest, 0
    if manifest.embedder_id != embedder_id:
        raise ExportRefused(
            f"--out {out} holds vectors of embedder {manifest.embedder_id!r}; the vectors to "
            f"export are of {embedder_id!r}. Vectors of two embedders are not comparable: "
            "export to a new --out folder")
    if manifest.format != fmt:
        raise ExportRefused(f"--out {out} is a --format {manifest.format} export; asked for "
                            f"--format {fmt}: export to a new --out folder, or use "
                            f"--format {manifest.format}")
    if manifest.projects != scope:
        raise ExportRefused(
            f"--out {out} exports {_scope_words(manifest.projects)}; asked for "
            f"{_scope_words(scope)}: use the same --project options, or a new --out folder")
    for shard in manifest.shards:
        found = shard_rows_on_disk(out, shard)
        if found != (shard.rows, shard.rows):
            raise ExportRefused(
                f"--out {out}: shard {shard.index} ({shard.embeddings}) should hold "
                f"{shard.rows} rows, found {found!r}: the export was changed by hand; export "
                "to a new --out folder")
    removed = 0
    for path in unlisted_files(out, manifest):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
            log.warning("export.leftover_removed", file=str(path),
                        reason="not in the manifest: left by an export killed mid-shard")
    for sub in (EMB_DIR, META_DIR):
        removed += remove_abandoned_temps(out / sub)
    return manifest, removed


def _scope_words(scope: list[str] | None) -> str:
    return "every project" if scope is None else "project(s) " + ", ".join(scope)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportBusy(f"another trainingd export is writing into {out} now; "
                             "try again when it has finished") from None
        yield
    finally:
        os.close(fd)
