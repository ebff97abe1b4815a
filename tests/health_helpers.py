"""Helpers of the health and fail-soft tests: a daemon launcher with the tiny model registered,
an Embedder whose preprocessing blocks in a system call, and a slow training source.

Run as a script it is the daemon under test::

    python tests/health_helpers.py run CONFIG              # trainingd run, tiny model known
    python tests/health_helpers.py blocking CONFIG FIFO    # + preprocess blocks on FIFO

``blocking`` goes through the Embedder seam: its ``preprocess`` (run on a decode thread, as
every image is) opens ``FIFO`` the old way, a plain blocking ``open()``, and writes
``FIFO.blocked`` just before, so the test knows when the thread is stuck in the kernel.  That
is the shape of the original bug: a decode thread blocked for ever, the worker waiting on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon_harness import Daemon

ROOT = Path(__file__).resolve().parents[1]


class BlockingEmbedder:
    """The real tiny model, except that preprocessing blocks in ``open()`` on a FIFO."""

    def __init__(self, inner: Any, fifo: Path) -> None:
        self.inner = inner
        self.fifo = fifo

    @property
    def embedder_id(self) -> str:
        return str(self.inner.embedder_id)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    @property
    def image_size(self) -> int:
        return int(self.inner.image_size)

    def preprocess(self, image: Any) -> Any:
        Path(str(self.fifo) + ".blocked").write_text(str(os.getpid()))
        with open(self.fifo, "rb") as fh:  # the old, blocking way, on purpose
            fh.read()
        return self.inner.preprocess(image)

    def embed(self, batch: Any) -> Any:
        return self.inner.embed(batch)


def slow_vectors(settings: Any, store: Any) -> Any:
    """A training child's vector source that takes 4 s to build, then has nothing to give."""
    from daemon.errors import DaemonError

    time.sleep(4.0)
    raise DaemonError("no vectors in this test")


class Launched(Daemon):
    """:class:`Daemon`, but started through this script (tiny model, optional seam)."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        environ.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        environ.update(env or {})
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args, str(config)],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=environ, cwd=config.parent)


def tiny_embedding_toml() -> str:
    return ('[embedding]\nmodel = "trainingd-tiny"\npretrained = "none"\nbatch_size = 4\n'
            'decode_workers = 2\ndevice = "cpu"\n')


def release(fifo: Path) -> None:
    """Unblock a reader stuck in ``open(fifo)`` (a writer appears, then leaves: EOF)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def _main(argv: list[str]) -> int:
    from daemon.cli import main
    from tests.embedding_helpers import register_tiny

    register_tiny()
    mode = argv[0]
    if mode == "run":
        return main(["run", "--config", argv[1], "--log-format", "json"])
    if mode == "blocking":
        from daemon.embedding.model import load_embedder
        from daemon.logs import configure_logging
        from daemon.service import Service
        from daemon.settings import load_settings

        fifo, config = Path(argv[1]), argv[2]
        settings = load_settings(config)
        configure_logging(settings.logging.level, "json", stream=sys.stdout)
        embedder = BlockingEmbedder(load_embedder(settings.embedding), fifo)
        return Service(settings, config_path=settings.config_file, embedder=embedder).run()
    print(json.dumps({"event": "helper.bad_mode", "mode": mode}))
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(_main(sys.argv[1:]))
