"""Frozen records that cross rooms.  Plain data: no I/O, no behaviour beyond formatting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # numpy stays out of the start-up path of validate/status
    import numpy as np

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding about one piece of input: a row, a schema, a file.

    ``value_repr`` is ``repr()`` of the offending value exactly as read, so a person sees
    ``'1787.0'`` versus ``1787.0`` versus ``None``; nothing is normalised before it is reported.
    """

    code: str
    severity: Severity
    project: str
    db_file: str
    group_id: str | None
    rowid: int | None
    field: str | None
    value_repr: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Finding:
    """What a pure check returns: an issue before it knows where its row came from."""

    code: str
    field: str | None
    value_repr: str
    message: str


@dataclass(frozen=True, slots=True)
class SchemaReport:
    """What :func:`daemon.decisions.schema.detect_schema` learned about one DB file.

    ``kind`` is one of ``canonical`` (18 columns, every CHECK), ``v3_17`` (the older 17-column
    layout without ``ai_crop_accepted``), ``partial`` (the table exists but required columns are
    missing: temp DBs), ``foreign`` (no ``ai_decisions`` table) or ``unreadable``.
    """

    kind: str
    columns: tuple[str, ...]
    missing_columns: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()
    missing_checks: tuple[str, ...] = ()
    missing_indexes: tuple[str, ...] = ()
    missing_views: tuple[str, ...] = ()
    has_rowid: bool = True
    group_id_unique: bool = True
    fingerprint: str = ""
    detail: str = ""

    @property
    def readable(self) -> bool:
        return self.kind in ("canonical", "v3_17", "partial")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["readable"] = self.readable
        return data


@dataclass(frozen=True, slots=True)
class ProjectResult:
    """The outcome of validating one project's decision DB once."""

    project: str
    db_file: str
    mode: str  # "incremental", "full", "skipped"
    schema_kind: str
    rows_total: int = 0
    rows_read: int = 0
    rows_checked: int = 0
    rows_deleted: int = 0
    errors: int = 0
    warnings: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ImageCandidate:
    """An image file the embedding stage should cover (once per content)."""

    project: str
    file_name: str
    path: Path
    priority: int = 1  # 0: named by a newly validated row (its losers may be deleted soon)


class VectorSource(Protocol):
    """Where training gets embeddings: the seam between the embedding and training rooms."""

    @property
    def embedder_id(self) -> str: ...

    def vectors_for(self, project: str, file_names: Sequence[str]) -> dict[str, np.ndarray]:
        """L2-normalized float32 vectors of those images of ``project`` that are embedded."""
        ...


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A parsed ``.decision`` file.  Kind A: crop routing, one per chosen image, names its row's
    group_id; kind B: group-level, from the older reviewer (never joined into a DB upstream)."""

    path: Path
    kind: Literal["A", "B"]
    group_id: str
    project_id: str | None  # kind A only
    folder_role: str  # crop, crop_auto, cropped, selected, delete_staging, source
    image_stem: str  # kind A: the chosen image's stem; kind B: the group id
    fields: dict[str, Any]
