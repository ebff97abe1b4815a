"""`.decision` sidecars: tell the two kinds apart, check their fields, link them to rows.

The reviewer writes a kind A sidecar (``<chosen image stem>.decision``) next to an image that
needs a crop; the crop tool reads it, UPDATEs the row and moves image and sidecar to the cropped
folder.  The older reviewer wrote kind B sidecars (``<group id>.decision``) in the source folder.
This module turns a file into a :class:`~daemon.records.Sidecar` or a specific
:class:`~daemon.records.Issue`, decides which folder role a path has and which crop state a
sidecar stands for, and checks a parsed sidecar against what the caller knows about its row and
image (see Documents/SIDECARS.md for what the pipeline does on each event).

It must not touch the state DB, watch anything, or ever modify, move or delete a sidecar: the
files belong to the upstream tools.  Reading is the only I/O here, and it is size-capped and
never raises: every failure becomes an issue record.

For every sidecar issue, ``Issue.db_file`` holds the **sidecar's path** (there is no DB file to
name), ``rowid`` is ``None`` and ``group_id`` is set whenever the file names one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import structlog

from daemon.codes import SEVERITY
from daemon.decisions.checks import safe_repr
from daemon.files import DELETE_STAGING, find_image_beside
from daemon.records import Issue, Sidecar

log = structlog.get_logger("sidecars")

#: Sidecars are a few hundred bytes; anything bigger is not one and is not read whole.
MAX_SIDECAR_BYTES = 1024 * 1024
SUFFIX = ".decision"

#: Folder name -> role.  Current names first, then the names older projects use.
FOLDER_ROLES: dict[str, str] = {
    "__crop": "crop",
    "crop": "crop",
    "__crop_auto": "crop_auto",
    "crop_auto": "crop_auto",
    "__cropped": "cropped",
    "crop_cropped": "cropped",
    "__selected": "selected",
    "selected": "selected",
    DELETE_STAGING: "delete_staging",
}
ROLES: tuple[str, ...] = ("crop", "crop_auto", "cropped", "selected", "delete_staging", "source")

CropState = Literal["needs_crop", "cropped", "elsewhere", "group"]

_KIND_A_KEYS = frozenset({"project_id", "needs_crop", "ai_route", "ai_crop_coords",
                          "ai_crop_accepted"})
_KIND_B_KEYS = frozenset({"images", "ai_recommendation", "user_decision"})


# -- folder roles -------------------------------------------------------------------------------

def folder_role(path: Path, image_root: Path) -> str:
    """The role of the folder holding ``path``: the nearest role folder between the file and
    ``image_root`` decides (``__crop/x/y.decision`` is "crop"), else "source".

    A relative ``path`` is taken as relative to ``image_root``; for an absolute path outside the
    root only the file's own folder name is looked at.  Never raises.
    """
    try:
        pure = PurePath(path)
        if pure.is_absolute():
            try:
                parts = pure.relative_to(PurePath(image_root)).parts[:-1]
            except ValueError:
                parts = pure.parts[-2:-1]
        else:
            parts = pure.parts[:-1]
        for name in reversed(parts):
            role = FOLDER_ROLES.get(name)
            if role is not None:
                return role
    except (TypeError, ValueError):  # pragma: no cover - defensive: odd path objects
        pass
    return "source"


def crop_state(sidecar: Sidecar) -> CropState:
    """What a sidecar says about its row's crop, so an event re-checks exactly that row.

    Kind A in ``crop``/``crop_auto``: "needs_crop" (the row will get a final crop soon); in
    ``cropped``: "cropped" (the crop tool just updated the row); anywhere else: "elsewhere" (a
    stray or left-over sidecar; its row is still re-checked).  Kind B: "group" (no crop routing).
    """
    if sidecar.kind == "B":
        return "group"
    if sidecar.folder_role in ("crop", "crop_auto"):
        return "needs_crop"
    if sidecar.folder_role == "cropped":
        return "cropped"
    return "elsewhere"


def image_beside(sidecar: Sidecar) -> Path | None:
    """A kind A sidecar's image: same folder, same stem, any image suffix in any case."""
    return find_image_beside(sidecar.path.parent, sidecar.image_stem)


