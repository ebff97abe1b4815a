"""A guard that fails a test which leaves a thread or a child process running, or a signal handler
changed, as watchdog's own suite does.

Why: a thread or a child a test forgets keeps running into the next tests (a watcher still
enqueueing, a training child still writing, a ``sleep`` holding a pipe), so the failure shows up
far away, on a loaded machine only, or as a hang at exit. A daemon that does not join its threads
or reap its children on stop leaks in production the same way; this is where we notice. An
in-process service run must also put back the SIGTERM, SIGINT and SIGHUP handlers it installed,
or every later test (and pytest's own Ctrl-C) runs with the daemon's handlers.

How: :func:`take` records the live threads, the children and the handlers before a test;
:func:`check` compares after it. Threads and children that are stopping get a short grace
(joined / polled with a deadline, never a fixed sleep). What is left is reported *and* cleaned up so
that one leak fails one test, not every test after it: a leaked child is SIGKILLed and reaped, a
changed handler is restored. A leaked thread cannot be stopped from outside; it is named (with its
target) so the test or the daemon can be fixed. Zombies (children that ended, never waited for) are
reaped silently: they no longer run.

Children are read from ``/proc/self/task/*/children`` where the kernel has it, else by scanning
``/proc`` for processes whose parent is us. A grandchild orphaned by its parent (``sh -c 'sleep 60
&'``) is reparented to init and is not seen: making pytest a child subreaper would see it, but would
also keep killed daemons' orphans as our zombies, which ``os.kill(pid, 0)`` probes in the crash
tests would then take for alive. This module must not import the daemon: it is also loaded as a
plain pytest plugin (``-p tests.leak_guard``) by ``tests/test_guards.py``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

#: Handlers an in-process run may install and must put back.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long threads and children that are already stopping get to finish.
GRACE_SECONDS = 5.0


def _allowed_thread(thread: threading.Thread) -> str | None:
    """Why ``thread`` may outlive a test (it is process-wide, not the test's), or None."""
    if isinstance(thread, threading._DummyThread):
        # a native thread (a C library's, e.g. torch's or SQLite's callback) that merely called into
        # Python; Python 3.11 keeps its entry until exit, and nothing of ours started it
        return "a foreign native thread"
    if type(thread).__name__ == "TMonitor" and type(thread).__module__.startswith("tqdm"):
        # one per process, tqdm's own: it stops when the last bar is closed *and* collected
        return "tqdm's monitor"
    return None


def _allowed_children() -> set[int]:
    """Helper processes the standard library starts once per process and keeps until exit."""
    pids: set[int] = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        pid = getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)
        if isinstance(pid, int):
            pids.add(pid)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:
        pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
    fields = text.rpartition(")")[2].split()
    if len(fields) < 2:
        return None
    return int(fields[1]), fields[0]


def children() -> dict[int, str]:
    """Our direct children, as pid -> state letter ('Z' for a zombie)."""
    me = os.getpid()
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
        for tid in tasks:
            with open(f"/proc/{me}/task/{tid}/children", "rb") as f:
                pids.update(int(p) for p in f.read().split())
    except FileNotFoundError:  # no CONFIG_PROC_CHILDREN, or a thread ended meanwhile: scan
        pids = set()
        for name in os.listdir("/proc"):
            if name.isdigit():
                seen = _stat(int(name))
                if seen is not None and seen[0] == me:
                    pids.add(int(name))
    out: dict[int, str] = {}
    for pid in pids:
        seen = _stat(pid)
        if seen is not None and seen[0] == me:
            out[pid] = seen[1]
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    text = " ".join(os.fsdecode(a) for a in raw.split(b"\0") if a)
    return text if len(text) <= 160 else text[:157] + "..."


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status (a Popen that asks later gets ECHILD, which it handles)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _describe_thread(thread: threading.Thread) -> str:
    target: Any = getattr(thread, "_target", None)
    where = ""
    if target is not None:  # a bound method's qualname names its class: Service._work
        name = getattr(target, "__qualname__", None) or repr(target)
        where = f", target {getattr(target, '__module__', None) or '?'}.{name}"
    return (f"thread {thread.name!r} ({type(thread).__module__}.{type(thread).__qualname__}, "
            f"daemon={thread.daemon}{where})")


