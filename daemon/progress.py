"""Progress of the bulk commands (``embed``, ``backfill``, later ``predict``): one helper, so each
command shows one bar with the right total and rate, and log lines never tear it.

On a terminal: one tqdm bar on stderr; while it is shown, console log records are written
through ``tqdm.write`` (``logging_redirect_tqdm``), which clears the bar, prints the line and
redraws the bar.  Off a terminal (journald, CI, a pipe) a carriage-return bar is garbage, so
instead a ``<room>.progress`` JSON record (done, total, unit, rate, eta_seconds) is logged every
``interval_seconds`` and once at the end.  :func:`phase` shows a long wait that has no count
(loading the model) as a spinner line on a terminal; off it, the log records of the phase say it.

The daemon's worker never uses this: its progress is the health stamp (:mod:`daemon.health`).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import structlog

from daemon.logs import is_tty

#: how often a progress record is logged off a terminal
PROGRESS_INTERVAL_SECONDS = 10.0
_SPINNER = "|/-\\"

#: what a stage calls after each unit of work: ``report(done, total)``
ProgressCallback = Callable[[int, int], None]


class ProgressReporter:
    """A ``(done, total)`` callback that draws a bar on a terminal or logs progress records."""

    def __init__(self, event: str, *, unit: str, desc: str, tty: bool,
                 stream: TextIO | None = None,
                 interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.unit = unit
        self.desc = desc
        self.tty = tty
        self.stream = stream if stream is not None else sys.stderr
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.done = 0
        self.total: int | None = None
        self._started: float | None = None
        self._last_logged: float | None = None
        self._bar: Any = None
        self._log = structlog.get_logger(event.split(".")[0])

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._started is None:
            self._started = self._last_logged = now
        self.done, self.total = done, total
        if self.tty:
            self._draw(done, total)
        elif self._last_logged is not None and now - self._last_logged >= self.interval_seconds:
            self._last_logged = now
            self._log_progress(now)

    def close(self) -> None:
        """End the bar (left on screen at its final count) or log the final record."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.tty and self.total is not None:
            self._log_progress(self.clock())

    def figures(self, now: float) -> dict[str, Any]:
        """done, total, rate (units per second) and eta_seconds at ``now``."""
        elapsed = now - self._started if self._started is not None else 0.0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, (self.total or 0) - self.done)
        eta = round(left / rate, 1) if rate > 0 else None
        return {"done": self.done, "total": self.total, "unit": self.unit,
                "rate": round(rate, 2), "eta_seconds": eta if left else 0.0}

    def _log_progress(self, now: float) -> None:
        self._log.info(self.event, desc=self.desc, **self.figures(now))

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=self.unit, desc=self.desc, file=self.stream,
                             smoothing=0.1, dynamic_ncols=True)
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)


@contextlib.contextmanager
def progress(event: str, *, unit: str, desc: str, stream: TextIO | None = None,
             interval_seconds: float = PROGRESS_INTERVAL_SECONDS
             ) -> Iterator[ProgressReporter]:
    """One bar (or progress records) for the block; console logging goes through the bar."""
    out = stream if stream is not None else sys.stderr
    reporter = ProgressReporter(event, unit=unit, desc=desc, tty=is_tty(out), stream=out,
                                interval_seconds=interval_seconds)
    with _logs_through_bars(reporter.tty):
        try:
            yield reporter
        finally:
            reporter.close()


@contextlib.contextmanager
def phase(label: str, *, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner line with the elapsed time on a terminal while the block runs (the model
    load); nothing extra off a terminal, where the block's own log records say it."""
    out = stream if stream is not None else sys.stderr
    if not is_tty(out):
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=label, file=out, bar_format="{desc} {elapsed}")
    done = threading.Event()

    def spin() -> None:
        for char in itertools.cycle(_SPINNER):
            if done.wait(0.2):
                return
            bar.set_description_str(f"{char} {label}", refresh=True)

    spinner = threading.Thread(target=spin, name="progress-spinner", daemon=True)
    with _logs_through_bars(True):
        spinner.start()
        try:
            yield
        finally:
            done.set()
            spinner.join()
            bar.set_description_str(f"{label}: done", refresh=False)
            bar.close()


@contextlib.contextmanager
def _logs_through_bars(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield

