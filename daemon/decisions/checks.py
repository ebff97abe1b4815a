"""The integrity rules of the playbook plus the known faults of the data contract, as pure code.

Input: one source row ``(rowid, *COLUMNS)`` exactly as SQLite returned it.  Output: a list of
:class:`Finding` (empty for a clean row).  No I/O, no clock reads (``now`` comes in through
:class:`CheckContext`), no mutation of the row.  This is the hot loop of a full validation, so
the common, clean path does as little work as possible.

No value may make a check raise: JSON that nests thousands deep (``RecursionError``) or holds an
integer of more than 4,300 digits (``ValueError``) becomes a ``value_too_deep`` or
``number_too_large`` finding on its column, and :func:`finding_for_exception` turns anything
unforeseen into a ``row_check_failed`` finding, so the engine can guard each row and go on.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from daemon.images import parse_stage
from daemon.records import Finding
from daemon.timeparse import parse_timestamp

# Positions in a row tuple: rowid first, then the canonical columns in order.
ROWID, GROUP_ID, TIMESTAMP, PROJECT_ID, DIRECTORY, BATCH_NUMBER, IMAGES = range(7)
AI_INDEX, AI_CROP, AI_CONFIDENCE, USER_INDEX, USER_ACTION, FINAL_CROP = range(7, 13)
CROP_TIMESTAMP, WIDTH, HEIGHT, SELECTION_MATCH, CROP_MATCH, AI_CROP_ACCEPTED = range(13, 19)

ACTIONS = frozenset({"approve", "crop", "reject"})
FULL_FRAME = (0.0, 0.0, 1.0, 1.0)
_FLAGS = {None, 0, 1}
_NUM = (int, float)

Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class CheckContext:
    """Everything a check needs besides the row."""

    project: str  # the project the DB file name says
    now: datetime
    columns: frozenset[str] = field(default_factory=frozenset)  # columns the DB really has
    aspect_tolerance: float = 0.01
    full_frame_tolerance: float = 0.001
    future_slack: timedelta = timedelta(hours=24)


#: value_repr of an oversized value keeps its head only: a 100,000-character value is not
#: copied into every issue record and every line of ``trainingd validate``
HEAD_CHARS = 200


def safe_repr(value: object, limit: int | None = None) -> str:
    """``repr(value)``, never raising: a deeply nested list makes ``repr`` itself recurse."""
    try:
        text = repr(value)
    except (RecursionError, ValueError) as exc:
        text = f"<{type(value).__name__} that cannot be shown: {type(exc).__name__}>"
    if limit is not None and len(text) > limit:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text


def _f(code: str, fld: str | None, value: object, message: str) -> Finding:
    return Finding(code, fld, safe_repr(value), message)


def _is_digit_limit(exc: ValueError) -> bool:
    """The interpreter's guard against quadratic int parsing (``sys.set_int_max_str_digits``)."""
    return "digits" in str(exc) and not isinstance(exc, json.JSONDecodeError)


def _load_json(fld: str, raw: str, not_json: str) -> tuple[list[Finding], object]:
    """``json.loads`` that turns every failure into a finding on ``fld``."""
    try:
        return [], json.loads(raw)
    except json.JSONDecodeError as exc:
        return [_f(not_json, fld, raw, f"{fld} is not valid JSON ({exc.msg})")], None
    except RecursionError:
        return [Finding("value_too_deep", fld, safe_repr(raw, HEAD_CHARS),
                        f"{fld} nests JSON arrays or objects thousands deep ({len(raw)} "
                        "characters); no tool writes that: rewrite the value from the "
                        "reviewer's data")], None
    except ValueError as exc:
        if not _is_digit_limit(exc):
            return [_f(not_json, fld, raw, f"{fld} is not valid JSON ({exc})")], None
        return [Finding("number_too_large", fld, safe_repr(raw, HEAD_CHARS),
                        f"{fld} holds a number with more than {sys.get_int_max_str_digits()} "
                        "digits; rewrite the value with real coordinates or names")], None


def finding_for_exception(exc: BaseException) -> Finding:
    """What the engine records when a check raised after all: never a reason to stop."""
    if isinstance(exc, RecursionError):
        return Finding("value_too_deep", None, safe_repr(f"{type(exc).__name__}: {exc}"),
                       "a value of this row nests too deeply to be checked; rewrite it from "
                       "the reviewer's data")
    if isinstance(exc, ValueError) and _is_digit_limit(exc):
        return Finding("number_too_large", None, safe_repr(f"{type(exc).__name__}: {exc}"),
                       "a value of this row holds a number too long to convert; rewrite it")
    return Finding("row_check_failed", None,
                   safe_repr(f"{type(exc).__name__}: {exc}", HEAD_CHARS),
                   "trainingd could not check this row (a bug in trainingd, not necessarily in "
                   "the row); the row is kept out of training: report the log event "
                   "validation.row_check_failed with its traceback")


def _is_int(value: object) -> bool:
    return type(value) is int


