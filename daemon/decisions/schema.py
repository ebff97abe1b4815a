"""The canonical v3 DDL, a function that creates a v3 DB, and schema detection with drift.

The upstream DDL file was lost; this module is the reconstruction from the data contract
(Documents/SCHEMA_REFERENCE.md documents it).  Detection must never raise on a strange file:
everything it cannot understand becomes part of the :class:`SchemaReport`.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

from daemon.records import SchemaReport

TABLE = "ai_decisions"

#: The 18 columns in canonical order.  Readers select by name, never by position.
COLUMNS: tuple[str, ...] = (
    "group_id", "timestamp", "project_id", "directory", "batch_number", "images",
    "ai_selected_index", "ai_crop_coords", "ai_confidence", "user_selected_index",
    "user_action", "final_crop_coords", "crop_timestamp", "image_width", "image_height",
    "selection_match", "crop_match", "ai_crop_accepted",
)
#: Columns declared NOT NULL (or PRIMARY KEY): without them a row cannot be validated.
REQUIRED_COLUMNS: frozenset[str] = frozenset({
    "group_id", "timestamp", "project_id", "images", "user_selected_index", "user_action",
    "image_width", "image_height",
})
LEGACY_17_MISSING = "ai_crop_accepted"
#: One row of every column, in :data:`COLUMNS` order (backfill output, sample data, tests).
INSERT_SQL = (f"INSERT INTO ai_decisions ({', '.join(COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(COLUMNS))})")

COLUMN_TYPES: dict[str, str] = {
    "group_id": "TEXT", "timestamp": "TEXT", "project_id": "TEXT", "directory": "TEXT",
    "batch_number": "INTEGER", "images": "TEXT", "ai_selected_index": "INTEGER",
    "ai_crop_coords": "TEXT", "ai_confidence": "REAL", "user_selected_index": "INTEGER",
    "user_action": "TEXT", "final_crop_coords": "TEXT", "crop_timestamp": "TEXT",
    "image_width": "INTEGER", "image_height": "INTEGER", "selection_match": "BOOLEAN",
    "crop_match": "BOOLEAN", "ai_crop_accepted": "BOOLEAN",
}

TABLE_DDL = """\
CREATE TABLE IF NOT EXISTS ai_decisions (
    group_id            TEXT PRIMARY KEY,
    timestamp           TEXT NOT NULL,
    project_id          TEXT NOT NULL,
    directory           TEXT,
    batch_number        INTEGER,
    images              TEXT NOT NULL,
    ai_selected_index   INTEGER CHECK (ai_selected_index IS NULL
                                       OR (ai_selected_index >= 0 AND ai_selected_index <= 3)),
    ai_crop_coords      TEXT,
    ai_confidence       REAL CHECK (ai_confidence IS NULL
                                    OR (ai_confidence >= 0.0 AND ai_confidence <= 1.0)),
    user_selected_index INTEGER NOT NULL CHECK (user_selected_index >= 0
                                                AND user_selected_index <= 3),
    user_action         TEXT NOT NULL CHECK (user_action IN ('approve', 'crop', 'reject')),
    final_crop_coords   TEXT,
    crop_timestamp      TEXT,
    image_width         INTEGER NOT NULL CHECK (image_width > 0),
    image_height        INTEGER NOT NULL CHECK (image_height > 0),
    selection_match     BOOLEAN,
    crop_match          BOOLEAN,
    ai_crop_accepted    BOOLEAN
)"""

#: CHECK constraints of the canonical DDL, named by the column each one guards.
CHECKED_COLUMNS: tuple[str, ...] = (
    "ai_selected_index", "ai_confidence", "user_selected_index", "user_action",
    "image_width", "image_height",
)

INDEXES: dict[str, str] = {
    "idx_project_id": "CREATE INDEX IF NOT EXISTS idx_project_id ON ai_decisions(project_id)",
    "idx_timestamp": "CREATE INDEX IF NOT EXISTS idx_timestamp ON ai_decisions(timestamp)",
    "idx_selection_match":
        "CREATE INDEX IF NOT EXISTS idx_selection_match ON ai_decisions(selection_match)",
    "idx_crop_match": "CREATE INDEX IF NOT EXISTS idx_crop_match ON ai_decisions(crop_match)",
    "idx_user_action": "CREATE INDEX IF NOT EXISTS idx_user_action ON ai_decisions(user_action)",
    "idx_batch_number":
        "CREATE INDEX IF NOT EXISTS idx_batch_number ON ai_decisions(batch_number)",
}

VIEWS: dict[str, str] = {
    "ai_performance": """\
