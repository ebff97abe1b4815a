"""Every issue code trainingd can report, with its severity and what a person should do.

This table is the single source for ``Documents/ISSUE_CODES.md`` (a test keeps the two equal).
Codes are stable strings: renaming one breaks operators' ``jq`` filters, so add, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.records import Severity


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    severity: Severity
    room: str
    meaning: str
    action: str


_CODES: tuple[Code, ...] = (
    # -- database files and schema --
    Code("db_unreadable", "error", "schema",
         "The file cannot be opened as SQLite (corrupt, truncated, not a database, no permission).",
         "Restore the file from its backup or fix its permissions; other projects go on."),
    Code("db_missing", "warning", "schema",
         "A project configured in config.toml has no decision DB file (yet).",
         "Nothing to do before the reviewer's first save in that project: the DB appears then. "
         "If it should exist, check `paths.decisions_dir` and the project's `db` setting."),
    Code("project_check_failed", "error", "schema",
         "Validating the project's DB failed with an unexpected error (a bug in trainingd, not "
         "in the data); the other projects were validated.",
         "Report the `validation.project_failed` log event with its traceback; the project is "
         "retried on every pass and the issue leaves once a pass succeeds."),
    Code("db_not_decision_db", "error", "schema",
         "The SQLite file has no `ai_decisions` table (a foreign DB in the decisions folder).",
         "Move the file out of the decisions folder, or name it `*_temp.db` if it is scratch."),
    Code("db_without_rowid", "error", "schema",
         "`ai_decisions` is a WITHOUT ROWID table; rows cannot be tracked incrementally.",
         "Recreate the DB with the canonical DDL (`trainingd` backfill writes one)."),
    Code("schema_missing_column", "error", "schema",
         "A NOT NULL column of the v3 contract is missing; rows cannot be fully checked.",
         "Migrate the DB to the canonical 18-column DDL (Documents/SCHEMA_REFERENCE.md)."),
    Code("schema_missing_optional_column", "warning", "schema",
         "A nullable column of the v3 contract is missing (17-column DBs lack `ai_crop_accepted`).",
         "Harmless for training; add the column with `ALTER TABLE` when convenient."),
    Code("schema_extra_column", "warning", "schema",
         "The table has a column the v3 contract does not define; it is ignored.",
         "Check which tool added it; document it or drop it."),
    Code("schema_missing_check", "warning", "schema",
         "A CHECK constraint of the canonical DDL is absent, so the DB accepts invalid values.",
         "Rows are still validated here; recreate the DB with the canonical DDL to stop "
         "bad writes."),
    Code("schema_missing_index", "warning", "schema",
         "A canonical index is missing (slower queries in the upstream tools only).",
         "Create it from Documents/SCHEMA_REFERENCE.md."),
    Code("schema_missing_view", "warning", "schema",
         "A canonical view is missing.",
         "Create it from Documents/SCHEMA_REFERENCE.md."),
    Code("schema_group_id_not_unique", "warning", "schema",
         "`group_id` is not the PRIMARY KEY, so the DB can hold two rows for one group.",
         "Duplicates are reported row by row as `group_id_duplicate`; recreate with the DDL."),
    # -- identity --
    Code("group_id_empty", "error", "row",
         "`group_id` is NULL, empty or only whitespace.",
         "Fix the row in the upstream tool; the row cannot be linked to sidecars or crops."),
    Code("group_id_duplicate", "error", "row",
         "Another row of the same DB has the same `group_id` (possible only without the PK).",
         "Keep one of the rows; the later copy is excluded from training."),
    Code("group_id_duplicate_across_projects", "warning", "row",
         "The same `group_id` is used by rows of another project's DB.",
         "Usually a DB copied under a second name; check which project owns the group."),
    Code("project_id_empty", "error", "row",
         "`project_id` is NULL or empty.",
         "Set the project id; it should equal the DB file name."),
    Code("project_id_mismatch", "warning", "row",
         "`project_id` differs (ignoring case) from the DB file name.",
         "Rename the DB or correct the rows; training keys by the DB's project."),
    # -- time --
    Code("timestamp_missing", "error", "row",
         "`timestamp` is NULL or empty.", "Restore the review time from the reviewer's logs."),
    Code("timestamp_unparseable", "error", "row",
         "`timestamp` is not one of the formats in the data contract.",
         "Rewrite it as ISO-8601 (`2025-10-23T20:44:56.880505Z`)."),
    Code("timestamp_in_future", "warning", "row",
         "`timestamp` lies more than the configured slack after now (clock skew or a typo).",
         "Check the reviewer machine's clock."),
    Code("crop_timestamp_unparseable", "error", "row",
         "`crop_timestamp` is present but not one of the contract's formats.",
         "Rewrite it as ISO-8601."),
    Code("crop_timestamp_missing", "warning", "row",
         "`final_crop_coords` is set but `crop_timestamp` is empty.",
         "Harmless for training; the crop tool should record when it cropped."),
    # -- action and dimensions --
    Code("user_action_invalid", "error", "row",
         "`user_action` is not exactly one of approve, crop, reject (case and spaces count).",
         "Correct the value upstream; the row is excluded from training."),
    Code("image_dimension_invalid", "error", "row",
         "`image_width` or `image_height` is not an integer > 0.",
         "Re-read the size from the image file (a crop tool once logged the displayed size)."),
    Code("batch_number_invalid", "warning", "row",
         "`batch_number` is neither NULL nor an integer >= 1.",
         "Informational; not used in training."),
    # -- images --
    Code("images_not_json", "error", "row",
         "`images` is not valid JSON text.", "Rewrite it as a JSON array of file names."),
    Code("images_not_list", "error", "row",
         "`images` is JSON but not an array.", "Rewrite it as a JSON array of file names."),
    Code("images_count_out_of_range", "error", "row",
         "`images` holds fewer than 1 or more than 4 entries.",
         "A group has 2-4 images; check the reviewer's batch."),
    Code("image_name_invalid", "error", "row",
         "An entry of `images` is not a non-empty string.", "Replace it by the image's file name."),
    Code("image_path_not_bare", "error", "row",
         "An entry of `images` is a path (folder, drive, `PROJECT_ROOT/`), not a bare file name.",
         "Store only the file name; trainingd finds files under the configured image roots."),
    Code("images_duplicate", "error", "row",
         "The same file name appears twice in one group.", "Remove the repeated entry upstream."),
    Code("images_stage_order", "warning", "row",
         "The images are not ordered lowest stage first.",
         "Stage-based baselines read the order; check the reviewer version that wrote the row."),
    # -- selection --
    Code("index_invalid", "error", "row",
         "`user_selected_index` or `ai_selected_index` is not an integer.",
         "Correct the index; the pick of the group is unknown otherwise."),
    Code("index_out_of_range", "error", "row",
         "An index points outside `images` (or `user_selected_index` is NULL).",
         "Correct the index or the image list."),
    Code("ai_confidence_invalid", "error", "row",
         "`ai_confidence` is not NULL and not a number in [0, 1].", "Correct or clear it."),
    Code("flag_invalid", "warning", "row",
         "`selection_match`, `crop_match` or `ai_crop_accepted` is not NULL, 0 or 1.",
         "Informational; trainingd recomputes matches itself."),
    Code("selection_match_inconsistent", "warning", "row",
         "`selection_match` disagrees with `ai_selected_index == user_selected_index`.",
         "The deployed-model metrics use the indexes, not this flag."),
    # -- crops --
    Code("crop_coords_not_json", "error", "row",
         "A crop column is not valid JSON text.", "Rewrite it as `[x1, y1, x2, y2]`."),
    Code("crop_coords_wrong_shape", "error", "row",
         "A crop column is JSON but not a list of exactly 4 values.",
         "Rewrite it as `[x1, y1, x2, y2]`."),
    Code("crop_coords_not_finite", "error", "row",
         "A crop coordinate is not a finite number (string, null, NaN, Infinity, boolean).",
         "Rewrite the box with numbers."),
    Code("crop_coords_pixels", "error", "row",
         "A crop coordinate is greater than 1: pixel coordinates where normalized ones belong.",
         "Divide x by the image width and y by its height (backfill does this for legacy CSVs)."),
    Code("crop_coords_out_of_range", "error", "row",
         "A crop coordinate is negative.", "Clamp or redraw the box."),
    Code("crop_box_inverted", "error", "row",
         "The box has x1 > x2 or y1 > y2 (corners swapped).", "Redraw the crop."),
    Code("crop_box_empty", "error", "row",
         "The box has zero width or height (x1 == x2 or y1 == y2).", "Redraw the crop."),
    Code("crop_aspect_mismatch", "warning", "row",
         "The final crop's aspect ratio differs from the image's by more than the tolerance.",
         "Real crops keep the image's aspect ratio; check for a tool bug or a hand-typed box."),
    Code("crop_full_frame_placeholder", "warning", "row",
         "A `crop` row's final box is the full frame: a placeholder, not a real crop.",
         "Treat as an approve; excluded from crop training."),
    Code("crop_incomplete", "warning", "row",
         "A `crop` row has no `final_crop_coords` yet (cropping pending).",
         "Nothing to do if the crop tool is still working; kept out of the training set."),
    # -- values no check can read, and the per-row guard --
    Code("value_too_deep", "error", "row",
         "A JSON value (`images` or a crop column) nests arrays or objects thousands deep; "
         "`value_repr` shows its head and length.",
         "Rewrite the value from the reviewer's data; no upstream tool writes such a value."),
    Code("number_too_large", "error", "row",
         "A JSON value holds an integer of more than 4,300 digits, which Python refuses to "
         "convert; `value_repr` shows its head and length.",
         "Rewrite the value with real coordinates or file names."),
    Code("row_check_failed", "error", "row",
         "A row check raised an unexpected error (a bug in trainingd); `value_repr` holds the "
         "exception type and message. The row is recorded, the checkpoint moves past it.",
         "Report the `validation.row_check_failed` log event with its traceback; the row is kept "
         "out of training until a fixed trainingd checks it again."),
    # -- backfill (legacy CSV lines) --
    Code("backfill_format_unknown", "error", "backfill",
         "A CSV's header matches none of the legacy formats; the whole file is skipped.",
         "Check the file is a legacy log (data contract section 5); see Documents/BACKFILL.md."),
    Code("backfill_csv_malformed", "error", "backfill",
         "The CSV module cannot read the line (broken quoting, a field over the size limit), or "
         "the line holds bytes that are not UTF-8 (shown as `\\udcXX` in `value_repr`).",
         "Repair the line in a copy of the CSV and backfill the copy."),
    Code("backfill_row_shifted", "error", "backfill",
         "The line's fields do not line up with its header (too few fields, a ragged image block, "
         "a timestamp in a coordinate column, a second header): appended under another header.",
         "Split the rows written under the other header into their own CSV with that header."),
    Code("backfill_timestamp_missing", "error", "backfill",
         "The line's timestamp is empty.", "Restore the time from another log, or leave it out."),
    Code("backfill_timestamp_unparseable", "error", "backfill",
         "The line's timestamp is in none of the contract's formats.",
         "Rewrite it as ISO-8601 in a copy of the CSV."),
    Code("backfill_path_empty", "error", "backfill",
         "The chosen image path is empty.", "Nothing to backfill from this line."),
    Code("backfill_list_unparseable", "error", "backfill",
         "`rejected_paths` is not a Python list of strings, or `neg_paths` not a JSON array.",
         "Repair the list in a copy of the CSV (it is parsed without eval)."),
    Code("backfill_group_invalid", "error", "backfill",
         "The group has an empty path, a repeated file name, or more than 4 images.",
         "A v3 row holds 1-4 distinct images; split or repair the group upstream."),
    Code("backfill_chosen_not_in_group", "error", "backfill",
         "The chosen image is not among the group's logged images.",
         "The line is inconsistent; check the reviewer log of that session."),
    Code("backfill_project_unknown", "error", "backfill",
         "No project for the line: the path does not name one, or no --window covers its time.",
         "Give --project, or a --window covering the line's timestamp."),
    Code("backfill_image_size_missing", "error", "backfill",
         "Width/height are zero, missing, fractional or over 1,000,000 px and the image is not "
         "under any image root.",
         "Pass --image-root with the folder holding the image, so its size is read from the file."),
    Code("backfill_image_unreadable", "error", "backfill",
         "The logged size is unusable and the image file found cannot give its size: larger than "
         "Pillow's decompression-bomb limit, truncated, not an image, or not a regular file.",
         "Check the file named in the message; or write the size into a copy of the CSV."),
    Code("backfill_csv_unreadable", "error", "backfill",
         "A CSV path is not a regular readable file (a folder, a FIFO, a device) or reading it "
         "failed; that file (or its rest) is skipped, the other CSVs are converted.",
         "Pass the path of the real CSV file; copy it off a failing disk first."),
    Code("backfill_line_failed", "error", "backfill",
         "Converting the line raised an unexpected error (a bug in trainingd, not in the line); "
         "`value_repr` holds the line's fields. The other lines go on.",
         "Report the `backfill.line_failed` log event with its traceback."),
    Code("backfill_box_unparseable", "error", "backfill",
         "A crop coordinate is empty or not a finite number.",
         "Nothing to recover; redo the crop."),
    Code("backfill_box_out_of_range", "error", "backfill",
         "The box has a negative value or reaches outside the image (after pixel normalization).",
         "Check the logged image size; the crop tool may have logged the displayed size."),
    Code("backfill_box_inverted", "error", "backfill",
         "The box has x1 > x2 or y1 > y2.", "Redo the crop; corners were swapped."),
    Code("backfill_box_empty", "error", "backfill",
         "The box has zero width or height.", "Redo the crop."),
    Code("backfill_duplicate_image", "error", "backfill",
         "The same image of the same project was already converted from an earlier line.",
         "The first line is kept; put the correct line first if a later one is the correction."),
    Code("backfill_full_frame_as_approve", "warning", "backfill",
         "A full-frame or placeholder crop: recorded as `approve` with final box [0, 0, 1, 1].",
         "Nothing to do; counted in the report (not a crop label)."),
    Code("backfill_size_from_image_file", "warning", "backfill",
         "The logged size was unusable; the size was read from the image file under an image root.",
         "Nothing to do; check the report if many lines needed it."),
    Code("backfill_crop_without_coords", "warning", "backfill",
         "A crop log without coordinates: recorded as `crop` with no final box (crop_incomplete).",
         "Nothing to do; such rows teach the pick but not the crop."),
    # -- sidecars (.decision files) --
    Code("sidecar_unreadable", "error", "sidecar",
         "A `.decision` file cannot be read: no permission, vanished, not a regular file (a "
         "folder, a FIFO, a symbolic link), or larger than 1 MiB. For every sidecar issue "
         "`db_file` holds the sidecar's path.",
         "Fix its permissions or remove the stray file; trainingd never changes sidecars."),
    Code("sidecar_json_malformed", "error", "sidecar",
         "The sidecar is not valid UTF-8 JSON (often a write interrupted half-way), or its "
         "JSON nests thousands deep or holds a number of more than 4,300 digits.",
         "Rewrite it from the row (`group_id`, `project_id`, `needs_crop`) or delete it."),
    Code("sidecar_not_object", "error", "sidecar",
         "The sidecar is valid JSON but not an object (a list, string, number or null).",
         "Check which tool wrote it; a sidecar is one JSON object."),
    Code("sidecar_shape_unknown", "error", "sidecar",
         "The object is neither kind A (`project_id`/`needs_crop`) nor kind B "
         "(`images`/`ai_recommendation`/`user_decision`).",
         "Check which tool wrote it (Documents/SIDECARS.md lists the live shapes)."),
    Code("sidecar_group_id_missing", "error", "sidecar",
         "The sidecar has no `group_id` (absent, null or empty): it cannot be linked to a row.",
         "Add the row's `group_id`, or delete the sidecar if the crop is done."),
    Code("sidecar_project_id_missing", "error", "sidecar",
         "A kind A sidecar has no `project_id` (absent, null or empty).",
         "Add the project id of the DB that holds the row."),
    Code("sidecar_field_invalid", "error", "sidecar",
         "A sidecar field has the wrong type (e.g. `group_id` a number, `needs_crop` a string, "
         "`ai_crop_coords` not 4 numbers).",
         "Correct the field; `field` names it (`user_decision.selected_index` for nested ones)."),
    Code("sidecar_check_failed", "error", "sidecar",
         "Checking the sidecar raised an unexpected error (a bug in trainingd); `value_repr` "
         "holds the exception type and message.",
         "Report the `sidecars.check_failed` log event with its traceback; other sidecars go on."),
    Code("sidecar_orphan", "warning", "sidecar",
         "A kind A sidecar names a `group_id` that no decision row has.",
         "Check the project's DB (row deleted? wrong DB?); delete the sidecar if it is left over."),
    Code("sidecar_image_missing", "warning", "sidecar",
         "No image with the kind A sidecar's stem (.png/.jpg/.jpeg) is in the sidecar's folder.",
         "The image moved without its sidecar or was deleted; move them back together."),
    Code("sidecar_project_mismatch", "warning", "sidecar",
         "The sidecar's `project_id`, the image root's configured project and the row's project "
         "disagree (ignoring case).",
         "Fix the sidecar, or the image root's project in the configuration."),
    Code("sidecar_misplaced", "warning", "sidecar",
         "A kind A (crop routing) sidecar sits outside the crop folders "
         "(`__selected/`, `__delete_staging/` or a source folder).",
         "Move it back next to its image in `__crop/`, or delete it if the crop is done."),
    Code("sidecar_group_unjoined", "warning", "sidecar",
         "A kind B (older reviewer, group-level) sidecar whose group has no decision row; the "
         "old tools never joined these into a DB.",
         "Informational; backfill the group if its decision should count for training."),
    # -- embedding (image files) --
    Code("image_empty", "error", "embedding",
         "The image file has zero bytes (an interrupted copy or save).",
         "Re-export or restore the image; it is retried as soon as its bytes change."),
    Code("image_truncated", "error", "embedding",
         "The image file ends early: its header is valid but the pixel data is cut short.",
         "Re-export or restore the image; it is retried as soon as its bytes change."),
    Code("image_not_an_image", "error", "embedding",
         "The file has an image extension but is not a PNG or JPEG that Pillow can identify.",
         "Replace it with the real image, or move it out of the image root."),
    Code("image_too_large", "error", "embedding",
         "The image has more pixels than `embedding.max_image_pixels` (decompression-bomb guard).",
         "Check the file; raise `embedding.max_image_pixels` if such images are legitimate."),
    Code("image_corrupt", "error", "embedding",
         "Pillow identified the image but failed to decode it (corrupt data, unsupported mode).",
         "Re-export the image; the message names Pillow's error."),
    Code("image_unreadable", "error", "embedding",
         "The file cannot be read (no permission, a folder with an image name, an I/O error).",
         "Fix the permissions or the path; the file is retried when its size or mtime changes."),
    Code("image_vanished", "warning", "embedding",
         "The image disappeared between listing and reading (moved or deleted meanwhile).",
         "Usually harmless: the moved file is embedded at its new path; a deleted one is lost."),
    Code("image_not_regular", "error", "embedding",
         "A path with an image name in an image root is not a regular file (a FIFO, socket, "
         "device or symbolic link); trainingd opens only regular files there.",
         "Replace it with the image file or remove it; it is looked at again when it changes."),
    # -- predictions for new groups (daemon/predict) --
    Code("prediction_image_missing", "warning", "predict",
         "An image of a group waiting for review has no vector (its embedding failed, it is "
         "not embedded yet, or its cached vector file is damaged), so the group's prediction "
         "covers the other images only; with no vector at all the group gets no prediction.",
         "Fix or restore the image (the embedding issue on the same file says what is wrong), "
         "or repair a damaged cache file with `trainingd embed --verify`; the group is "
         "predicted again when the image's bytes change or a new champion is promoted."),
    # -- embedding exports (daemon/export): the row is left out of the export, the rest goes --
    Code("export_vector_missing", "warning", "export",
         "The state DB records a vector whose `.npy` file is gone from the cache.",
         "Run `trainingd embed --verify`, then `trainingd embed`; the next export adds the row."),
    Code("export_vector_unreadable", "warning", "export",
         "The cache file cannot be read (no permission, a folder, FIFO or device in its place).",
         "Fix its permissions or remove it and run `trainingd embed`; the next export adds it."),
    Code("export_vector_damaged", "warning", "export",
         "The cache file is not a whole `.npy` (truncated, or not a numpy file).",
         "Run `trainingd embed --verify` to find the damaged files, then `trainingd embed`."),
    Code("export_vector_shape", "warning", "export",
         "The cache file holds another dtype or length than the embedder's float32 vectors "
         "(or the state DB records another dimension).",
         "The file is not this embedder's: remove it and run `trainingd embed`."),
    Code("export_vector_not_unit", "warning", "export",
         "The cached vector is not L2-normalised or not finite (every cached vector is).",
         "The file is damaged: `trainingd embed --verify`, then `trainingd embed`."),
)

CODES: dict[str, Code] = {c.code: c for c in _CODES}
SEVERITY: dict[str, Severity] = {c.code: c.severity for c in _CODES}


def render_markdown_table() -> str:
    """The table in Documents/ISSUE_CODES.md, generated so docs and code cannot drift."""
    lines = [
        "| code | severity | room | meaning | what to do |",
        "|---|---|---|---|---|",
    ]
    for c in _CODES:
        lines.append(f"| `{c.code}` | {c.severity} | {c.room} | {c.meaning} | {c.action} |")
    return "\n".join(lines) + "\n"


ISSUE_CODES_DOC = "Documents/ISSUE_CODES.md"
_DOC_HEADER = """# Issue codes

