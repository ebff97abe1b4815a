"""Embedding throughput and memory on real photos: ViT-B-32, random init, on the CPU.

Real photos from scikit-image's bundled sample data (``pip install scikit-image``), each
re-encoded as a 2048x2048 JPEG (quality 90) and PNG.  To get N files with distinct content
hashes without encoding N PNGs, each file is one of the encoded photos plus a few unique bytes
after its end marker (JPEG EOI / PNG IEND): decoders ignore them, the cache key sees new bytes.

Prints, per format, in one run:
  model-only throughput at the configured batch size (preprocessed tensors -> vectors),
  end-to-end throughput (files on disk -> vectors in the cache, EmbeddingStage.run),
  their ratio (target >= 0.85 for JPEG),
  the speedup over a naive loop that opens, converts and embeds one image at a time and saves
  one .npy per image, as the old scripts did (target >= 1.6x),
  peak RSS of whole runs over 500 and 2,000 images, each in its own subprocess (flat: <10%).

Usage: python bench/embed_bench.py [--sizes 500,2000] [--formats jpeg,png] [--files 192]
Quick look: --sizes 64,128 --files 64 --naive 8 --rounds 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "retina.jpg", "hubble_deep_field.jpg", "ihc.png")
SIDE = 2048


def photos() -> list[object]:
    try:
        import skimage.data as data
    except ImportError:
        print("embed_bench: needs scikit-image for its bundled sample photos: "
              "pip install scikit-image", file=sys.stderr)
        raise SystemExit(2) from None
    from PIL import Image

    out = []
    folder = Path(data.__file__).parent  # the photos ship inside the wheel: no download
    for name in PHOTOS:
        img = Image.open(folder / name).convert("RGB")
        side = min(img.size)
        img = img.crop((0, 0, side, side)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        out.append(img)
        out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return out


def encoded(fmt: str) -> list[bytes]:
    blobs = []
    for img in photos():
        buf = io.BytesIO()
        if fmt == "jpeg":
            img.save(buf, "JPEG", quality=90)  # type: ignore[attr-defined]
        else:
            img.save(buf, "PNG", compress_level=6)  # type: ignore[attr-defined]
        blobs.append(buf.getvalue())
    return blobs


def write_files(folder: Path, fmt: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    blobs = encoded(fmt)
    ext = ".jpg" if fmt == "jpeg" else ".png"
    paths = []
    for i in range(count):
        path = folder / f"20250101_{i:06d}_stage3_enhanced{ext}"
        path.write_bytes(blobs[i % len(blobs)] + b"trainingd-bench-%08d" % i)
        paths.append(path)
    return paths


def bench_settings(data_root: Path, batch: int) -> object:
    from daemon.settings import EmbeddingSettings, Settings

    s = Settings().with_data_root(data_root)
    emb = EmbeddingSettings(model="ViT-B-32", pretrained="none", device="cpu", batch_size=batch)
    new = s.model_copy(update={"embedding": emb})
    new._base_dir = s.base_dir
    return new


def model_rate(emb: object, sample: Path, batch: int, reps: int) -> float:
    """Model-only throughput: one preprocessed batch through ``embed`` ``reps`` times."""
    import torch
    from PIL import Image

    tensor = emb.preprocess(Image.open(sample).convert("RGB"))  # type: ignore[attr-defined]
    x = torch.stack([tensor] * batch)
    emb.embed(x)  # type: ignore[attr-defined]  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        emb.embed(x)  # type: ignore[attr-defined]
    return batch * reps / (time.perf_counter() - start)


def end_to_end(paths: list[Path], batch: int, embedder: object | None = None
               ) -> tuple[float, object]:
    """Files on disk -> vectors in a fresh cache with EmbeddingStage; returns (img/s, the
    embedder, so later rounds reuse the loaded model)."""
    from daemon.embedding.stage import EmbeddingStage
    from daemon.records import ImageCandidate
    from daemon.store import StateStore

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        settings = bench_settings(Path(tmp), batch)
        store = StateStore(settings.state_db)  # type: ignore[attr-defined]
        stage = EmbeddingStage(settings, store, embedder=embedder)  # type: ignore[arg-type]
        _ = stage.embedder, stage.cache  # model load is not part of the timing
        start = time.perf_counter()
        result = stage.run([ImageCandidate("bench", p.name, p) for p in paths])
        seconds = time.perf_counter() - start
        store.close()
    assert result.embedded == len(paths), result
    return len(paths) / seconds, stage.embedder


def naive(emb: object, paths: list[Path]) -> float:
    """The old scripts: open, convert, preprocess (open_clip's transform at full size) and
    embed one image at a time, one .npy each; same model and threads."""
    import numpy as np
    import torch
    from PIL import Image

    model, preprocess = emb._model, emb._preprocess  # type: ignore[attr-defined]
    out = Path(tempfile.mkdtemp(prefix="embed-naive-"))
    start = time.perf_counter()
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        with torch.inference_mode():
            vec = model.encode_image(preprocess(image).unsqueeze(0))
        np.save(out / f"{i}.npy", vec[0].numpy())
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return len(paths) / seconds


def child(mode: str, folder: Path, count: int, args: argparse.Namespace) -> None:
    """``speed``: rounds of model-only / end-to-end / naive, alternating, best of each (the
    machine is shared; the best round is the least disturbed).  ``memory``: one end-to-end run
    over ``count`` files, then peak RSS.  Prints one JSON line."""
    from daemon.logs import configure_logging

    configure_logging("error", "json", sys.stderr)
    paths = sorted(folder.iterdir())[:count]
    doc: dict[str, float] = {"count": count}
    if mode == "memory":
        doc["rate"], _ = end_to_end(paths, args.batch_size)
    else:
        rates: dict[str, list[float]] = {"model": [], "e2e": [], "naive": []}
        emb: object | None = None
        for _ in range(args.rounds):
            rate, emb = end_to_end(paths, args.batch_size, emb)
            rates["e2e"].append(rate)
            rates["model"].append(model_rate(emb, paths[0], args.batch_size, args.reps))
            rates["naive"].append(naive(emb, paths[: args.naive]))
        doc |= {k: max(v) for k, v in rates.items()}
    doc["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(doc))


def run_child(mode: str, folder: Path, count: int, argv: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", mode, str(folder),
                          str(count)], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000", help="file counts of the memory runs")
    parser.add_argument("--formats", default="jpeg,png")
    parser.add_argument("--files", type=int, default=192, help="files per end-to-end round")
    parser.add_argument("--naive", type=int, default=24, help="images per naive round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=4, help="model-only batches per round")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]), args)
        return 0
    argv = [f"--batch-size={args.batch_size}", f"--reps={args.reps}", f"--naive={args.naive}",
            f"--rounds={args.rounds}"]
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads; ViT-B-32 random init on cpu, "
          f"batch {args.batch_size}; best of {args.rounds} alternating rounds")
    for fmt in args.formats.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"embed-bench-{fmt}-"))
        try:
            paths = write_files(work / "photos", fmt, max([*sizes, args.files]))
            mb = sum(p.stat().st_size for p in paths[:16]) / 16 / 1e6
            speed = run_child("speed", work / "photos", args.files, argv)
            mem = [run_child("memory", work / "photos", n, argv) for n in sizes]
            print(f"[{fmt}] files: {SIDE}x{SIDE}, {mb:.1f} MB each")
            print(f"[{fmt}] model-only: {speed['model']:.2f} img/s")
            print(f"[{fmt}] end-to-end: {speed['e2e']:.2f} img/s ({args.files} files -> "
                  "vectors in cache)")
            print(f"[{fmt}] ratio end-to-end/model-only: {speed['e2e'] / speed['model']:.2f} "
                  "(target >= 0.85 for JPEG)")
            print(f"[{fmt}] naive one-at-a-time loop: {speed['naive']:.2f} img/s; speedup "
                  f"{speed['e2e'] / speed['naive']:.2f}x (target >= 1.6x)")
            rss = ", ".join(f"{int(r['count'])} images {r['rss_mb']:.0f} MB "
                            f"({r['rate']:.1f} img/s)" for r in mem)
            growth = (mem[-1]["rss_mb"] / mem[0]["rss_mb"] - 1) * 100
            print(f"[{fmt}] peak RSS: {rss}; {growth:+.1f}% (target within 10%)")
            sys.stdout.flush()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