def check_box(fld: str, raw: object) -> tuple[list[Finding], Box | None]:
    """Validate one crop column.  Returns findings and the box when it is a valid normalized one.

    NULL is not a finding here: whether a box must be present depends on the action.
    """
    if raw is None:
        return [], None
    if not isinstance(raw, str):
        return [_f("crop_coords_not_json", fld, raw, f"{fld} must be JSON text like "
                   "'[0.1, 0.2, 0.8, 0.9]', got a non-text value")], None
    failed, value = _load_json(fld, raw, "crop_coords_not_json")
    if failed:
        return failed, None
    if not isinstance(value, list) or len(value) != 4:
        return [_f("crop_coords_wrong_shape", fld, raw,
                   f"{fld} must be a JSON list of 4 numbers [x1, y1, x2, y2]")], None
    for v in value:
        if type(v) not in _NUM or not math.isfinite(v):
            return [_f("crop_coords_not_finite", fld, raw,
                       f"{fld} holds {safe_repr(v, HEAD_CHARS)}, which is not a finite "
                       "number")], None
    x1, y1, x2, y2 = value
    if x1 > 1 or y1 > 1 or x2 > 1 or y2 > 1:
        return [_f("crop_coords_pixels", fld, raw,
                   f"{fld} has values > 1: pixel coordinates; divide x by the image width "
                   "and y by its height")], None
    if x1 < 0 or y1 < 0 or x2 < 0 or y2 < 0:
        return [_f("crop_coords_out_of_range", fld, raw,
                   f"{fld} has a negative coordinate; every value must lie in [0, 1]")], None
    if x1 > x2 or y1 > y2:
        return [_f("crop_box_inverted", fld, raw,
                   f"{fld} has its corners swapped (need x1 < x2 and y1 < y2)")], None
    if x1 == x2 or y1 == y2:
        return [_f("crop_box_empty", fld, raw, f"{fld} has zero width or height")], None
    return [], (float(x1), float(y1), float(x2), float(y2))


def is_full_frame(box: Box, tolerance: float) -> bool:
    return all(abs(v - f) <= tolerance for v, f in zip(box, FULL_FRAME, strict=True))


def check_images(raw: object) -> tuple[list[Finding], list[str] | None]:
    """Validate the ``images`` column; returns the list when it is usable for index checks."""
    if not isinstance(raw, str):
        return [_f("images_not_json", "images", raw,
                   "images must be JSON text like '[\"a.png\", \"b.png\"]'")], None
    failed, names = _load_json("images", raw, "images_not_json")
    if failed:
        return failed, None
    if not isinstance(names, list):
        return [_f("images_not_list", "images", raw, "images must be a JSON array")], None
    if not 1 <= len(names) <= 4:
        return [_f("images_count_out_of_range", "images", raw,
                   f"images holds {len(names)} entries; a group has 1-4")], None
    findings: list[Finding] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            findings.append(_f("image_name_invalid", "images", name,
                               "every entry of images must be a non-empty file name"))
        elif "/" in name or "\\" in name or ":" in name or name.startswith("PROJECT_ROOT"):
            findings.append(_f("image_path_not_bare", "images", name,
                               "store the bare file name only (no folder, drive or "
                               "PROJECT_ROOT prefix)"))
    if findings:
        return findings, names
    if len(set(names)) != len(names):
        findings.append(_f("images_duplicate", "images", raw,
                           "the same file name appears more than once in the group"))
        return findings, names
    if len(names) > 1:
        ranks = [parse_stage(n) for n in names]
        known = [r for r in ranks if r is not None]
        if len(known) == len(ranks) and any(a > b for a, b in itertools.pairwise(known)):
            findings.append(_f("images_stage_order", "images", raw,
                               "images are not ordered lowest stage first"))
    return findings, names


def _check_index(fld: str, value: object, count: int, *, nullable: bool) -> list[Finding]:
    if value is None:
        if nullable:
            return []
        return [_f("index_out_of_range", fld, value, f"{fld} is NULL; the pick is unknown")]
    if not _is_int(value):
        return [_f("index_invalid", fld, value, f"{fld} must be an integer")]
    assert isinstance(value, int)
    if not 0 <= value < count:
        return [_f("index_out_of_range", fld, value,
                   f"{fld} = {value} but the group has {count} image(s) (valid: 0..{count - 1})")]
    return []


def _check_timestamp(fld: str, value: object, ctx: CheckContext, *, code: str) -> list[Finding]:
    moment = parse_timestamp(value)
    if moment is None:
        return [_f(code, fld, value,
                   f"{fld} is not a contract timestamp (e.g. '2025-10-23T20:44:56.880505Z', "
                   "'2025-10-08 14:46:56', '20250728_040606')")]
    if moment > ctx.now + ctx.future_slack:
        return [_f("timestamp_in_future", fld, value,
                   f"{fld} is later than now + {ctx.future_slack}; check the writer's clock")]
    return []


