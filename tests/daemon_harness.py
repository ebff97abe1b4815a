"""Runs ``trainingd run`` as a real subprocess and reads its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def write_config(path: Path, text: str = "", *, image_roots: dict[str, list[Path]] | None = None
                 ) -> Path:
    # the daemon tests start on an empty tree: the decisions folder is made for them
    lines = ['[paths]', 'data_root = "data"', "create_missing = true", "", "[watcher]",
             "settle_seconds = 0.2", "max_wait_seconds = 1.0", "", "[service]",
             "heartbeat_seconds = 0.5", "shutdown_budget_seconds = 10", "", text]
    for project, roots in (image_roots or {}).items():
        lines += [f"[projects.{project}]",
                  "image_roots = [" + ", ".join(json.dumps(str(r)) for r in roots) + "]"]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        environ.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        environ.update(env or {})
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config), "--log-format",
             "json"], stdout=self.log_file, stderr=subprocess.STDOUT, env=environ,
            cwd=config.parent)

    def records(self) -> list[Record]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "non_json_line", "line": line})
        return out

    def wait_for(self, pred: Callable[[Record], bool], timeout: float = 30.0,
                 what: str = "") -> Record:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.records():
                if pred(rec):
                    return rec
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(json.dumps(r)[:300] for r in self.records()[-25:])
        raise AssertionError(f"timed out waiting for {what or pred}; exit={self.proc.poll()}\n"
                             f"{tail}")

    def wait_event(self, event: str, timeout: float = 30.0, **facts: Any) -> Record:
        return self.wait_for(lambda r: r.get("event") == event and all(
            r.get(k) == v for k, v in facts.items()), timeout, what=f"{event} {facts}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log_file.close()


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or pred}")
