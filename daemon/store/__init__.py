"""The daemon's own SQLite state DB (``data/daemon/state.db``): single writer, named migrations."""

from daemon.store.db import Checkpoint, StateStore

__all__ = ["Checkpoint", "StateStore"]
