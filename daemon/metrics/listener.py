"""The optional HTTP listener: ``GET /metrics`` (Prometheus text format) and ``GET /healthz``.

Why hand-written instead of ``prometheus_client.start_http_server``: ``/healthz`` must answer
beside ``/metrics``, access lines must not reach the JSON log stream as plain text, and the
listener must stop when the service stops (an in-process run leaves nothing behind).

Loopback only unless ``metrics.allow_remote`` (checked when the settings load: exit 78).  A
listener that cannot start (port taken; the hardened unit allows no AF_INET socket) is a logged
error, never a stopped daemon: validation goes on, and the textfile output still works.
Requests are served on their own threads; none of them waits on the worker.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _latest

from daemon.metrics.core import Metrics
from daemon.settings import parse_listen

log = structlog.get_logger("metrics")

_HINTS = {
    errno.EADDRINUSE: "another process listens on that port: choose another metrics.listen",
    errno.EAFNOSUPPORT: "the systemd unit allows no network sockets "
                        "(RestrictAddressFamilies=AF_UNIX): add the drop-in of "
                        "Documents/METRICS.md, or use metrics.textfile instead",
    errno.EPERM: "network sockets are not permitted here (the systemd unit's system call "
                 "filter?): add the drop-in of Documents/METRICS.md, or use metrics.textfile",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1024",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    metrics: Metrics
    process: CollectorRegistry


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "trainingd"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body = self.server.metrics.exposition() + _latest(self.server.process)
                self._send(200, CONTENT_TYPE_LATEST, body)
            elif path == "/healthz":
                health = self.server.metrics.health()
                self._send(200 if health.ok else 503, "application/json",
                           (json.dumps(health.body(), sort_keys=True) + "\n").encode())
            else:
                self._send(404, "text/plain; charset=utf-8",
                           b"trainingd: try /metrics or /healthz\n")
        except Exception as exc:  # a failing scrape is a 500 and a log line, never a crash
            log.exception("metrics.request_failed", path=path)
            self._send(500, "text/plain; charset=utf-8",
                       f"trainingd: {type(exc).__name__}\n".encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client went away

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access lines would be plain text on the JSON log stream


class Listener:
    """The running HTTP server (``port`` is the bound one: ``:0`` picks a free port)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.port = int(server.server_address[1])
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="metrics-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def start_listener(metrics: Metrics, listen: str) -> Listener | None:
    """Bind and serve; ``None`` (with an error logged) when the socket cannot be had."""
    host, port = parse_listen(listen)
    if host.lower() == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("_BoundServer", (_Server,), {"address_family": family})
    try:
        server = server_cls((host, port), _Handler)
    except OSError as exc:
        log.error("metrics.listen_failed", listen=listen, error=f"{type(exc).__name__}: {exc}",
                  hint=_HINTS.get(exc.errno or 0, "see Documents/METRICS.md"),
                  action="running without /metrics and /healthz")
        return None
    server.metrics = metrics
    server.process = CollectorRegistry()
    ProcessCollector(registry=server.process)
    listener = Listener(server)
    log.info("metrics.listening", host=host, port=listener.port,
             endpoints=["/metrics", "/healthz"])
    return listener
