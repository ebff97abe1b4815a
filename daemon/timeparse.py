"""Parsing of every timestamp format the data contract lists, and nothing else.

Accepted: ``2025-10-23T20:44:56.880505Z``, ``2025-10-21T00:00:00Z``, ``2025-07-28T04:06:06+00:00``,
``2025-10-08 14:46:56`` and the file-name style ``20250728_040606``.  Naive values are taken as
UTC (the reviewer's zone is not recorded; one backfill wrote local time tagged ``Z`` and that
cannot be told apart).  A date without a time is *not* accepted: the contract never shows one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:?\d{2})?"
)
_FILE_STYLE = re.compile(r"(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})")


def parse_timestamp(value: object) -> datetime | None:
    """A timezone-aware datetime, or None when ``value`` is not a contract timestamp."""
    if not isinstance(value, str):
        return None
    try:
        if _ISO.fullmatch(value):
            parsed = datetime.fromisoformat(value)
        else:
            m = _FILE_STYLE.fullmatch(value)
            if m is None:
                return None
            parsed = datetime(*(int(g) for g in m.groups()))  # type: ignore[arg-type]
    except ValueError:  # shape right, values impossible (month 13, hour 25)
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def utc_stamp(moment: datetime) -> str:
    """``20261125T124700Z``: the compact UTC form used in output file names."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
