"""Helpers of the lane tests: a daemon whose embedding and training wait on gate files.

Run as a script it is the daemon under test::

    python tests/lanes_helpers.py CONFIG GATE_DIR

With ``GATE_DIR/gate_load`` present, the heavy lane's model load waits at the ``load`` gate.
The Embedder seam's ``embed`` writes ``GATE_DIR/embed.waiting`` and then waits until
``GATE_DIR/embed.open`` exists; the training child's vector source (``gated_vectors``) writes
``GATE_DIR/train.waiting`` and waits for ``GATE_DIR/train.open``.  So the test knows, without
any timing, that the heavy lane is inside a batch (or a training run) when it commits rows,
and decides itself when the heavy work may go on.  Each wait gives up after two minutes so a
failing test never leaves a process behind for ever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GATE_ENV = "LANES_TEST_GATE_DIR"
BURN_ENV = "LANES_TEST_BURN"
GIVE_UP_SECONDS = 120.0


def wait_gate(gate_dir: Path, name: str, *, burn: bool = False) -> None:
    """Say that we wait at ``name``, then wait until the test opens it (``burn``: spinning
    one core meanwhile, as a real training run would; the latency bench uses it)."""
    (gate_dir / f"{name}.waiting").write_text(str(os.getpid()))
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while not (gate_dir / f"{name}.open").exists() and time.monotonic() < deadline:
        if burn:
            spin_until = time.monotonic() + 0.02
            while time.monotonic() < spin_until:
                pass
        else:
            time.sleep(0.02)


class GatedEmbedder:
    """The real tiny model behind the Embedder seam; each model call waits on the gate."""

    def __init__(self, inner: Any, gate_dir: Path) -> None:
        self.inner = inner
        self.gate_dir = gate_dir
        self.calls = 0

    @property
    def embedder_id(self) -> str:
        # with GATE_DIR/gate_load: the heavy lane's first look at the model (inside its
        # "loading the embedding model" step) waits on the "load" gate, as a cold torch
        # import or CUDA init would
        if (self.gate_dir / "gate_load").exists() and not getattr(self, "_loaded", False) \
                and threading.current_thread() is not threading.main_thread():
            self._loaded = True
            wait_gate(self.gate_dir, "load")
        return str(self.inner.embedder_id)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    @property
    def image_size(self) -> int:
        return int(self.inner.image_size)

    def preprocess(self, image: Any) -> Any:
        return self.inner.preprocess(image)

    def embed(self, batch: Any) -> Any:
        self.calls += 1
        wait_gate(self.gate_dir, "embed")
        return self.inner.embed(batch)


def gated_vectors(settings: Any, store: Any) -> Any:
    """A training child's vector source that waits on the gate, then has nothing to give."""
    from daemon.errors import DaemonError

    wait_gate(Path(os.environ[GATE_ENV]), "train", burn=bool(os.environ.get(BURN_ENV)))
    raise DaemonError("no vectors in this test")


def _main(argv: list[str]) -> int:
    from daemon.embedding.model import load_embedder
    from daemon.logs import configure_logging
    from daemon.service import Service
    from daemon.settings import load_settings
    from daemon.training import runner
    from tests.embedding_helpers import register_tiny

    register_tiny()
    config, gate_dir = argv[0], Path(argv[1])
    os.environ[GATE_ENV] = str(gate_dir)
    # the training child builds its vectors through the gate (the seam train_model offers)
    runner.train_model = partial(runner.train_model,  # type: ignore[assignment]
                                 vectors_factory="tests.lanes_helpers:gated_vectors")
    settings = load_settings(config)
    configure_logging(settings.logging.level, "json", stream=sys.stdout)
    embedder = GatedEmbedder(load_embedder(settings.embedding), gate_dir)
    return Service(settings, config_path=settings.config_file, embedder=embedder).run()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(_main(sys.argv[1:]))
