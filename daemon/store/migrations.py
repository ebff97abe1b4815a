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
    (
        "0002_daemon_index",
        """
        -- the image index: every image file seen under a project's image roots
        CREATE TABLE images (
            project    TEXT NOT NULL,
            path       TEXT NOT NULL,          -- absolute, as last seen
            file_name  TEXT NOT NULL,
            size       INTEGER,
            mtime_ns   INTEGER,
            sha256     TEXT,                   -- content hash, once read
            stage      REAL,
            seen_at    TEXT NOT NULL,
            gone_at    TEXT,                   -- the file disappeared (its embedding stays)
            PRIMARY KEY (project, path)
        );
        CREATE INDEX images_name ON images(project, file_name);
        CREATE INDEX images_sha ON images(sha256);
        -- .decision sidecars as last seen (never modified by trainingd)
        CREATE TABLE sidecars (
            path        TEXT PRIMARY KEY,
            project     TEXT NOT NULL,         -- the project whose image root holds it
            kind        TEXT,                  -- 'A', 'B', NULL when unparseable
            group_id    TEXT,
            project_id  TEXT,
            folder_role TEXT NOT NULL,
            size        INTEGER,
            mtime_ns    INTEGER,
            seen_at     TEXT NOT NULL,
            gone_at     TEXT
        );
        CREATE INDEX sidecars_group ON sidecars(group_id);
        """,
    ),
    (
        "0003_embeddings",
        """
        -- one line per vector in the content-addressed cache (the .npy file is the vector)
        CREATE TABLE embeddings (
            sha256      TEXT NOT NULL,         -- of the image file's bytes
            embedder_id TEXT NOT NULL,
            dim         INTEGER NOT NULL,
            width       INTEGER,
            height      INTEGER,
            created_at  TEXT NOT NULL,
            PRIMARY KEY (sha256, embedder_id)
        ) WITHOUT ROWID;
        -- what the embedding stage last learned of each image file it was given
        CREATE TABLE embed_files (
            project    TEXT NOT NULL,
            path       TEXT NOT NULL,          -- absolute, as last seen
            file_name  TEXT NOT NULL,
            size       INTEGER,
            mtime_ns   INTEGER,
            sha256     TEXT,                   -- NULL when the bytes could not be read
            status     TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
            code       TEXT,                   -- issue code when failed
            message    TEXT,
            width      INTEGER,
            height     INTEGER,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (project, path)
        );
        CREATE INDEX embed_files_name ON embed_files(project, file_name);
        CREATE INDEX embed_files_sha ON embed_files(sha256);
        """,
    ),
    (
        "0004_training",
        """
        -- labels a model kind has already been trained on: new labels = valid rows not in here
        CREATE TABLE training_marks (
            kind     TEXT NOT NULL,               -- 'ranker' or 'crop'
            project  TEXT NOT NULL,
            row_key  TEXT NOT NULL,
            PRIMARY KEY (kind, project, row_key)
        ) WITHOUT ROWID;
        -- one line per training attempt (history for the summary and the retrain policy)
        CREATE TABLE training_runs (
            id           INTEGER PRIMARY KEY,
            kind         TEXT NOT NULL,
            started_at   TEXT NOT NULL,
            finished_at  TEXT,
            status       TEXT NOT NULL,           -- running, promoted, not_promoted, failed, ...
            version      INTEGER,
            promoted     INTEGER NOT NULL DEFAULT 0,
            reason       TEXT NOT NULL DEFAULT '',
            new_labels   INTEGER NOT NULL DEFAULT 0,
            metrics      TEXT NOT NULL DEFAULT '{}'  -- JSON: the model's and baselines' figures
        );
        CREATE INDEX training_runs_kind ON training_runs(kind, started_at);
        -- the audit hook's token use per UTC day
        CREATE TABLE token_ledger (
            day      TEXT PRIMARY KEY,            -- YYYY-MM-DD (UTC)
            tokens   INTEGER NOT NULL DEFAULT 0,
            calls    INTEGER NOT NULL DEFAULT 0,
            warned   INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        "0005_images_merge_embed_files",
        """
        -- one table per image file: the image index and what the embedding stage learned of the
        -- same (project, path) were two tables that overlapped (size, mtime, content hash).
        -- size, mtime_ns, sha256 now describe one observation of the bytes; embed_status says
        -- what the stage made of exactly those bytes (NULL: not processed since they changed).
        ALTER TABLE images ADD COLUMN embed_status TEXT
            CHECK (embed_status IS NULL OR embed_status IN ('ok', 'failed'));
        ALTER TABLE images ADD COLUMN embed_code TEXT;        -- issue code when failed
        ALTER TABLE images ADD COLUMN embed_message TEXT;
        ALTER TABLE images ADD COLUMN width INTEGER;
        ALTER TABLE images ADD COLUMN height INTEGER;
        ALTER TABLE images ADD COLUMN embedded_at TEXT;       -- embed_files.updated_at
        -- a file both rooms knew: the stage's observation wins (it read and hashed the bytes;
        -- a deleted file keeps the hash training needs).  If the file changed since, the next
        -- index observation sees another size/mtime and clears the stage's verdict.
        UPDATE images SET (size, mtime_ns, sha256, embed_status, embed_code, embed_message,
                           width, height, embedded_at) = (
            SELECT f.size, f.mtime_ns,
                   CASE WHEN f.size IS images.size AND f.mtime_ns IS images.mtime_ns
                        THEN coalesce(f.sha256, images.sha256) ELSE f.sha256 END,
                   f.status, f.code, f.message, f.width, f.height, f.updated_at
            FROM embed_files f WHERE f.project = images.project AND f.path = images.path)
        WHERE EXISTS (SELECT 1 FROM embed_files f
                      WHERE f.project = images.project AND f.path = images.path);
        -- a file only the stage knew: kept, not counted as on disk (gone_at set) until the
        -- index sees it there
        INSERT INTO images (project, path, file_name, size, mtime_ns, sha256, stage, seen_at,
                            gone_at, embed_status, embed_code, embed_message, width, height,
                            embedded_at)
            SELECT f.project, f.path, f.file_name, f.size, f.mtime_ns, f.sha256,
                   CASE WHEN instr(f.file_name, 'stage1.5_face_swapped') THEN 1.5
                        WHEN instr(f.file_name, 'stage1_generated') THEN 1.0
                        WHEN instr(f.file_name, 'stage2_upscaled') THEN 2.0
                        WHEN instr(f.file_name, 'stage3_enhanced') THEN 3.0 END,
                   f.updated_at, f.updated_at, f.status, f.code, f.message, f.width, f.height,
                   f.updated_at
            FROM embed_files f
            WHERE NOT EXISTS (SELECT 1 FROM images i
                              WHERE i.project = f.project AND i.path = f.path);
        DROP TABLE embed_files;
        CREATE INDEX images_embedded ON images(project, file_name) WHERE embed_status = 'ok';
        """,
    ),
)
