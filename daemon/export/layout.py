"""What an export folder holds and the manifest that says so.

Layout (``--format npy``, what clip-retrieval's ``clip_inference`` writes and embedding-reader's
``file_format="npy"`` / ``"parquet_npy"`` read)::

    manifest.json                        this module: shards, row counts, embedder id, scope
    img_emb/img_emb_00000.npy            float32 (rows, dim), L2-normalised
    metadata/metadata_00000.parquet      the same rows, same order: image_path, sha256, ...

``--format parquet`` (embedding-reader's ``file_format="parquet"``): ``img_emb/img_emb_N.parquet``
only, the vector in an ``embedding`` column beside the metadata columns.

Shard numbers are zero-padded because readers pair and order shards by sorting file names.
The manifest is the commit record: it is rewritten (atomically) after each shard is whole, so a
shard file it does not list is the leftover of a killed export and is removed by the next one.
It is written before the first shard, so that even a first export killed mid-way leaves a
folder that the next run recognises as its own.  This room reads and writes only the manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError
from daemon.fsutil import atomic_write_text

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".export.lock"
EMB_DIR = "img_emb"
META_DIR = "metadata"
MANIFEST_VERSION = 1
FORMATS = ("npy", "parquet")
#: metadata columns, in order; ``image_path`` is clip-retrieval's name for the file's path
META_COLUMNS = ("image_path", "sha256", "project", "file_name", "stage", "width", "height",
                "embedder_id")
#: a shard row's identity, also the order rows are written in within a shard
KEY_COLUMNS = ("sha256", "project", "image_path")
_DIGITS = 5
_SHARD_RE = re.compile(r"^(img_emb|metadata)_(\d+)\.(npy|parquet)$")


class ExportRefused(ConfigError):
    """The folder cannot take this export (another embedder, format or scope; not an export;
    changed by hand): nothing was written.  A config-class error: exit 78, no retry loop."""


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    rows: int
    embeddings: str           # path relative to the export folder
    metadata: str | None      # None in the parquet format (metadata beside the vectors)
    distinct_hashes: int
    first_key: list[str]
    last_key: list[str]
    written_at: str


@dataclass(slots=True)
class Manifest:
    embedder_id: str
    format: str
    projects: list[str] | None        # None: every project
    dim: int | None = None            # known once a shard is written
    shards: list[Shard] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def next_index(self) -> int:
        return max((s.index for s in self.shards), default=-1) + 1

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "version": self.version, "writer": "trainingd export embeddings",
            "embedder_id": self.embedder_id, "format": self.format, "projects": self.projects,
            "dim": self.dim, "dtype": "float32", "normalized": "l2",
            "key_columns": list(KEY_COLUMNS), "metadata_columns": list(META_COLUMNS),
            "rows": self.rows, "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def shard_names(index: int, fmt: str) -> tuple[str, str | None]:
    """``(embeddings file, metadata file or None)`` relative to the export folder."""
    n = str(index).zfill(_DIGITS)
    if fmt == "parquet":
        return f"{EMB_DIR}/img_emb_{n}.parquet", None
    return f"{EMB_DIR}/img_emb_{n}.npy", f"{META_DIR}/metadata_{n}.parquet"


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(folder / MANIFEST_NAME, manifest.to_json())


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest; None when it has none.  A damaged one refuses the export (the
    shards it listed cannot be told from leftovers any more): never guessed around."""
    path = folder / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExportRefused(f"{path}: cannot read the manifest ({exc})") from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError(f"not a JSON object but {type(doc).__name__}")
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, this trainingd writes "
                             f"{MANIFEST_VERSION}")
        fmt = doc["format"]
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}")
        projects = doc["projects"]
        if projects is not None and not (isinstance(projects, list)
                                         and all(isinstance(p, str) for p in projects)):
            raise ValueError(f"projects {projects!r}")
        dim = doc.get("dim")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim {dim!r}")
        shards = [_shard(s, fmt) for s in doc["shards"]]
        if not isinstance(doc["embedder_id"], str) or not doc["embedder_id"]:
            raise ValueError(f"embedder_id {doc['embedder_id']!r}")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ExportRefused(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:200]}); the shards it "
            "listed cannot be told apart from leftovers: export to a new --out folder") from exc
    return Manifest(doc["embedder_id"], fmt, projects, dim, shards)


def _shard(raw: Any, fmt: str) -> Shard:
    if not isinstance(raw, dict):
        raise ValueError(f"shard entry {raw!r}")
    index, rows = raw["index"], raw["rows"]
    if not isinstance(index, int) or not isinstance(rows, int) or index < 0 or rows < 1:
        raise ValueError(f"shard index/rows {index!r}/{rows!r}")
    emb, meta = shard_names(index, fmt)
    if raw["embeddings"] != emb or raw.get("metadata") != meta:
        raise ValueError(f"shard {index} names {raw['embeddings']!r}, expected {emb!r}")
    first, last = raw["first_key"], raw["last_key"]
    if not (isinstance(first, list) and isinstance(last, list)):
        raise ValueError(f"shard {index} keys {first!r}/{last!r}")
    return Shard(index, rows, emb, meta, int(raw["distinct_hashes"]), [str(k) for k in first],
                 [str(k) for k in last], str(raw["written_at"]))


def unlisted_files(folder: Path, manifest: Manifest) -> list[Path]:
    """Shard-named files the manifest does not list: what a killed export left behind."""
    listed = {name for s in manifest.shards for name in (s.embeddings, s.metadata) if name}
    out: list[Path] = []
    for sub in (EMB_DIR, META_DIR):
        d = folder / sub
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if _SHARD_RE.match(p.name) and f"{sub}/{p.name}" not in listed:
                out.append(p)
    return out


def foreign_entries(folder: Path) -> list[str]:
    """What makes a folder without a manifest not ours to write into (a clip-retrieval
    export, anything else): every entry except empty shard folders."""
    found: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name in (EMB_DIR, META_DIR) and p.is_dir() and not any(p.iterdir()):
            continue
        if p.name == LOCK_NAME:
            continue
        found.append(p.name)
    return found