CREATE VIEW IF NOT EXISTS ai_performance AS
SELECT project_id,
       COUNT(*) AS total_decisions,
       SUM(CASE WHEN selection_match = 1 THEN 1 ELSE 0 END) AS correct_selections,
       SUM(CASE WHEN crop_match = 1 THEN 1 ELSE 0 END) AS correct_crops,
       ROUND(100.0 * SUM(CASE WHEN selection_match = 1 THEN 1 ELSE 0 END) / COUNT(*), 2)
           AS selection_accuracy_pct,
       ROUND(100.0 * SUM(CASE WHEN crop_match = 1 THEN 1 ELSE 0 END)
             / NULLIF(SUM(CASE WHEN crop_match IS NOT NULL THEN 1 ELSE 0 END), 0), 2)
           AS crop_accuracy_pct
FROM ai_decisions
GROUP BY project_id""",
    "incomplete_crops": """\
CREATE VIEW IF NOT EXISTS incomplete_crops AS
SELECT * FROM ai_decisions
WHERE user_action = 'crop' AND final_crop_coords IS NULL""",
    "ai_mistakes": """\
CREATE VIEW IF NOT EXISTS ai_mistakes AS
SELECT * FROM ai_decisions
WHERE selection_match = 0 OR crop_match = 0""",
}


def canonical_ddl() -> str:
    """The whole canonical schema as one SQL script (table, six indexes, three views)."""
    parts = [TABLE_DDL, *INDEXES.values(), *VIEWS.values()]
    return ";\n\n".join(parts) + ";\n"


def create_v3_db(path: Path, *, wal: bool = True) -> sqlite3.Connection:
    """Create (or open) a DB with the canonical v3 schema and return a writable connection.

    Used by tests, the demo, and backfill (which writes into a temp name and renames it).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(canonical_ddl())
    return conn


def legacy_table_ddl(columns: tuple[str, ...] = COLUMNS, *, primary_key: bool = True) -> str:
    """A ``CREATE TABLE`` without CHECK constraints, as the older backfill scripts wrote it
    (optionally with fewer columns).  Such DBs hold the faults the validator exists to catch."""
    parts = []
    for col in columns:
        decl = f"    {col} {COLUMN_TYPES[col]}"
        if col == "group_id" and primary_key:
            decl += " PRIMARY KEY"
        elif col in REQUIRED_COLUMNS and col != "group_id":
            decl += " NOT NULL"
        parts.append(decl)
    return f"CREATE TABLE IF NOT EXISTS {TABLE} (\n" + ",\n".join(parts) + "\n)"


def create_legacy_db(
    path: Path, *, columns: tuple[str, ...] = COLUMNS, primary_key: bool = True,
    with_indexes: bool = True, wal: bool = True,
) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(legacy_table_ddl(columns, primary_key=primary_key))
    if with_indexes:
        for sql in INDEXES.values():
            if all(c in columns for c in re.findall(r"\((\w+)\)", sql)):
                conn.execute(sql)
    return conn


# -- detection ----------------------------------------------------------------------------------

_CHECK_START = re.compile(r"\bcheck\s*\(", re.IGNORECASE)


