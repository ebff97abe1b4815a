"""The one ``structlog.configure()`` of trainingd.

JSON lines when the stream is not a TTY (systemd, pipes: ``journalctl -o cat | jq``), readable
console output on a TTY.  ISO-8601 UTC timestamps; exceptions as structured tracebacks in JSON.
Third-party libraries that use stdlib ``logging`` go through the same renderer, so the journal
never mixes formats.  Events are named ``room.what_happened`` with facts as keys.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    stream = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(stream))
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
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream))
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
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # APScheduler logs every job start and finish at INFO: our jobs log what they enqueue
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
