"""Frozen records that cross rooms.  Plain data: no I/O, no behaviour beyond formatting."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
