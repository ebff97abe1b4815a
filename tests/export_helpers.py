"""A state DB and vector cache filled the way the embedding stage fills them (the real ledger
and cache writers), and readers for an export folder, shared by the export tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import FileRow, Ledger, VectorRow
from daemon.settings import Settings
from daemon.store import StateStore

EMBEDDER = "ViT-T:random-init-seed0:pp1-draft"
OTHER_EMBEDDER = "ViT-T:random-init-seed1:pp1-draft"
DIM = 16
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    out: np.ndarray = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def sha_of(seed: int) -> str:
    return hashlib.sha256(f"image bytes {seed}".encode()).hexdigest()


def add_images(settings: Settings, seeds: list[int], *, project: str = "mojo3",
               embedder_id: str = EMBEDDER, dim: int = DIM, sha_seed: dict[int, int] | None = None
               ) -> dict[tuple[str, str], tuple[str, np.ndarray]]:
    """Record one image file per seed (``/images/<project>/img_<seed>_stage2_upscaled.jpg``)
    with its vector; ``sha_seed`` maps a seed to the seed of the bytes it shares.  Returns
    (project, path) -> (sha, vector)."""
    store = StateStore(settings.state_db)
    cache = VectorCache(settings.cache_dir, embedder_id)
    cache.prepare()
    out: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    files: list[FileRow] = []
    vectors: list[VectorRow] = []
    items: list[tuple[str, np.ndarray]] = []
    try:
        for seed in seeds:
            content = (sha_seed or {}).get(seed, seed)
            sha, vec = sha_of(content), unit(content, dim)
            name = f"img_{seed}_stage2_upscaled.jpg"
            path = f"/images/{project}/{name}"
            files.append(FileRow(project, path, name, 1000 + seed, seed, sha, "ok",
                                 width=640 + seed, height=480))
            vectors.append(VectorRow(sha, embedder_id, dim, 640 + seed, 480))
            items.append((sha, vec))
            out[(project, path)] = (sha, vec)
        cache.write_vectors(items)
        Ledger(store).record(files, vectors, NOW, embedder_id)
    finally:
        store.close()
    return out


def read_npy_export(folder: Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every vector and metadata row of an npy export, with pyarrow + numpy, in file order."""
    import pyarrow.parquet as pq

    embs = sorted((folder / "img_emb").glob("img_emb_*.npy"))
    metas = sorted((folder / "metadata").glob("metadata_*.parquet"))
    assert [p.stem.split("_")[-1] for p in embs] == [p.stem.split("_")[-1] for p in metas]
    blocks, rows = [], []
    for e, m in zip(embs, metas, strict=True):
        block = np.load(e, allow_pickle=False)
        table = pq.read_table(m).to_pylist()
        assert block.shape[0] == len(table)
        blocks.append(block)
        rows.extend(table)
    return (np.concatenate(blocks) if blocks else np.empty((0, DIM), np.float32)), rows


def expected_by_key(images: dict[tuple[str, str], tuple[str, np.ndarray]]
                    ) -> dict[tuple[str, str, str], np.ndarray]:
    return {(sha, p, path): vec for (p, path), (sha, vec) in images.items()}


def exported_by_key(vectors: np.ndarray, rows: list[dict[str, Any]]
                    ) -> dict[tuple[str, str, str], np.ndarray]:
    out: dict[tuple[str, str, str], np.ndarray] = {}
    for vec, row in zip(vectors, rows, strict=True):
        key = (row["sha256"], row["project"], row["image_path"])
        assert key not in out, f"row exported twice: {key}"
        out[key] = vec
    return out


def cli(settings: Settings, *args: str, umask: int | None = None, **kw: Any
        ) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    environ["TRAININGD_PATHS__DATA_ROOT"] = str(settings.data_root)
    return subprocess.run(
        [sys.executable, "-m", "daemon", "export", "embeddings", *args], env=environ,
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None, **kw)


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """path -> (inode, mtime_ns, bytes) of every file under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".export.lock":
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out