# -- parsing ------------------------------------------------------------------------------------

class _Fault(Exception):
    """A parse failure on its way to becoming an :class:`Issue`."""

    def __init__(self, code: str, field: str | None, value_repr: str, message: str,
                 group_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.value_repr = value_repr
        self.message = message
        self.group_id = group_id


def _issue(code: str, *, project: str, path: Path, group_id: str | None, field: str | None,
           value_repr: str, message: str) -> Issue:
    return Issue(code, SEVERITY[code], project, str(path), group_id, None, field, value_repr,
                 message)


def _read_capped(path: Path) -> bytes:
    # O_NONBLOCK: a FIFO named *.decision must not hang the worker; fstat then refuses it.
    # O_NOFOLLOW: a symlink is not followed to a file outside the image root (or to a FIFO).
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Fault("sidecar_unreadable", None, repr(str(path)),
                         "the .decision path is a symbolic link; sidecars are read only as "
                         "regular files: replace the link by the file") from exc
        raise _Fault("sidecar_unreadable", None, repr(str(path)),
                     f"cannot open the sidecar ({exc.strerror or exc}); check that it exists "
                     "and that trainingd's user may read it") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Fault("sidecar_unreadable", None, repr(str(path)),
                         "the .decision path is not a regular file; remove or rename it")
        if st.st_size > MAX_SIDECAR_BYTES:
            raise _Fault("sidecar_unreadable", None, repr(st.st_size),
                         f"the file is {st.st_size} bytes, more than a sidecar can be "
                         f"({MAX_SIDECAR_BYTES}); it is not a reviewer sidecar")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_SIDECAR_BYTES:  # grew while we read it
                raise _Fault("sidecar_unreadable", None, repr(total),
                             f"the file grew past {MAX_SIDECAR_BYTES} bytes while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise _Fault("sidecar_unreadable", None, repr(str(path)),
                     f"cannot read the sidecar ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


def _decode(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise _Fault("sidecar_json_malformed", None, _head(raw),
                     "the JSON is nested too deeply to be a sidecar; rewrite the file") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        if "digits" in str(exc) and not isinstance(exc, json.JSONDecodeError):
            raise _Fault("sidecar_json_malformed", None, _head(raw),
                         "the JSON holds a number with more than "
                         f"{sys.get_int_max_str_digits()} digits; no tool writes that: "
                         "rewrite the file from the row or delete it") from exc
        raise _Fault("sidecar_json_malformed", None, repr(raw[:80]),
                     f"not valid JSON ({exc}); the upstream tool may have been interrupted "
                     "mid-write: rewrite the file from the row or delete it") from exc


def _head(raw: bytes) -> str:
    return repr(raw[:80]) + (f"... ({len(raw)} bytes)" if len(raw) > 80 else "")


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_box(value: object) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)


def _text_id(data: Mapping[str, Any], key: str, missing_code: str,
             group_id: str | None) -> str:
    value = data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Fault(missing_code, key, safe_repr(value, 200),
                     f"the sidecar has no {key}; the crop cannot be linked to its row: "
                     f"add the {key} from the reviewer's DB row", group_id)
    if not isinstance(value, str):
        raise _Fault("sidecar_field_invalid", key, safe_repr(value, 200),
                     f"{key} must be a string, not {type(value).__name__}", group_id)
    return value


def _check_type(data: Mapping[str, Any], key: str, ok: bool, expected: str,
                group_id: str | None, prefix: str = "") -> None:
    if not ok:
        raise _Fault("sidecar_field_invalid", prefix + key, safe_repr(data.get(key), 200),
                     f"{prefix}{key} must be {expected}; correct the sidecar", group_id)


def _check_kind_a(data: Mapping[str, Any], group_id: str) -> None:
    if "needs_crop" in data:
        _check_type(data, "needs_crop", isinstance(data["needs_crop"], bool), "true or false",
                    group_id)
    if "ai_crop_coords" in data:
        v = data["ai_crop_coords"]
        _check_type(data, "ai_crop_coords", v is None or _is_box(v),
                    "null or a list of 4 finite numbers", group_id)
    if "ai_route" in data:
        v = data["ai_route"]
        _check_type(data, "ai_route", v is None or isinstance(v, str), "a string", group_id)
    if "ai_crop_accepted" in data:
        v = data["ai_crop_accepted"]
        _check_type(data, "ai_crop_accepted", v is None or isinstance(v, bool),
                    "null, true or false", group_id)


Predicate = Callable[[object], bool]


def _opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


def _opt_int(v: object) -> bool:
    return v is None or type(v) is int


#: Nested kind B fields: key -> (type test, what it must be).  Absent keys are fine.
_RECOMMENDATION_FIELDS: dict[str, tuple[Predicate, str]] = {
    "selected_image": (_opt_str, "a string"),
    "selected_index": (_opt_int, "an integer"),
    "reason": (_opt_str, "a string"),
    "confidence": (lambda v: v is None or _is_number(v), "a number"),
    "crop_needed": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "crop_coords": (lambda v: v is None or _is_box(v), "null or 4 numbers"),
}
_DECISION_FIELDS: dict[str, tuple[Predicate, str]] = {
    "action": (lambda v: isinstance(v, str), "a string"),
    "selected_image": (_opt_str, "a string"),
    "selected_index": (_opt_int, "an integer"),
    "timestamp": (_opt_str, "a string"),
}


def _check_kind_b(data: Mapping[str, Any], group_id: str) -> None:
    images = data.get("images")
    _check_type(data, "images",
                isinstance(images, list) and all(isinstance(n, str) and n for n in images),
                "a list of file names", group_id)
    _check_section(data, "ai_recommendation", _RECOMMENDATION_FIELDS, group_id)
    _check_section(data, "user_decision", _DECISION_FIELDS, group_id)


def _check_section(data: Mapping[str, Any], name: str,
                   fields: Mapping[str, tuple[Predicate, str]], group_id: str) -> None:
    """``data[name]`` is null or an object whose known ``fields`` have their types."""
    section = data.get(name)
    _check_type(data, name, section is None or isinstance(section, dict),
                "null or an object", group_id)
    if isinstance(section, dict):
        for key, (ok, expected) in fields.items():
            if key in section:
                _check_type(section, key, ok(section[key]), expected, group_id, f"{name}.")


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else path.stem


def _interpret(data: dict[str, Any], path: Path, image_root: Path) -> Sidecar:
    gid_raw = data.get("group_id")
    known_gid = gid_raw if isinstance(gid_raw, str) and gid_raw.strip() else None
    keys = set(data)
    if keys & _KIND_B_KEYS:
        kind: Literal["A", "B"] = "B"
    elif keys & _KIND_A_KEYS:
        kind = "A"
    else:
        raise _Fault("sidecar_shape_unknown", None, safe_repr(sorted(keys)[:10], 200),
                     "the object is neither a kind A (group_id, project_id, needs_crop) nor a "
                     "kind B (group_id, images, ai_recommendation) sidecar; check which tool "
                     "wrote it", known_gid)
    group_id = _text_id(data, "group_id", "sidecar_group_id_missing", None)
    project_id: str | None = None
    if kind == "A":
        project_id = _text_id(data, "project_id", "sidecar_project_id_missing", group_id)
        _check_kind_a(data, group_id)
    else:
        _check_kind_b(data, group_id)
    return Sidecar(path=path, kind=kind, group_id=group_id, project_id=project_id,
                   folder_role=folder_role(path, image_root), image_stem=_stem(path),
                   fields=dict(data))


def parse_sidecar(path: Path, *, project: str, image_root: Path) -> Sidecar | Issue:
    """Read and classify one ``.decision`` file; never raises, never writes.

    Returns a :class:`Sidecar` (kind A: ``group_id`` + ``project_id``/``needs_crop``…; kind B:
    ``images``/``ai_recommendation``/``user_decision``) or the first fault found as an
    :class:`Issue`: ``sidecar_unreadable``, ``sidecar_json_malformed``, ``sidecar_not_object``,
    ``sidecar_shape_unknown``, ``sidecar_group_id_missing``, ``sidecar_project_id_missing``
    (kind A) or ``sidecar_field_invalid``.  ``project`` is the project whose image root holds
    the file; the issue's ``db_file`` is the sidecar's path.
    """
    try:
        data = _decode(_read_capped(path))
        if not isinstance(data, dict):
            raise _Fault("sidecar_not_object", None, safe_repr(data, 200),
                         f"the JSON is a {type(data).__name__}, not an object; a sidecar is "
                         "one JSON object")
        return _interpret(data, path, image_root)
    except _Fault as fault:
        return _issue(fault.code, project=project, path=path, group_id=fault.group_id,
                      field=fault.field, value_repr=fault.value_repr, message=fault.message)
    except Exception as exc:  # one sidecar never stops the others: a bug becomes a record
        log.error("sidecars.check_failed", project=project, path=str(path),
                  error_type=type(exc).__name__, error=safe_repr(str(exc), 200), exc_info=exc)
        return _issue("sidecar_check_failed", project=project, path=path, group_id=None,
                      field=None, value_repr=safe_repr(f"{type(exc).__name__}: {exc}", 200),
                      message="trainingd could not check this sidecar (a bug in trainingd); "
                      "report the sidecars.check_failed log event")


# -- linking ------------------------------------------------------------------------------------

def check_sidecar_link(sidecar: Sidecar, *, row_exists: bool, row_project: str | None,
                       image_present: bool, expected_project: str) -> list[Issue]:
    """Check a parsed sidecar against its surroundings; pure (the caller looks things up).

    ``row_exists``: a row with the sidecar's group_id exists (in ``row_project``'s DB);
    ``image_present``: (kind A) an image with the sidecar's stem sits in the same folder (see
    :func:`image_beside`); ``expected_project``: the project configured for the image root.

    All findings here are warnings: the sidecar's row, if any, is judged by its own checks.
    Kind A: ``sidecar_orphan`` (no row), ``sidecar_image_missing``, ``sidecar_project_mismatch``
    (sidecar project_id, folder's project and row's project disagree, ignoring case),
    ``sidecar_misplaced`` (outside the crop folders).  Kind B: only ``sidecar_group_unjoined``
    when no row matches (the old tools never joined these into a DB), plus a mismatch between
    the folder's project and the row's.
    """
    out: list[Issue] = []

    def add(code: str, field: str | None, value: object, message: str) -> None:
        out.append(_issue(code, project=expected_project, path=sidecar.path,
                          group_id=sidecar.group_id, field=field, value_repr=repr(value),
                          message=message))

    if sidecar.kind == "B":
        if not row_exists:
            add("sidecar_group_unjoined", "group_id", sidecar.group_id,
                "group-level sidecar of the older reviewer with no DB row; backfill it if the "
                "decision should count, otherwise nothing to do")
        elif row_project is not None and row_project.casefold() != expected_project.casefold():
            add("sidecar_project_mismatch", "project_id", row_project,
                f"the row lives in project {row_project!r} but the sidecar sits under the image "
                f"root of {expected_project!r}; check the image root configuration")
        return out

    if not row_exists:
        add("sidecar_orphan", "group_id", sidecar.group_id,
            "no decision row has this group_id; the crop cannot be joined: check the sidecar's "
            "project DB, or delete the left-over sidecar")
    if not image_present:
        add("sidecar_image_missing", None, sidecar.image_stem,
            f"no image {sidecar.image_stem}.png/.jpg/.jpeg beside the sidecar; the image moved "
            "without its sidecar or was deleted")
    names = {"sidecar": sidecar.project_id, "folder": expected_project}
    if row_exists and row_project is not None:
        names["row"] = row_project
    if len({str(v).casefold() for v in names.values()}) > 1:
        detail = ", ".join(f"{k} {v!r}" for k, v in names.items())
        add("sidecar_project_mismatch", "project_id", sidecar.project_id,
            f"project ids disagree ({detail}); fix the sidecar or the image root configuration")
    if sidecar.folder_role not in ("crop", "crop_auto", "cropped"):
        add("sidecar_misplaced", None, sidecar.folder_role,
            f"a crop-routing sidecar in a {sidecar.folder_role!r} folder; it belongs in the crop "
            "folders with its image: move it back or delete it if the crop is done")
    return out
