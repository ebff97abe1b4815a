"""Pure conversion of one legacy CSV line into one v3 decision row, or into a rejection.

Everything the data contract (section 5) knows about the legacy logs lives here: format
detection from the header, path reduction to bare file names, the project rules, pixel versus
normalized boxes, full-frame placeholders, column-shifted rows.  No I/O and no clock: the image
size lookup arrives as a callable, so this room is tested with plain tables.  Stateful rules
(duplicates across lines, group_id collisions) live in :mod:`daemon.backfill.run`.  Its
neighbours hold the path and project rules (:mod:`.projects`), the box rules (:mod:`.boxes`)
and the line records (:mod:`.lines`); their public names are re-exported here.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from daemon.backfill.boxes import normalize_box
from daemon.backfill.lines import (
    ConvertContext,
    Converted,
    CsvLayout,
    ImageProblem,
    Note,
    Outcome,
    Rejected,
    SizeLookup,
)
from daemon.backfill.projects import (
    PROJECT_MARKER,
    PROJECT_RE,
    WORKFLOW_FOLDERS,
    ProjectFrom,
    Window,
    bare_name,
    overlapping_windows,
    parse_window,
    project_from_path,
)
from daemon.images import parse_stage
from daemon.timeparse import iso_utc, parse_timestamp

__all__ = [
    "PROJECT_MARKER",
    "PROJECT_RE",
    "WORKFLOW_FOLDERS",
    "ConvertContext",
    "Converted",
    "CsvLayout",
    "ImageProblem",
    "Note",
    "Outcome",
    "ProjectFrom",
    "Rejected",
    "SizeLookup",
    "Window",
    "bare_name",
    "convert_line",
    "detect_layout",
    "normalize_box",
    "overlapping_windows",
    "parse_window",
    "project_from_path",
]

FORMAT_CROP = "crop_log"
FORMAT_ANOMALY = "anomaly_cases"
FORMAT_SELECTION = "selection_log"

#: a side longer than this (pixels) is not a real image size: the value is unusable
MAX_DIMENSION = 1_000_000

_STAMP_RE = re.compile(r"(?<!\d)(\d{8}_\d{6})(?!\d)")
_COORDS = ("crop_x1", "crop_y1", "crop_x2", "crop_y2")
_BLOCK = ("image_0_path", "image_0_stage", "width_0", "height_0")
MAX_IMAGES = 4  # the canonical DDL allows indexes 0..3


# -- header ---------------------------------------------------------------------------------------


def detect_layout(header: Sequence[str]) -> CsvLayout | None:
    """The legacy format a header belongs to, or None for an unknown header."""
    names = tuple(h.strip().lstrip("\ufeff") for h in header)
    index = {n: i for i, n in reversed(list(enumerate(names)))}
    if "chosen_path" not in index or "timestamp" not in index:
        return None
    if "rejected_paths" in index:
        return CsvLayout(FORMAT_ANOMALY, names, index)
    if "neg_paths" in index:
        return CsvLayout(FORMAT_SELECTION, names, index)
    start = index.get("image_0_path")
    if start is not None and names[start : start + 4] != _BLOCK:
        start = None
    return CsvLayout(FORMAT_CROP, names, index, block_start=start,
                     has_coords=all(c in index for c in _COORDS))


def looks_like_header(fields: Sequence[str]) -> bool:
    return bool(fields) and fields[0].strip().lstrip("\ufeff") == "session_id"


# -- projects -------------------------------------------------------------------------------------


def _resolve_project(ctx: ConvertContext, chosen_raw: str, column: str | None,
                     moment: datetime) -> str | Note:
    if ctx.project_from == "fixed" and ctx.project:
        return ctx.project
    if ctx.project_from == "window":
        for w in ctx.windows:
            if w.start <= moment < w.end:
                return w.project
        return Note("backfill_project_unknown", "timestamp", repr(iso_utc(moment)),
                    "the log timestamp lies in none of the --window ranges")
    if column is not None and PROJECT_RE.match(column.strip()):
        return column.strip()
    found = project_from_path(chosen_raw)
    if found is None:
        return Note("backfill_project_unknown", "chosen_path", repr(chosen_raw),
                    "the path does not name its project (workflow folder first, absolute path "
                    "without 'training data/', or no folder); use --project or --window")
    return found


# -- values ---------------------------------------------------------------------------------------


def _dimension(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0 or value != int(value) or value > MAX_DIMENSION:
        return None
    return int(value)


def order_by_stage(names: list[str]) -> list[str]:
    """Lowest stage first (stable); a group with an unknown stage keeps its logged order."""
    ranks = [parse_stage(n) for n in names]
    if any(r is None for r in ranks):
        return list(names)
    return [n for _, _, n in sorted((r, i, n) for i, (r, n) in enumerate(zip(ranks, names,
                                                                               strict=True)))]


def group_stamp(chosen_name: str, moment: datetime) -> str:
    """``YYYYMMDD_HHMMSS`` of the chosen image's file name, else of the log timestamp."""
    m = _STAMP_RE.search(chosen_name)
    return m.group(1) if m else moment.strftime("%Y%m%d_%H%M%S")


