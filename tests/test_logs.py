"""Logs: JSON lines off a TTY, ISO UTC timestamps, stdlib logging through the same renderer,
exceptions as structured tracebacks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from daemon.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("info", "auto", stream=buf)
    yield buf
    configure_logging("info", "auto")


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


class TestJsonLines:
    """What operators get from journalctl -o cat | jq."""

    def test_event_with_facts_as_keys(self, stream: io.StringIO) -> None:
        structlog.get_logger("validation").info("validation.project_checked", project="mojo3",
                                                rows_checked=7)
        (rec,) = lines(stream)
        assert rec["event"] == "validation.project_checked" and rec["rows_checked"] == 7
        assert rec["level"] == "info" and rec["logger"] == "validation"
        assert str(rec["timestamp"]).endswith("Z")

    def test_stdlib_logging_uses_the_same_renderer(self, stream: io.StringIO) -> None:
        logging.getLogger("watchdog.observers").warning("inotify queue overflow")
        (rec,) = lines(stream)
        assert rec["event"] == "inotify queue overflow" and rec["level"] == "warning"
        assert rec["logger"] == "watchdog.observers" and "timestamp" in rec

    def test_exception_is_a_structured_traceback(self, stream: io.StringIO) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("worker").exception("worker.task_failed", task="validate")
        (rec,) = lines(stream)
        exc = rec["exception"]
        assert isinstance(exc, list) and exc[0]["exc_type"] == "ValueError"
        assert exc[0]["exc_value"] == "boom" and exc[0]["frames"]

    def test_console_format_is_not_json(self) -> None:
        buf = io.StringIO()
        configure_logging("info", "console", stream=buf)
        try:
            structlog.get_logger("x").info("demo.started", rows=3)
            assert "demo.started" in buf.getvalue()
            with pytest.raises(json.JSONDecodeError):
                json.loads(buf.getvalue())
        finally:
            configure_logging("info", "auto")


class TestEventChatter:
    """watchdog logs one debug line per file-system event; even at debug level they are not
    ours to print (the latency bench runs at debug: they cost more CPU than the validation)."""

    def test_debug_level_keeps_our_lines_and_drops_watchdogs(self) -> None:
        """Our debug line is written, watchdog's per-event debug line is not, its warning is."""
        buf = io.StringIO()
        try:
            configure_logging("debug", "json", stream=buf)
            logging.getLogger("daemon.watcher").debug("ours")
            logging.getLogger("watchdog.observers.inotify_buffer").debug("in-event %s", 1)
            logging.getLogger("watchdog.observers").warning("queue overflow")
        finally:
            configure_logging("info", "auto")
        text = buf.getvalue()
        assert '"ours"' in text and "queue overflow" in text
        assert "in-event" not in text
