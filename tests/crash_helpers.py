"""Checks and tools of the kill -9 test (tests/test_crash_kill9.py), also used by the soak bench.

The checks answer two questions about a data tree after crashes: is any file under a final
name incomplete (a torn ``.npy``, half a JSON document, a DB that fails its integrity check),
and did a killed writer leave a temp file behind that no later clean run removed.  They only
read; they never repair.

Run as a script it is ``trainingd`` itself (``daemon.cli.main``) with two test seams set, so
the kill test can run the real CLI commands as real processes: the tiny random-init open_clip
config is registered (``embed``, ``run``) and ``train`` builds its vectors with the test helpers'
``hash_source`` (the CLI has no flag for the vector source; the runner takes it as a
parameter).  Everything else is the shipped code path.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Names a killed writer leaves: our atomic writer's ``.<name>.<random>.tmp``, any other
#: ``*.tmp``/``*.partial``, and a rollback journal (a non-WAL DB killed mid-transaction).
TEMP_SUFFIXES = (".tmp", ".partial", "-journal")
#: Scratch folders our commands make under $TMPDIR (backfill's scratch DB, training's
#: settings hand-over); a SIGKILL skips their cleanup.
SCRATCH_PREFIXES = ("trainingd-",)


def leftover_temps(*roots: Path, scratch: Path | None = None) -> list[Path]:
    """Every temp file under ``roots`` and every scratch folder of ours in ``scratch``."""
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob("*")
                      if p.name.endswith(TEMP_SUFFIXES) or p.name.startswith(".~")]
    if scratch is not None and scratch.is_dir():
        found += [p for p in scratch.iterdir() if p.name.startswith(SCRATCH_PREFIXES)]
    return sorted(found)


def _is_temp(path: Path) -> bool:
    return path.name.endswith(TEMP_SUFFIXES)


def check_file(path: Path) -> str | None:
    """Why ``path`` is not a complete file of its kind, or None when it is."""
    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_bytes())
        elif suffix == ".jsonl":
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                return "last line has no newline (torn append)"
            for line in data.splitlines():
                json.loads(line)
        elif suffix == ".npy":
            import numpy as np

            vec = np.load(path, allow_pickle=False)
            if vec.size == 0 or not np.isfinite(vec).all():
                return f"vector of shape {vec.shape} is empty or not finite"
        elif suffix == ".pt":
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not state:
                return "not a non-empty state_dict"
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        elif suffix == ".md":
            if not path.read_text(encoding="utf-8").strip():
                return "empty report"
        elif suffix == ".db":
            return check_db(path)
    except Exception as exc:  # any failure to read it whole is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


def check_db(path: Path) -> str | None:
    """``PRAGMA integrity_check`` through a read-only immutable open (creates no file)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return None if result == "ok" else f"integrity_check: {result}"


def partial_files(root: Path, *, skip: Iterable[Path] = ()) -> list[str]:
    """``path: reason`` for every incomplete file under a final name below ``root``."""
    skipped = {p.resolve() for p in skip}
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _is_temp(path) or path.resolve() in skipped:
            continue
        if any(parent.resolve() in skipped for parent in path.parents):
            continue
        why = check_file(path)
        if why is not None:
            out.append(f"{path}: {why}")
    return out


def _main(argv: list[str]) -> int:
    from daemon import cli

    if argv and argv[0] in ("embed", "run"):
        from tests.embedding_helpers import register_tiny

        register_tiny()
    if argv and argv[0] == "train":
        from daemon.training import runner

        runner.train_model = functools.partial(  # type: ignore[assignment]
            runner.train_model, vectors_factory="tests.test_training_helpers:hash_source")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
