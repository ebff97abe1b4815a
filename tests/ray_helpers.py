"""Helpers of the Ray backend tests: the subprocess that drives a real local Ray cluster, and the
check that no Ray process outlives a test.

Run as a script it is the driver (a subprocess, so a test can SIGKILL it, and so Ray's driver
threads never live in the pytest process):

    ray_helpers.py embed DATA_ROOT IMAGE_ROOT PAUSE_S   trainingd's Ray path (embed_with_ray),
                                                        pausing PAUSE_S after each written batch
    ray_helpers.py daemon DATA_ROOT IMAGE_ROOT          the daemon's stage with ray_address set
    ray_helpers.py cli CONFIG                           ``trainingd embed --backend ray --json``

Each registers the tests' tiny open_clip model first (the Ray actors get its config from the
driver).  Ray keeps its files under ``$RAY_TMPDIR``, which the tests set per test: a Ray process
outliving a test is found by that folder on its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.embedding_helpers import register_tiny, with_embedding

RAY_SETTINGS = {"batch_size": 2, "ray_local_cpus": 2}


def ray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line or environment names ``marker`` (a test's
    RAY_TMPDIR)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{name}/{part}", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
                        break
            except OSError:
                break
    return found


def wait_no_ray_processes(marker: str, timeout_s: float = 180.0) -> list[int]:
    """Poll until no process names ``marker``; kill (and return) what is left at the end.
    After a driver's SIGKILL, Ray's dashboard and runtime-env agents notice their raylet is
    gone and exit by themselves, about 60-110 s later on a loaded 2-core box."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = ray_processes(marker)
        if not left:
            return []
        time.sleep(0.2)
    left = ray_processes(marker)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def _settings(data_root: Path, image_root: Path, **extra: object) -> object:
    from daemon.settings import Settings

    return with_embedding(Settings().with_data_root(data_root), {"p": [image_root]},
                          **RAY_SETTINGS, **extra)


def _main(argv: list[str]) -> int:
    register_tiny()
    from daemon.embedding.stage import EmbeddingStage, candidates_from_roots
    from daemon.store import StateStore

    if argv[0] == "cli":
        from daemon.cli import main

        return main(["embed", "--backend", "ray", "--json", "--config", argv[1]])
    data_root, image_root = Path(argv[1]), Path(argv[2])
    if argv[0] == "daemon":
        settings = _settings(data_root, image_root, ray_address="local", ray_min_backlog=1)
        store = StateStore(settings.state_db)  # type: ignore[attr-defined]
        result = EmbeddingStage(settings, store).run(  # type: ignore[arg-type]
            candidates_from_roots(settings))  # type: ignore[arg-type]
    else:
        from daemon.embedding.cli import embed_with_ray

        pause = float(argv[3])
        settings = _settings(data_root, image_root)
        store = StateStore(settings.state_db)  # type: ignore[attr-defined]
        result = embed_with_ray(
            settings, store, candidates_from_roots(settings),  # type: ignore[arg-type]
            progress=lambda done, total: time.sleep(pause) if done else None)
    store.close()
    print(json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