def check_row(row: tuple[Any, ...], ctx: CheckContext) -> list[Finding]:
    """Every per-row rule.  Cross-row rules (duplicates) live in the validation engine.

    Each rule has an inline fast path for the clean value and falls back to the detailed
    check only when that fails: this function runs once per row of a full validation.
    """
    out: list[Finding] = []
    cols = ctx.columns
    (_, gid, ts, pid, _directory, batch, images_raw, ai_idx, ai_crop, conf, user_idx, action,
     final_raw, cts, width, height, sel, cmatch, accepted) = row

    if gid.__class__ is not str or not gid.strip():
        out.append(_f("group_id_empty", "group_id", gid, "group_id must be a non-empty text key"))

    if pid != ctx.project and "project_id" in cols:
        if pid.__class__ is not str or not pid.strip():
            out.append(_f("project_id_empty", "project_id", pid, "project_id must be non-empty"))
        elif pid.lower() != ctx.project.lower():
            out.append(_f("project_id_mismatch", "project_id", pid,
                          f"project_id differs from the DB file's project {ctx.project!r}"))

    if "timestamp" in cols:
        if ts is None or ts == "":
            out.append(_f("timestamp_missing", "timestamp", ts, "timestamp is empty"))
        else:
            out.extend(_check_timestamp("timestamp", ts, ctx, code="timestamp_unparseable"))

    if action not in ACTIONS and "user_action" in cols:
        out.append(_f("user_action_invalid", "user_action", action,
                      "user_action must be exactly 'approve', 'crop' or 'reject'"))

    if not (width.__class__ is int and width > 0) and "image_width" in cols:
        out.append(_f("image_dimension_invalid", "image_width", width,
                      "image_width must be an integer number of pixels > 0"))
    if not (height.__class__ is int and height > 0) and "image_height" in cols:
        out.append(_f("image_dimension_invalid", "image_height", height,
                      "image_height must be an integer number of pixels > 0"))

    if batch is not None and not (batch.__class__ is int and batch >= 1):
        out.append(_f("batch_number_invalid", "batch_number", batch,
                      "batch_number must be NULL or an integer >= 1"))

    names: list[str] | None = None
    if "images" in cols:
        found, names = check_images(images_raw)
        out.extend(found)
    count = len(names) if names is not None else 4

    if not (user_idx.__class__ is int and 0 <= user_idx < count) and "user_selected_index" in cols:
        out.extend(_check_index("user_selected_index", user_idx, count, nullable=False))
    if ai_idx is not None and not (ai_idx.__class__ is int and 0 <= ai_idx < count):
        out.extend(_check_index("ai_selected_index", ai_idx, count, nullable=True))

    if conf is not None and not (conf.__class__ in _NUM and 0.0 <= conf <= 1.0):
        out.append(_f("ai_confidence_invalid", "ai_confidence", conf,
                      "ai_confidence must be NULL or a number in [0, 1]"))

    for fld, flag in (("selection_match", sel), ("crop_match", cmatch),
                      ("ai_crop_accepted", accepted)):
        if flag is not None and not (flag.__class__ is int and 0 <= flag <= 1):
            out.append(_f("flag_invalid", fld, flag, f"{fld} must be NULL, 0 or 1"))
    if (sel.__class__ is int and 0 <= sel <= 1 and ai_idx.__class__ is int
            and user_idx.__class__ is int and sel != (ai_idx == user_idx)):
        out.append(_f("selection_match_inconsistent", "selection_match", sel,
                      f"selection_match is {sel} but ai_selected_index={ai_idx!r} and "
                      f"user_selected_index={user_idx!r}"))

    if ai_crop is not None:
        out.extend(check_box("ai_crop_coords", ai_crop)[0])
    box: Box | None = None
    if final_raw is not None:
        found, box = check_box("final_crop_coords", final_raw)
        out.extend(found)
    elif action == "crop" and "final_crop_coords" in cols:
        out.append(_f("crop_incomplete", "final_crop_coords", final_raw,
                      "crop row without final_crop_coords yet; kept out of the training set "
                      "until the crop tool writes it"))
    if box is not None:
        if is_full_frame(box, ctx.full_frame_tolerance):
            if action == "crop":
                out.append(_f("crop_full_frame_placeholder", "final_crop_coords", final_raw,
                              "a crop row whose final box is the full frame is a placeholder; "
                              "it is treated as an approve, not as a crop label"))
        else:
            ratio = (box[2] - box[0]) / (box[3] - box[1])
            if abs(ratio - 1.0) > ctx.aspect_tolerance:
                out.append(_f("crop_aspect_mismatch", "final_crop_coords", final_raw,
                              f"crop aspect differs from the image's by {abs(ratio - 1):.1%} "
                              f"(tolerance {ctx.aspect_tolerance:.1%})"))

    if cts is None or cts == "":
        if final_raw is not None and "crop_timestamp" in cols:
            out.append(_f("crop_timestamp_missing", "crop_timestamp", cts,
                          "final_crop_coords is set but crop_timestamp is empty"))
    else:
        out.extend(_check_timestamp("crop_timestamp", cts, ctx,
                                    code="crop_timestamp_unparseable"))
    return out


def is_pending_crop(row: tuple[object, ...]) -> bool:
    return row[USER_ACTION] == "crop" and row[FINAL_CROP] is None


def codes_of(findings: Iterable[Finding]) -> set[str]:
    return {f.code for f in findings}
