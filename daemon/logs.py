"""The one ``structlog.configure()`` of trainingd.

JSON lines when the stream is not a TTY (systemd, pipes: ``journalctl -o cat | jq``), readable
console output on a TTY.  ISO-8601 UTC timestamps; exceptions as structured tracebacks in JSON.
Events are named ``room.what_happened`` with facts as keys.

Every line on the stream is one record of the same renderer, because one plain-text line breaks
every ``jq`` recipe: third-party libraries that use stdlib ``logging`` (open_clip logs on the
*root* logger), Python warnings (``warnings.showwarning`` routed here, the structured form of
``logging.captureWarnings``), uncaught exceptions at top level and in threads, and the
second-SIGINT line (:class:`PrerenderedLine`, written with ``os.write`` from a signal handler).

Under systemd (``JOURNAL_STREAM`` names the stream's device and inode, sd-daemon(3)) each line
starts with its syslog priority, ``<3>`` error ... ``<7>`` debug: journald strips the prefix
(``SyslogLevelPrefix=``, on by default) and files the line at that priority, so
``journalctl -p warning`` works and ``journalctl -o cat | jq`` still sees one JSON object.

Chatty libraries (open_clip, PIL, matplotlib, urllib3, huggingface_hub, filelock, ...) are kept
at warning unless the level is debug.  This module must not import torch or any heavy library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
#: syslog priorities (sd-daemon(3) ``SD_ERR`` ...) by logging level
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
#: top-level logger names whose info and debug lines are noise in the journal
CHATTY_LOGGERS = ("open_clip", "PIL", "matplotlib", "urllib3", "huggingface_hub", "filelock",
                  "timm", "torch", "torchvision", "fsspec", "httpx", "httpcore", "asyncio",
                  "h5py", "numexpr", "safetensors", "apscheduler")
#: loggers with a debug line per file-system event (watchdog's inotify reader logs every one):
#: at debug level they would cost more CPU than the validation they announce, so they stay at
#: info even then (and at warning otherwise)
EVENT_LOGGERS = ("watchdog",)


@dataclass(slots=True)
class _StreamState:
    """Where log lines go, for writers that must not touch the logging machinery (a signal
    handler may interrupt a thread holding the handler's lock)."""

    fd: int = 2
    journal: bool = False


_STATE = _StreamState()
_ORIGINAL_HOOKS: dict[str, Any] = {}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: error 3, warning 4, info 6, debug 7."""
    return next((prio for floor, prio in _PRIORITIES if levelno >= floor), 7)


def journal_stream_matches(fd: int, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``fd`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:ino``).

    A variable inherited by a child whose output was redirected elsewhere does not match, so
    a file or a pipe never gets ``<N>`` prefixes."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that prefixes each line with its syslog priority on a journal stream."""

    def __init__(self, stream: TextIO, *, journal: bool) -> None:
        super().__init__(stream)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        # console output can span lines (tracebacks): journald files each line on its own
        return "\n".join(prefix + line for line in text.split("\n"))


class ChatterFilter(logging.Filter):
    """Drops info and debug lines of chatty libraries and of the root logger (our own code
    always logs under a room name; open_clip logs on the root logger), unless ``verbose``."""

    def __init__(self, *, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name != "root" and record.name.split(".")[0] not in CHATTY_LOGGERS


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    stream = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not is_tty(stream))
    fd = _fileno(stream)
    journal = fd is not None and journal_stream_matches(fd)
    _STATE.fd, _STATE.journal = (fd if fd is not None else 2), journal
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_json:
        final: list[Any] = [structlog.processors.dict_tracebacks,
                            structlog.processors.JSONRenderer()]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=is_tty(stream))
        final = [renderer]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    root_level = _LEVELS.get(level, logging.INFO)
    verbose = root_level <= logging.DEBUG
    handler = JournalAwareHandler(stream, journal=journal)
    handler.setFormatter(formatter)
    handler.addFilter(ChatterFilter(verbose=verbose))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    for name in CHATTY_LOGGERS:
        # the filter drops their chatter; the level spares formatting it at all
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for name in EVENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    _install_hooks()


def _install_hooks() -> None:
    """Warnings and uncaught exceptions become records of the configured renderer."""
    if not _ORIGINAL_HOOKS:
        _ORIGINAL_HOOKS.update(showwarning=warnings.showwarning, excepthook=sys.excepthook,
                               threading=threading.excepthook)
    warnings.showwarning = _show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_crash


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    if file is not None:  # an explicit file (warnings.showwarning(..., file=f)): honour it
        _ORIGINAL_HOOKS["showwarning"](message, category, filename, lineno, file, line)
        return
    structlog.get_logger("py.warnings").warning(
        "python.warning_issued", category=category.__name__, message=str(message)[:2000],
        filename=filename, lineno=lineno)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C: a fact, not a crash to trace
        structlog.get_logger("python").warning("python.interrupted")
        return
    try:
        structlog.get_logger("python").error(
            "python.uncaught_exception", error_type=exc_type.__name__, error=str(exc)[:500],
            exc_info=(exc_type, exc, tb))
    except Exception:  # the logging itself failed: Python's own report is better than none
        _ORIGINAL_HOOKS["excepthook"](exc_type, exc, tb)


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # threading's own rule: SystemExit ends a thread quietly
        return
    try:
        structlog.get_logger("python").error(
            "python.thread_crashed", thread=args.thread.name if args.thread else None,
            error_type=args.exc_type.__name__, error=str(args.exc_value)[:500],
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    except Exception:
        _ORIGINAL_HOOKS["threading"](args)


class PrerenderedLine:
    """One JSON record rendered ahead of time, written with a single ``os.write``.

    For a signal handler: it may run while the interrupted code holds the logging handler's
    lock or is inside a buffered write, so it must not log.  Only the timestamp is filled in
    at write time (``time.strftime``: no locks), and the ``<N>`` prefix when on a journal."""

    def __init__(self, event: str, level: str, logger: str, **facts: Any) -> None:
        self.priority = syslog_priority(_LEVELS.get(level, logging.ERROR))
        body = json.dumps({"event": event, **facts, "level": level, "logger": logger})
        self._head = (body[:-1] + ', "timestamp": "').encode()

    def render(self, now: float | None = None) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        prefix = f"<{self.priority}>".encode() if _STATE.journal else b""
        return prefix + self._head + stamp.encode() + b'"}\n'

    def write(self) -> None:
        with contextlib.suppress(OSError):  # the stream is gone: nothing left to tell
            os.write(_STATE.fd, self.render())


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def is_tty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal; False for a closed, replaced or fake stream (a test's
    StringIO, a stream whose ``isatty`` raises), never an exception."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
