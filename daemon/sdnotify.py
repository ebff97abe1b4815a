"""The systemd notify protocol (READY, STATUS, WATCHDOG, STOPPING) without a dependency.

A datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (``@`` = abstract namespace).
Outside systemd every call is a cheap no-op.  Must not raise: a lost notification only means
systemd learns less, and the watchdog will say so.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("service")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            # ping at half the interval, as sd_watchdog_enabled(3) recommends
            self.watchdog_seconds = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode())
            return True
        except OSError as exc:
            log.warning("service.notify_failed", error=str(exc), message=fields[0][:40])
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading config")
