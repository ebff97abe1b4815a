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
    # -- database files and schema ------------------------------------------------------------
    Code("db_unreadable", "error", "schema",
         "The file cannot be opened as SQLite (corrupt, truncated, not a database, no permission).",
         "Restore the file from its backup or fix its permissions; other projects go on."),
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
         "Rows are still validated here; recreate the DB with the canonical DDL to stop bad writes."),
    Code("schema_missing_index", "warning", "schema",
         "A canonical index is missing (slower queries in the upstream tools only).",
         "Create it from Documents/SCHEMA_REFERENCE.md."),
    Code("schema_missing_view", "warning", "schema",
         "A canonical view is missing.",
         "Create it from Documents/SCHEMA_REFERENCE.md."),
    Code("schema_group_id_not_unique", "warning", "schema",
         "`group_id` is not the PRIMARY KEY, so the DB can hold two rows for one group.",
         "Duplicates are reported row by row as `group_id_duplicate`; recreate with the DDL."),
    # -- identity -----------------------------------------------------------------------------
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
    # -- time ---------------------------------------------------------------------------------
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
    # -- action and dimensions ----------------------------------------------------------------
    Code("user_action_invalid", "error", "row",
         "`user_action` is not exactly one of approve, crop, reject (case and spaces count).",
         "Correct the value upstream; the row is excluded from training."),
    Code("image_dimension_invalid", "error", "row",
         "`image_width` or `image_height` is not an integer > 0.",
         "Re-read the size from the image file (a crop tool once logged the displayed size)."),
    Code("batch_number_invalid", "warning", "row",
         "`batch_number` is neither NULL nor an integer >= 1.", "Informational; not used in training."),
    # -- images -------------------------------------------------------------------------------
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
    # -- selection ----------------------------------------------------------------------------
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
    # -- crops --------------------------------------------------------------------------------
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