Every problem trainingd finds in its input becomes an **issue record**; nothing is skipped
silently and nothing is modified to make it fit. This table is generated from `daemon/codes.py`
(`trainingd codes` prints it; a test keeps this page equal to it). Codes are stable: filters in
`jq` and dashboards can rely on them.

## The issue record

| field | meaning |
|---|---|
| `code` | stable code from the table below |
| `severity` | `error`: the row (or DB) is excluded from training; `warning`: reported, \
still usable (for `crop_incomplete`: not yet) |
| `project` | the project the DB file belongs to (file name without `.db`, `_temp`, `.backup-*`) |
| `db_file` | absolute path of the file at fault: the decision DB, or for sidecar, image and \
backfill issues the sidecar, image or CSV file |
| `group_id` | the row's `group_id` as stored (`null` for schema findings and non-text ids) |
| `rowid` | SQLite rowid of the row when it was checked (`null` for schema findings) |
| `field` | the column at fault |
| `value_repr` | Python `repr()` of the value exactly as read: `'1787.0'` (text) vs \
`1787.0` (number) vs `None` |
| `message` | one sentence a person can act on |

Where to see them: `trainingd validate` (errors, plus counts by code), `trainingd validate --json`
(every issue), the inspection report (`trainingd inspect`), and the state DB table `issues`.

Severity decides training eligibility: a row with any `error` never reaches a training set; a
crop row is used as a crop label only once `final_crop_coords` is present and valid, and a
full-frame placeholder crop is treated as an approve.

## Codes

"""


def render_issue_codes_doc() -> str:
    """The whole of Documents/ISSUE_CODES.md.  Regenerate it with
    ``python -m daemon codes --write-doc`` after adding a code."""
    return _DOC_HEADER + render_markdown_table()
