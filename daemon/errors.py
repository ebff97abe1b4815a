"""The one exception tree of trainingd.

Bad *input* (a broken row, sidecar, image or CSV line) is never an exception: it becomes an
:class:`daemon.records.Issue`.  Exceptions are for conditions that stop a unit of work::

    DaemonError
     ├─ ConfigError            bad config.toml / env -> exit 78 (systemd does not restart-loop)
     ├─ SourceError            a decision DB or sidecar cannot be read now
     │   ├─ SourceBusyError    transient (locked): retried later
     │   └─ SchemaError        not a readable v3 decision DB: reported, other projects go on
     ├─ EmbeddingError         model or device failure (one bad image is an issue, not an error)
     ├─ TrainingError
     │   └─ NotEnoughDataError expected; logged, retrain skipped
     └─ StoreError             our own state DB: fatal -> non-zero exit -> systemd restarts
"""

from __future__ import annotations

from pathlib import Path

#: sysexits.h EX_CONFIG: systemd units carry RestartPreventExitStatus=78.
EXIT_CONFIG = 78
#: sysexits.h EX_TEMPFAIL: a source was busy for longer than the retry budget.
EXIT_TEMPFAIL = 75


class DaemonError(Exception):
    """Base of every exception trainingd raises on purpose."""


class ConfigError(DaemonError):
    """The configuration cannot be used; the message names the key, the file and the value."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class SourceError(DaemonError):
    """A decision database (or another upstream file) cannot be read right now."""

    def __init__(self, message: str, *, path: Path | str) -> None:
        super().__init__(message)
        self.path = str(path)


class SourceBusyError(SourceError):
    """The source stayed locked by its writer for longer than the retry budget."""


class SchemaError(SourceError):
    """The file is not a readable v3 decision database (corrupt, foreign, or missing its table)."""


class EmbeddingError(DaemonError):
    """The embedding model or its device failed."""


class TrainingError(DaemonError):
    """A training run failed."""


class NotEnoughDataError(TrainingError):
    """Too few valid labels to train or evaluate; expected, the retrain is skipped."""


class StoreError(DaemonError):
    """The daemon's own state DB failed; fatal for the process."""


class StoreRebuiltError(DaemonError):
    """The state DB was healed (moved aside and rebuilt) while a pass that read from the old one
    was still writing: what it would write next (a checkpoint above rows the new DB never saw)
    is refused, and the reconcile queued by the heal derives it again from scratch."""