def _describe_handler(handler: Any) -> str:
    if handler is None:
        return "None (installed outside Python)"
    if isinstance(handler, int):
        with contextlib.suppress(ValueError):
            return signal.Handlers(handler).name
        return str(handler)
    owner = getattr(handler, "__self__", None)
    name = getattr(handler, "__qualname__", None) or repr(handler)
    module = getattr(handler, "__module__", None) or type(owner).__module__
    return f"{module}.{name}"


@dataclass(frozen=True)
class Snapshot:
    """What was running, and which handlers were set, before a test."""

    threads: frozenset[threading.Thread]
    children: frozenset[int]
    handlers: dict[int, Any]


def take() -> Snapshot:
    """The live threads, our children and the guarded signal handlers, now."""
    return Snapshot(frozenset(threading.enumerate()), frozenset(children()),
                    {int(s): signal.getsignal(s) for s in SIGNALS})


def _new_threads(before: Snapshot) -> list[threading.Thread]:
    me = threading.current_thread()
    return [t for t in threading.enumerate()
            if t not in before.threads and t is not me and t.is_alive()
            and _allowed_thread(t) is None]


def _new_children(before: Snapshot) -> list[int]:
    """New children still running; new zombies are reaped on the way."""
    allowed = _allowed_children()
    running = []
    for pid, state in children().items():
        if pid in before.children or pid in allowed:
            continue
        if state == "Z":
            _reap(pid)
        else:
            running.append(pid)
    return running


def check(before: Snapshot, *, grace: float | None = None,
          clock: Callable[[], float] = time.monotonic) -> list[str]:
    """What the test left behind, one sentence each (empty: nothing). Cleans up on the way: a
    leaked child is killed and reaped, a changed signal handler is put back. ``grace`` defaults to
    :data:`GRACE_SECONDS`, read at the call (a test file may shorten it)."""
    grace = GRACE_SECONDS if grace is None else grace
    problems: list[str] = []
    for signum, old in before.handlers.items():
        now = signal.getsignal(signum)
        if now is not old and now != old:
            problems.append(f"{signal.Signals(signum).name} handler changed from "
                            f"{_describe_handler(old)} to {_describe_handler(now)}; an in-process "
                            "run must restore the handlers it installs")
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
    threads, kids = _new_threads(before), _new_children(before)
    if threads or kids:
        gc.collect()  # a finalizer may be what stops or waits for it (watchdog's suite does too)
        deadline = clock() + grace
        while True:
            for t in threads:
                t.join(timeout=max(0.0, min(0.05, deadline - clock())))
            threads, kids = _new_threads(before), _new_children(before)
            if not (threads or kids) or clock() >= deadline:
                break
            if not threads:  # only children left: wait on them without spinning
                threading.Event().wait(0.02)
    for t in threads:
        problems.append(f"{_describe_thread(t)} still running {grace:g} s after the test: stop "
                        "and join it in the test or its fixture (or in the daemon's stop)")
    for pid in kids:
        problems.append(f"child process {pid} ({_cmdline(pid)}) still running {grace:g} s after "
                        "the test: killed; wait for it (or terminate it) in the test or its "
                        "fixture, or reap it in the daemon's stop")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return problems


@pytest.fixture(autouse=True)
def _nothing_left_running() -> Iterator[None]:
    """Fail the test (at teardown) if it left a thread or a child process running, or changed the
    SIGTERM/SIGINT/SIGHUP handlers."""
    before = take()
    yield
    problems = check(before)
    if problems:
        pytest.fail("the test left something behind:\n" + "\n".join(f"  {p}" for p in problems),
                    pytrace=False)
