"""The task protocol: which kinds of work exist, which lane runs each, and what each returns.

Why a room of its own: the producers (watcher, jobs, triggers, the pipeline itself), the lanes,
the metrics and the handler map must agree on one closed set of task kinds.  A kind is a
:class:`TaskKind` member; :data:`LANE_OF` puts every kind in a lane; the pipeline's handler
map (``Pipeline.handlers``) gives every kind but :data:`SERVICE_KINDS` its handler.  Adding a
kind is: a member here, its lane here, its handler in the pipeline's map, and the table test in
``tests/test_lanes.py`` fails until all three exist.

Results are frozen dataclasses with a ``to_dict()`` (the trigger result file and the log line
are the only places they become plain dicts).  Results owned by another room (the embedding
run, a training outcome, the backfill report) are that room's own typed values; they satisfy
:class:`TaskResult` too.  Nothing here does work or imports a heavy room.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.records import ProjectResult


class TaskKind(enum.StrEnum):
    """Every kind of work the daemon does (the values are the trigger actions' names too)."""

    VALIDATE = "validate"
    SIDECAR = "sidecar"
    IMAGE = "image"
    SCAN = "scan"
    RECONCILE = "reconcile"
    INSPECT = "inspect"
    TRIGGERS = "triggers"
    PAUSE = "pause"
    RESUME = "resume"
    EMBED = "embed"
    RETRAIN = "retrain"
    RETRAIN_CHECK = "retrain_check"
    AUDIT = "audit"
    SUMMARY = "summary"
    BACKFILL = "backfill"
    PREDICT = "predict"


class Lane(enum.StrEnum):
    """``fast``: short, latency-critical work on the decision DBs and files (a commit is
    validated within a second).  ``heavy``: long work that yields between chunks (embedding,
    training, backfill, the summary); the only user of the GPU."""

    FAST = "fast"
    HEAVY = "heavy"


LANE_OF: Mapping[TaskKind, Lane] = {
    TaskKind.VALIDATE: Lane.FAST, TaskKind.SIDECAR: Lane.FAST, TaskKind.IMAGE: Lane.FAST,
    TaskKind.SCAN: Lane.FAST, TaskKind.RECONCILE: Lane.FAST, TaskKind.INSPECT: Lane.FAST,
    TaskKind.TRIGGERS: Lane.FAST, TaskKind.PAUSE: Lane.FAST, TaskKind.RESUME: Lane.FAST,
    TaskKind.EMBED: Lane.HEAVY, TaskKind.RETRAIN: Lane.HEAVY, TaskKind.RETRAIN_CHECK: Lane.HEAVY,
    TaskKind.AUDIT: Lane.HEAVY, TaskKind.SUMMARY: Lane.HEAVY, TaskKind.BACKFILL: Lane.HEAVY,
    TaskKind.PREDICT: Lane.HEAVY,
}
#: run even while paused (they are how a pause is made and ended, and how triggers arrive)
CONTROL_KINDS = frozenset({TaskKind.PAUSE, TaskKind.RESUME, TaskKind.TRIGGERS})
#: handled by the service, not the pipeline: the service owns the trigger box
SERVICE_KINDS = frozenset({TaskKind.TRIGGERS})


def kind_of(name: str) -> TaskKind | None:
    """The kind a task's ``kind`` string names, or None for a name no handler knows."""
    try:
        return TaskKind(name)
    except ValueError:
        return None


def lane_for(name: str) -> Lane:
    """The lane a task kind runs in; an unknown kind goes to the fast lane, where it fails at
    once with a reason instead of waiting behind embedding."""
    kind = kind_of(name)
    return LANE_OF[kind] if kind is not None else Lane.FAST


class TaskResult(Protocol):
    """What every handler returns: a typed value that can be written as JSON."""

    def to_dict(self) -> dict[str, Any]: ...


# -- results owned by the pipeline's stages ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Validated:
    projects: tuple[ProjectResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"projects": [r.to_dict() for r in self.projects]}


@dataclass(frozen=True, slots=True)
class ImagesIndexed:
    """Image files seen, by state (``new``, ``changed``, ``same``, ``gone`` ...)."""

    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def needs_embedding(self) -> bool:
        return bool(self.counts.get("new") or self.counts.get("changed"))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.counts)


@dataclass(frozen=True, slots=True)
class SidecarsRecorded:
    parsed: int = 0
    gone: int = 0
    issues: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"parsed": self.parsed, "gone": self.gone, "issues": self.issues}


@dataclass(frozen=True, slots=True)
class Scanned:
    images: ImagesIndexed
    sidecars: SidecarsRecorded

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images.to_dict(), "sidecars": self.sidecars.to_dict()}


@dataclass(frozen=True, slots=True)
class Reconciled:
    validated: tuple[ProjectResult, ...] = ()
    scanned: Mapping[str, Scanned] = field(default_factory=dict)
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"validated": [r.to_dict() for r in self.validated],
                "scanned": {p: s.to_dict() for p, s in self.scanned.items()}}


@dataclass(frozen=True, slots=True)
class EmbedSkipped:
    """An embed task that did not run the model: nothing to do, the stage disabled (the
    candidates stay in the image index), or the stage failed."""

    queued: int = 0
    disabled: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        out: dict[str, Any] = {"queued": self.queued, "embedded": 0}
        if self.disabled is not None:
            out["disabled"] = self.disabled
        return out


@dataclass(frozen=True, slots=True)
class RetrainChecked:
    """Per model: whether a retrain was due, why, and the outcome when one ran."""

    skipped: str | None = None
    decisions: Mapping[str, tuple[bool, str, TaskResult | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        out: dict[str, Any] = {}
        for kind, (due, reason, outcome) in self.decisions.items():
            out[kind] = {"due": due, "reason": reason}
            if outcome is not None:
                out[kind]["outcome"] = outcome.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class ReportWritten:
    """A report as JSON and Markdown (the daily summary, an inspection), with its totals."""

    json: str
    markdown: str
    totals: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"json": self.json, "markdown": self.markdown, **self.totals}


@dataclass(frozen=True, slots=True)
class BackfillRan:
    converted: int
    rejected: int
    created: tuple[str, ...]
    report: str

    def to_dict(self) -> dict[str, Any]:
        return {"converted": self.converted, "rejected": self.rejected,
                "created": list(self.created), "report": self.report}


@dataclass(frozen=True, slots=True)
class SummariesWrittenLate:
    written: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"written_late": list(self.written)}


@dataclass(frozen=True, slots=True)
class Paused:
    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"paused": self.paused}


@dataclass(frozen=True, slots=True)
class TriggersClaimed:
    claimed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"claimed": self.claimed}


@dataclass(frozen=True, slots=True)
class Failed:
    """A task that raised: the reason a person can act on (and, once retried, the tries)."""

    error: str
    attempts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.attempts is not None:
            out["attempts"] = self.attempts
        return out
