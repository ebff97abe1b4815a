"""Backfill: turn the legacy CSV logs into NEW v3 decision DBs, with an inspection report first.

Rooms: :mod:`.convert` (pure: one CSV line -> one row or one rejection, with :mod:`.projects`
for the path and project rules, :mod:`.boxes` for the crop boxes and :mod:`.lines` for the
records), :mod:`.options` (what is asked, what was found), :mod:`.run` (streaming, cross-line
state) over :mod:`.inputs` (CSV and image files) and :mod:`.output` (the new DBs), and
:mod:`.report` (the inspection report).
It never modifies an input CSV or an existing file.
"""

from __future__ import annotations

from daemon.backfill.convert import ConvertContext, Window, parse_window
from daemon.backfill.options import (
    BackfillError,
    BackfillOptions,
    BackfillOutcome,
    OutputFailedError,
    OutputPathError,
    TargetExistsError,
    check_output_path,
)
from daemon.backfill.report import write_report
from daemon.backfill.run import run_backfill

__all__ = [
    "BackfillError",
    "BackfillOptions",
    "BackfillOutcome",
    "ConvertContext",
    "OutputFailedError",
    "OutputPathError",
    "TargetExistsError",
    "Window",
    "check_output_path",
    "parse_window",
    "run_backfill",
    "write_report",
]
