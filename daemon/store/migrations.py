"""Named migrations of the state DB, applied in order, each in its own transaction.

Append only: a migration that has shipped is never edited (its name is recorded in
``schema_migrations``); change the schema with a new one.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_validation_state",
        """
        -- one line per project: the incremental-validation checkpoint
        CREATE TABLE projects (
            project          TEXT PRIMARY KEY,
            db_path          TEXT NOT NULL,
            db_inode         INTEGER,
            schema_kind      TEXT NOT NULL,
            schema_fingerprint TEXT NOT NULL,
            rules_version    INTEGER NOT NULL,
            max_rowid        INTEGER NOT NULL DEFAULT 0,
            row_count        INTEGER NOT NULL DEFAULT 0,
            probes           TEXT NOT NULL DEFAULT '[]',   -- JSON [[rowid, group_id], ...]
            last_checked_at  TEXT,
            last_full_at     TEXT,
            needs_full       INTEGER NOT NULL DEFAULT 0
        );
        -- one line per source row: its digest decides whether it must be checked again
        CREATE TABLE row_state (
            project      TEXT NOT NULL,
            row_key      TEXT NOT NULL,        -- group_id, or '#rowid:N' when it has none
            group_id     TEXT,
            src_rowid    INTEGER NOT NULL,
            digest       INTEGER NOT NULL,
            errors       INTEGER NOT NULL,
            warnings     INTEGER NOT NULL,
            user_action  TEXT,
            pending_crop INTEGER NOT NULL,
            checked_at   TEXT NOT NULL,
            PRIMARY KEY (project, row_key)
        ) WITHOUT ROWID;
        CREATE INDEX row_state_group_id ON row_state(group_id);
        CREATE INDEX row_state_pending ON row_state(project) WHERE pending_crop = 1;
        -- every current finding; replaced whenever its row (or schema) is checked again
        CREATE TABLE issues (
            id         INTEGER PRIMARY KEY,
            project    TEXT NOT NULL,
            row_key    TEXT NOT NULL,          -- '#schema' for findings about the DB itself
            db_file    TEXT NOT NULL,
            group_id   TEXT,
            src_rowid  INTEGER,
            code       TEXT NOT NULL,
            severity   TEXT NOT NULL CHECK (severity IN ('error', 'warning')),
            field      TEXT,
            value_repr TEXT NOT NULL,
            message    TEXT NOT NULL,
            seen_at    TEXT NOT NULL
        );
        CREATE INDEX issues_row ON issues(project, row_key);
        CREATE INDEX issues_code ON issues(code);
        -- durable counters and small facts that must survive restarts
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
)