def _parse_time(raw: str | None) -> datetime | Note:
    if raw is None or not raw.strip():
        return Note("backfill_timestamp_missing", "timestamp", repr(raw),
                    "the line has no timestamp")
    moment = parse_timestamp(raw.strip())
    if moment is None:
        return Note("backfill_timestamp_unparseable", "timestamp", repr(raw),
                    "the timestamp is in none of the contract's formats")
    try:
        iso_utc(moment)
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
        return Note("backfill_timestamp_unparseable", "timestamp", repr(raw),
                    "the timestamp lies outside the range a UTC time can hold")
    return moment


def _group(chosen_raw: str, others: Sequence[str], fld: str) -> tuple[list[str], int] | Note:
    chosen = bare_name(chosen_raw)
    if not chosen:
        return Note("backfill_path_empty", "chosen_path", repr(chosen_raw),
                    "the chosen image path is empty")
    if "\x00" in chosen_raw or any("\x00" in p for p in others):
        return Note("backfill_group_invalid", fld, repr([chosen_raw, *others]),
                    "an image path holds a NUL byte: no file can have that name")
    names = [bare_name(p) for p in others]
    if any(not n for n in names):
        return Note("backfill_group_invalid", fld, repr(list(others)),
                    "an image path of the group is empty")
    if len(names) > MAX_IMAGES:
        return Note("backfill_group_invalid", fld, repr(list(others)),
                    f"the group holds {len(names)} images; a v3 row holds at most {MAX_IMAGES}")
    if len(set(names)) != len(names):
        return Note("backfill_group_invalid", fld, repr(list(others)),
                    "the same file name appears twice in the group")
    if chosen not in names:
        return Note("backfill_chosen_not_in_group", "chosen_path", repr(chosen_raw),
                    "the chosen image is not among the group's images")
    ordered = order_by_stage(names)
    return ordered, ordered.index(chosen)


def _size(ctx: ConvertContext, project: str, chosen: str, w_raw: str | None,
          h_raw: str | None) -> tuple[int, int, Note | None] | Note:
    width, height = _dimension(w_raw), _dimension(h_raw)
    if width is not None and height is not None:
        return width, height, None
    found = ctx.size_lookup(project, chosen)
    shown = repr((w_raw, h_raw))
    if isinstance(found, ImageProblem):
        return Note("backfill_image_unreadable", "width", shown,
                    f"the logged size is unusable and the image file {found.path} cannot give "
                    f"its size: {found.reason}")
    if found is None:
        return Note("backfill_image_size_missing", "width", shown,
                    "the image size is zero, missing, not a whole number or over "
                    f"{MAX_DIMENSION:,} pixels, and the image was not found under any "
                    "--image-root")
    return found[0], found[1], Note(
        "backfill_size_from_image_file", "width", shown,
        f"image size {found[0]}x{found[1]} read from the image file (logged size unusable)")


def _base_values(project: str, moment: datetime, images: list[str], index: int,
                 width: int, height: int) -> dict[str, Any]:
    return {
        "timestamp": iso_utc(moment), "project_id": project, "directory": None,
        "batch_number": None, "images": json.dumps(images), "ai_selected_index": None,
        "ai_crop_coords": None, "ai_confidence": None, "user_selected_index": index,
        "user_action": "approve", "final_crop_coords": None, "crop_timestamp": None,
        "image_width": width, "image_height": height, "selection_match": None,
        "crop_match": None, "ai_crop_accepted": None,
    }


# -- per format -----------------------------------------------------------------------------------


def _shape_problem(layout: CsvLayout, fields: Sequence[str]) -> Note | None:
    n = len(fields)
    shown = f"{n} fields"
    if layout.block_start is not None:
        need = layout.block_start + 4
        if n < need or (n - layout.block_start) % 4:
            return Note("backfill_row_shifted", None, repr(shown),
                        f"the line has {n} fields but its header ({len(layout.header)} fields) "
                        "needs the fixed columns plus whole 4-field image blocks: a row written "
                        "under a different header")
    elif n < len(layout.header):
        return Note("backfill_row_shifted", None, repr(shown),
                    f"the line has {n} fields but its header has {len(layout.header)}")
    if layout.has_coords:
        for name in _COORDS:
            value = layout.get(fields, name)
            if value is not None and parse_timestamp(value.strip()) is not None:
                return Note("backfill_row_shifted", name, repr(value),
                            f"a timestamp sits in {name}: the columns are shifted")
    return None


def _line_time(layout: CsvLayout, fields: Sequence[str]) -> datetime | Note:
    """The line's log time, once its shape fits its header; else why the line is rejected."""
    problem = _shape_problem(layout, fields)
    return problem if problem is not None else _parse_time(layout.get(fields, "timestamp"))


