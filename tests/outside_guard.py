"""A guard that notices a test reading files that lie beside the checkout, such as ``../shared``.

On our own machines the checkout sits next to a ``shared/`` reference tree, so a test that reads
from it passes here and fails on every fresh clone. A process-wide audit hook (PEP 578) sees each
``open``, ``os.scandir``, ``os.listdir``, ``shutil.copyfile``/``copytree``, ``os.chdir`` and
``sqlite3.connect`` and records those whose path is *beside* the checkout: under its parent folder,
not under the checkout itself, not in a hidden folder (``~/.cache``, ``~/.config``), not in the
Python environment, not in the temp dir. The conftest fails the test that did it.

It only records: raising from an audit hook would turn into an error inside whatever code opened
the file, which may catch it and hide it. It never opens anything itself (that would recurse), and
it stays off when "beside the checkout" means nothing (a checkout at ``/`` or directly in the temp
folder, whose neighbours are everyone's). Subprocesses are not watched; ``test_self_contained``
greps the sources for the same mistake.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]

#: Audit events whose arguments name paths to check, and which of their arguments are paths.
_EVENTS: dict[str, tuple[int, ...]] = {
    "open": (0,), "os.scandir": (0,), "os.listdir": (0,), "os.chdir": (0,),
    "shutil.copyfile": (0, 1), "shutil.copytree": (0, 1), "sqlite3.connect": (0,),
}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _as_path(arg: Any) -> str | None:
    """A path argument as an absolute string, or None for file descriptors and memory DBs."""
    if isinstance(arg, int) or arg is None:
        return None
    text = os.fsdecode(os.fspath(arg))
    if text.startswith("file:"):  # a SQLite URI: file:/abs/path?mode=ro
        text = text.removeprefix("file:").split("?", 1)[0]
    if not text or text == ":memory:":
        return None
    return os.path.abspath(text)


class OutsideGuard:
    """Records paths opened beside ``checkout``; ``take()`` hands them over and forgets them."""

    def __init__(self, checkout: Path, allowed: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.checkout = str(checkout)
        self.parent = str(checkout.parent)
        self.allowed: list[str] = []
        for a in allowed:
            self.allow(a)
        neighbours_are_anyones = self.parent in (os.sep, os.path.abspath(tempfile.gettempdir()))
        self.enabled = not neighbours_are_anyones
        self._seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def allow(self, root: str | os.PathLike[str]) -> None:
        """Never report paths under ``root`` (one that holds the parent itself is ignored)."""
        if not os.fspath(root):
            return
        path = os.path.abspath(root)
        if not _under(self.parent, path):
            self.allowed.append(path)

    def beside(self, path: str) -> bool:
        """True when the absolute ``path`` lies beside the checkout (see the module docstring)."""
        if not self.enabled or not _under(path, self.parent) or _under(path, self.checkout):
            return False
        first = path[len(self.parent):].lstrip(os.sep).split(os.sep, 1)[0]
        if not first or first.startswith("."):
            return False
        return not any(_under(path, a) for a in self.allowed)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        positions = _EVENTS.get(event)
        if positions is None:
            return
        try:
            for i in positions:
                path = _as_path(args[i]) if i < len(args) else None
                if path is not None and self.beside(path):
                    with self._lock:
                        self._seen.append((event, path))
        except Exception:  # a guard must never break the code it watches
            return

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            seen, self._seen = self._seen, []
        return seen


def default_allowed() -> list[str]:
    """The Python environment: a venv or an install may well sit beside the checkout."""
    return sorted({sys.prefix, sys.base_prefix, sys.exec_prefix,
                   *(p for p in sys.path if p and not _under(os.path.abspath(p),
                                                              str(CHECKOUT)))})


_GUARD: OutsideGuard | None = None


def install(extra_allowed: Iterable[str | os.PathLike[str]] = ()) -> OutsideGuard:
    """Install the process-wide hook once (audit hooks cannot be removed) and return the guard."""
    global _GUARD
    if _GUARD is None:
        _GUARD = OutsideGuard(CHECKOUT, [*default_allowed(), *extra_allowed])
        sys.addaudithook(_GUARD.hook)
    return _GUARD
