"""What the running demo tells its terminal: the daemon's state in words, and the one live line.

Split from :mod:`daemon.demo.run` along its seam: the conductor decides what happens next;
this room only describes what the daemon is doing (read from the service's own attributes,
never changing them) and prints it so a person sees why the demo is still waiting.  On a
terminal the live line is rewritten in place; elsewhere (a pipe, a test) it is printed when
the step changes and then every ``QUIET_LINE_SECONDS``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, TextIO

from daemon.logs import is_tty

if TYPE_CHECKING:
    from daemon.service import Service

#: without a terminal, the live line is printed when the step changes and then this often
QUIET_LINE_SECONDS = 15.0


def model_state(service: Service) -> str:
    """The first pass in words: validating, loading the model (slow), loaded or failed."""
    pipeline = getattr(service, "pipeline", None)
    if pipeline is None:
        return "starting"
    if pipeline.embedding_disabled:
        return f"embedding disabled ({pipeline.embedding_disabled})"
    state = pipeline.model.state
    if state == "loaded":
        return "embedding model loaded"
    if state == "loading":
        return ("loading the embedding model (importing torch and building CLIP: slow on "
                "a busy machine)")
    if state == "failed":
        return f"embedding model failed to load ({pipeline.model.error})"
    return "validating the decision DBs"


def working(service: Service) -> str:
    """The worker's current task (``embed studio``) or ``idle``."""
    current = service.current
    if current is None:
        return "idle"
    return f"{current.kind}" + (f" {current.project}" if current.project else "")


def queue_text(service: Service) -> str:
    """``queue 3 (embed, predict)``."""
    queue = getattr(service, "queue", None)
    if queue is None:
        return "queue -"
    kinds = queue.pending_kinds()
    return f"queue {queue.depth()}" + (f" ({', '.join(kinds)})" if kinds else "")


class LiveLine:
    """The one line saying what the demo waits for (thread-safe: the conductor writes it, the
    main thread may clear it at the end)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = is_tty(out)
        self._shown = ("", 0.0)
        self._lock = threading.Lock()

    def show(self, step: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            last_step, shown_at = self._shown
            if self.tty:
                self.out.write("\r\x1b[K" + line[:max(40, _columns() - 1)])
                self.out.flush()
            elif last_step != step or now - shown_at >= QUIET_LINE_SECONDS:
                print(line, file=self.out, flush=True)
            else:
                return
            self._shown = (step, now)

    def clear(self) -> None:
        with self._lock:
            if self.tty and self._shown[0]:
                self.out.write("\r\x1b[K")
                self.out.flush()
            self._shown = ("", 0.0)


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100