def _place(ctx: ConvertContext, layout: CsvLayout, fields: Sequence[str], moment: datetime,
           others: Sequence[str], fld: str) -> tuple[list[str], int, str, str] | Note:
    """``(images by stage, chosen index, chosen name, project)`` of a line whose group is
    ``others``; else why the line is rejected."""
    chosen_raw = layout.get(fields, "chosen_path") or ""
    group = _group(chosen_raw, others, fld)
    if isinstance(group, Note):
        return group
    images, index = group
    project = _resolve_project(ctx, chosen_raw, layout.get(fields, "project"), moment)
    if isinstance(project, Note):
        return project
    return images, index, images[index], project


def convert_crop_line(layout: CsvLayout, fields: Sequence[str], ctx: ConvertContext) -> Outcome:
    """One crop-log line (with or without coordinates, with or without image blocks)."""
    moment = _line_time(layout, fields)
    if isinstance(moment, Note):
        return Rejected(moment)
    chosen_raw = layout.get(fields, "chosen_path") or ""
    blocks: list[tuple[str, str, str]] = []  # (path, width, height)
    if layout.block_start is not None:
        for at in range(layout.block_start, len(fields) - 3, 4):
            path = fields[at]
            if path.strip():
                blocks.append((path, fields[at + 2], fields[at + 3]))
    others = [b[0] for b in blocks] if blocks else [chosen_raw]
    placed = _place(ctx, layout, fields, moment, others, "image_0_path")
    if isinstance(placed, Note):
        return Rejected(placed)
    images, index, chosen, project = placed
    dims = next(((w, h) for p, w, h in blocks if bare_name(p) == chosen),
                (layout.get(fields, "width"), layout.get(fields, "height")))
    size = _size(ctx, project, chosen, dims[0], dims[1])
    if isinstance(size, Note):
        return Rejected(size)
    width, height, size_note = size
    notes = [size_note] if size_note else []
    values = _base_values(project, moment, images, index, width, height)
    values["crop_timestamp"] = values["timestamp"]
    if layout.has_coords:
        raw = [layout.get(fields, c) or "" for c in _COORDS]
        result = normalize_box(raw, width, height, ctx.full_frame_tolerance)
        if isinstance(result, Note):
            return Rejected(result)
        box, full = result
        if full:
            values["final_crop_coords"] = json.dumps([0.0, 0.0, 1.0, 1.0])
            notes.append(Note("backfill_full_frame_as_approve", "crop_x1", repr(tuple(raw)),
                              "a full-frame crop is an approve logged as a crop; recorded as "
                              "approve with final box [0.0, 0.0, 1.0, 1.0]"))
        else:
            values["user_action"] = "crop"
            values["final_crop_coords"] = json.dumps(list(box))
    else:
        values["user_action"] = "crop"
        notes.append(Note("backfill_crop_without_coords", None, repr(None),
                          "the log has no crop coordinates: recorded as a crop without a final "
                          "box (the validator reports it as crop_incomplete)"))
    return Converted(project, chosen, group_stamp(chosen, moment), values, tuple(notes))


def _parse_list(raw: str | None, fld: str, *, python: bool) -> list[str] | Note:
    text = (raw or "").strip()
    try:
        value = ast.literal_eval(text) if python else json.loads(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        kind = "a Python list of strings" if python else "a JSON array of strings"
        return Note("backfill_list_unparseable", fld, repr(raw), f"{fld} is not {kind}")
    return value


def convert_selection_line(layout: CsvLayout, fields: Sequence[str],
                           ctx: ConvertContext) -> Outcome:
    """One anomaly-case or historical-selection line: an approve of the chosen image."""
    moment = _line_time(layout, fields)
    if isinstance(moment, Note):
        return Rejected(moment)
    python = layout.format == FORMAT_ANOMALY
    fld = "rejected_paths" if python else "neg_paths"
    negatives = _parse_list(layout.get(fields, fld), fld, python=python)
    if isinstance(negatives, Note):
        return Rejected(negatives)
    chosen_raw = layout.get(fields, "chosen_path") or ""
    placed = _place(ctx, layout, fields, moment, [chosen_raw, *negatives], fld)
    if isinstance(placed, Note):
        return Rejected(placed)
    images, index, chosen, project = placed
    w_raw = layout.get(fields, "width") or layout.get(fields, "image_width")
    h_raw = layout.get(fields, "height") or layout.get(fields, "image_height")
    size = _size(ctx, project, chosen, w_raw, h_raw)
    if isinstance(size, Note):
        return Rejected(size)
    width, height, size_note = size
    values = _base_values(project, moment, images, index, width, height)
    notes = (size_note,) if size_note else ()
    return Converted(project, chosen, group_stamp(chosen, moment), values, notes)


def convert_line(layout: CsvLayout, fields: Sequence[str], ctx: ConvertContext) -> Outcome:
    if looks_like_header(fields):
        return Rejected(Note("backfill_row_shifted", None, repr(",".join(fields)[:200]),
                             "a second header line: rows after it may follow another layout"))
    if layout.format == FORMAT_CROP:
        return convert_crop_line(layout, fields, ctx)
    return convert_selection_line(layout, fields, ctx)