def _check_expressions(table_sql: str) -> list[str]:
    """Every ``CHECK (...)`` body in a CREATE TABLE statement (balanced parentheses)."""
    bodies: list[str] = []
    for match in _CHECK_START.finditer(table_sql):
        depth, start = 1, match.end()
        i = start
        while i < len(table_sql) and depth:
            if table_sql[i] == "(":
                depth += 1
            elif table_sql[i] == ")":
                depth -= 1
            i += 1
        bodies.append(table_sql[start : i - 1].lower())
    return bodies


def detect_schema(conn: sqlite3.Connection) -> SchemaReport:
    """Classify an open DB and list its drift from the canonical v3 schema.  Never raises
    for a strange schema; raises ``sqlite3.DatabaseError`` only if the file is not SQLite."""
    master = conn.execute(
        "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    fingerprint = hashlib.sha256(repr(master).encode()).hexdigest()[:16]
    table_sql = next((m[3] for m in master if m[0] == "table" and m[1] == TABLE), None)
    if table_sql is None:
        tables = sorted(m[1] for m in master if m[0] == "table")
        return SchemaReport(
            kind="foreign", columns=(), fingerprint=fingerprint,
            detail=f"no table {TABLE!r}; tables: {tables!r}",
        )
    info = conn.execute(f"PRAGMA table_info({TABLE})").fetchall()
    columns = tuple(str(r[1]) for r in info)
    present = set(columns)
    missing = tuple(c for c in COLUMNS if c not in present)
    extra = tuple(c for c in columns if c not in COLUMN_TYPES)
    checks = _check_expressions(table_sql)
    missing_checks = tuple(
        col for col in CHECKED_COLUMNS
        if col in present and not any(re.search(rf"\b{col}\b", body) for body in checks)
    )
    index_names = {m[1] for m in master if m[0] == "index"}
    missing_indexes = tuple(n for n in INDEXES if n not in index_names)
    view_names = {m[1] for m in master if m[0] == "view"}
    missing_views = tuple(n for n in VIEWS if n not in view_names)
    has_rowid = "without rowid" not in table_sql.lower()
    pk_cols = [str(r[1]) for r in info if r[5]]
    unique_gid = pk_cols == ["group_id"] or _has_unique_index_on_group_id(conn)

    if any(c in REQUIRED_COLUMNS for c in missing):
        kind = "partial"
    elif missing == (LEGACY_17_MISSING,):
        kind = "v3_17"
    elif not missing:
        kind = "canonical"
    else:
        kind = "partial"
    return SchemaReport(
        kind=kind, columns=columns, missing_columns=missing, extra_columns=extra,
        missing_checks=missing_checks, missing_indexes=missing_indexes,
        missing_views=missing_views, has_rowid=has_rowid, group_id_unique=unique_gid,
        fingerprint=fingerprint,
    )


def _has_unique_index_on_group_id(conn: sqlite3.Connection) -> bool:
    for row in conn.execute(f"PRAGMA index_list({TABLE})").fetchall():
        if not row[2]:  # not unique
            continue
        cols = [r[2] for r in conn.execute(f"PRAGMA index_info({row[1]!r})").fetchall()]
        if cols == ["group_id"]:
            return True
    return False


# -- file names ---------------------------------------------------------------------------------


def project_name_from_db(path: Path) -> str:
    """``mojo3.db`` -> ``mojo3``; ``mojo3_temp.db`` -> ``mojo3``;
    ``mojo3.db.backup-20251024_101500`` -> ``mojo3``."""
    name = path.name
    if ".db" in name:
        name = name[: name.index(".db")]
    if name.endswith("_temp"):
        name = name[: -len("_temp")]
    return name


def is_live_db_name(name: str) -> bool:
    """True for a live project DB in the decisions folder; False for temp, backup and SQLite's
    own side files, which are ignored for live processing (still valid when named explicitly)."""
    lowered = name.lower()
    return (
        lowered.endswith(".db")
        and not lowered.endswith("_temp.db")
        and "backup" not in lowered
        and not lowered.startswith(".")
    )
