"""trainingd's own predictions DB: ``<data_root>/ai_data/predictions/<project>.db``.

The Phase 1A shape of the upstream's ``batch_add_ai_predictions.py`` (``ai_decisions`` with
``group_id TEXT PRIMARY KEY, project_id TEXT NOT NULL, images TEXT NOT NULL,
ai_selected_index INTEGER, ai_crop_coords TEXT, ai_confidence REAL``; JSON written with
``json.dumps``) plus our columns: the group's content key (the images' SHA-256s), the ranker
and crop versions, the embedder, when it was predicted and which images had no vector.  Beside
it, ``live_reviews`` (what the reviewer decided for a predicted group) and ``live_cursor`` (how
far each decision DB has been read).

It must never be a live decision DB: the path is derived from trainingd's data root only.
WAL, one short transaction per batch; the file honours the umask (SQLite creates it with the
process umask, which ``fsutil`` also honours).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.store.chunks import in_chunks

_DDL = """
CREATE TABLE IF NOT EXISTS ai_decisions (
    group_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    images TEXT NOT NULL,
    ai_selected_index INTEGER,
    ai_crop_coords TEXT,
    ai_confidence REAL,
    content_key TEXT NOT NULL,
    names_key TEXT NOT NULL,
    ranker_version INTEGER NOT NULL,
    crop_version INTEGER,
    embedder_id TEXT NOT NULL,
    predicted_at TEXT NOT NULL,
    missing_images TEXT
);
CREATE INDEX IF NOT EXISTS idx_predictions_names ON ai_decisions(names_key);
CREATE TABLE IF NOT EXISTS live_reviews (
    group_id TEXT PRIMARY KEY REFERENCES ai_decisions(group_id),
    decision_db TEXT NOT NULL,
    decision_group_id TEXT NOT NULL,
    ranker_version INTEGER NOT NULL,
    crop_version INTEGER,
    ai_selected_index INTEGER,
    user_selected_index INTEGER NOT NULL,
    user_action TEXT NOT NULL,
    pick_match INTEGER NOT NULL,
    rule_match INTEGER NOT NULL,
    crop_iou REAL,
    crop_pending INTEGER NOT NULL,
    predicted_at TEXT NOT NULL,
    reviewed_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS live_cursor (
    decision_db TEXT PRIMARY KEY,
    last_rowid INTEGER NOT NULL
);
"""


def predictions_dir(data_root: Path) -> Path:
    return data_root / "ai_data" / "predictions"


def predictions_db(data_root: Path, project: str) -> Path:
    return predictions_dir(data_root) / f"{project}.db"


def names_key(names: Sequence[str]) -> str:
    """The key a decision row's ``images`` is matched on: the file names, in group order."""
    return "\n".join(names)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One group's prediction, as written."""

    group_id: str
    project_id: str
    images: tuple[str, ...]
    ai_selected_index: int
    ai_crop_coords: tuple[float, float, float, float] | None
    ai_confidence: float
    content_key: str
    ranker_version: int
    crop_version: int | None
    embedder_id: str
    predicted_at: str
    missing_images: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Stored:
    """What is stored for a group: enough to decide whether to predict it again."""

    content_key: str
    ranker_version: int
    crop_version: int | None
    reviewed: bool


@dataclass(frozen=True, slots=True)
class Review:
    """A reviewer's decision on a group predicted before it (one row of ``live_reviews``)."""

    group_id: str
    decision_db: str
    decision_group_id: str
    ranker_version: int
    crop_version: int | None
    ai_selected_index: int | None
    user_selected_index: int
    user_action: str
    pick_match: bool
    rule_match: bool
    crop_iou: float | None
    crop_pending: bool
    predicted_at: str
    reviewed_at: str
    recorded_at: str


class PredictionStore:
    """The predictions DB of one project (opened, created if missing, closed by the caller)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_DDL)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored(self, group_ids: Iterable[str]) -> dict[str, Stored]:
        out: dict[str, Stored] = {}
        for part, marks in in_chunks(list(group_ids)):
            for gid, key, rv, cv, reviewed in self.conn.execute(
                "SELECT p.group_id, p.content_key, p.ranker_version, p.crop_version, "
                "r.group_id IS NOT NULL FROM ai_decisions p LEFT JOIN live_reviews r "
                f"ON r.group_id = p.group_id WHERE p.group_id IN ({marks})", part):
                out[gid] = Stored(key, rv, cv, bool(reviewed))
        return out

    def write(self, predictions: Sequence[Prediction]) -> None:
        """One transaction: a batch is all there or not at all (a rerun resumes after it)."""
        rows = [(p.group_id, p.project_id, json.dumps(list(p.images)), p.ai_selected_index,
                 json.dumps(list(p.ai_crop_coords)) if p.ai_crop_coords is not None else None,
                 p.ai_confidence, p.content_key, names_key(p.images), p.ranker_version,
                 p.crop_version, p.embedder_id, p.predicted_at,
                 json.dumps(list(p.missing_images)) if p.missing_images else None)
                for p in predictions]
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT OR REPLACE INTO ai_decisions (group_id, project_id, images, "
                "ai_selected_index, ai_crop_coords, ai_confidence, content_key, names_key, "
                "ranker_version, crop_version, embedder_id, predicted_at, missing_images) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def by_names(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``names_key -> prediction row`` for the given keys."""
        out: dict[str, dict[str, Any]] = {}
        cols = ("group_id", "images", "ai_selected_index", "ai_crop_coords", "ranker_version",
                "crop_version", "predicted_at", "names_key")
        for part, marks in in_chunks(list(dict.fromkeys(keys))):
            for r in self.conn.execute(
                    f"SELECT {', '.join(cols)} FROM ai_decisions WHERE names_key IN ({marks})",
                    part):
                out[r[-1]] = dict(zip(cols, r, strict=True))
        return out

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM ai_decisions").fetchone()[0])

    # -- live accuracy ----------------------------------------------------------------------------

    def cursor(self, decision_db: str) -> int:
        r = self.conn.execute("SELECT last_rowid FROM live_cursor WHERE decision_db = ?",
                              (decision_db,)).fetchone()
        return 0 if r is None else int(r[0])

    def record_reviews(self, reviews: Sequence[Review], decision_db: str,
                       last_rowid: int | None) -> None:
        """The reviews and the cursor in one transaction: a crash replays the chunk, and
        replaying it writes the same rows again (keyed by our group id)."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT OR REPLACE INTO live_reviews VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.group_id, r.decision_db, r.decision_group_id, r.ranker_version,
                  r.crop_version, r.ai_selected_index, r.user_selected_index, r.user_action,
                  int(r.pick_match), int(r.rule_match), r.crop_iou, int(r.crop_pending),
                  r.predicted_at, r.reviewed_at, r.recorded_at) for r in reviews])
            if last_rowid is not None:
                self.conn.execute(
                    "INSERT INTO live_cursor VALUES (?, ?) ON CONFLICT (decision_db) DO UPDATE "
                    "SET last_rowid = excluded.last_rowid",
                    (decision_db, last_rowid))

    def pending_crops(self, decision_db: str) -> list[str]:
        """Decision group ids of reviews whose final crop has not arrived yet."""
        return [r[0] for r in self.conn.execute(
            "SELECT decision_group_id FROM live_reviews WHERE decision_db = ? AND crop_pending",
            (decision_db,))]

    def reviews(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM live_reviews ORDER BY reviewed_at")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]


# -- read-only questions from other rooms (the demo's conductor, the daily summary) -------------

def _read_only(db: Path, sql: str, params: tuple[Any, ...] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of one query on a predictions DB, read-only; nothing while the
    file, or the table, does not exist yet.  Busy or damaged: raises :class:`sqlite3.Error`
    for the caller to report."""
    if not db.is_file():
        return [], []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        cur = conn.execute(sql, params)
        return [d[0] for d in cur.description], [tuple(r) for r in cur]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return [], []
        raise
    finally:
        conn.close()


def live_review_count(db: Path) -> int:
    """Reviews recorded for groups predicted before them."""
    rows = _read_only(db, "SELECT count(*) FROM live_reviews")[1]
    return int(rows[0][0]) if rows else 0


def predicted_name_keys(db: Path, ranker_version: int) -> set[str]:
    """The ``names_key`` of every group ranker ``ranker_version`` has predicted."""
    return {str(r[0]) for r in _read_only(
        db, "SELECT names_key FROM ai_decisions WHERE ranker_version = ?", (ranker_version,))[1]}


def live_review_rows(db: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The live-review table of the DB: its column names and its rows."""
    return _read_only(db, "SELECT * FROM live_reviews")
