"""One prediction pass over a project's images: group, embed what lacks a vector, predict,
write.  Idempotent and resumable.

Which images: by default the images waiting for review (outside the reviewer's output folders),
grouped per folder, as the reviewer groups the folder it opens; ``bulk`` takes every image of
the project, all folders together (the upstream's whole-project run).  A group is predicted
again only when its content (the images' SHA-256s) or a champion version changed, and never
once it was reviewed (its live-accuracy record would lose its meaning).  Batches of groups are
committed one at a time, so a killed bulk run resumes where it stopped: a vector already in the
cache costs no model call, a group already predicted costs one indexed lookup.

Bad input never escapes: an image with no vector (failed, unreadable, vanished) leaves its
group predicted over the rest plus an issue record ``prediction_image_missing``; a group with no
vector at all is not written and gets the same issue.  No champion: nothing is written and the
result says why.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.codes import CODES
from daemon.embedding.ledger import META_EMBEDDER
from daemon.files import DELETE_STAGING_FOLDERS
from daemon.predict.grouping import group_sorted, sort_key, timestamp_text
from daemon.predict.live import record_live_reviews
from daemon.predict.store import Prediction, PredictionStore, predictions_db
from daemon.records import ImageCandidate, Issue
from daemon.settings import Settings
from daemon.store.images import ImageFacts
from daemon.timeparse import iso_utc

if TYPE_CHECKING:
    from daemon.embedding.cache import VectorCache
    from daemon.embedding.stage import EmbeddingStage
    from daemon.embedding.vector_reader import VectorBlock
    from daemon.predict.scoring import Champions, Rows
    from daemon.store.db import StateStore

log = structlog.get_logger("predict")

#: where the reviewer moves images it has decided on (data contract section 2), old and new
REVIEWED_FOLDERS = frozenset({"__selected", "__crop", "__crop_auto", "__cropped", "selected",
                              "crop", "crop_auto", "crop_cropped", *DELETE_STAGING_FOLDERS})
ISSUE_KEY = "#predict:"
MISSING_CODE = "prediction_image_missing"
BATCH_GROUPS = 2048


@dataclass
class PredictResult:
    """What one pass did for one project.  ``status``: predicted, no_champion, no_groups."""

    project: str
    status: str
    reason: str = ""
    groups: int = 0
    predicted: int = 0
    unchanged: int = 0
    reviewed_kept: int = 0
    partial: int = 0
    unpredictable: int = 0
    embedded: int = 0
    ranker_version: int | None = None
    crop_version: int | None = None
    db: str = ""
    live: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reviewed_folder(folder: str) -> bool:
    return any(part in REVIEWED_FOLDERS for part in folder.split(os.sep))


def find_groups(images: Sequence[ImageFacts], *, bulk: bool) -> list[list[ImageFacts]]:
    """Groups by the upstream rule: per folder (new images), or the whole project (bulk).
    One pass over the file list: each folder is judged once, each name keyed once."""
    folders: dict[str, list[ImageFacts]] = {}
    reviewed: dict[str, bool] = {}
    for img in images:
        folder = os.path.dirname(img.path)
        if not bulk:
            seen = reviewed.get(folder)
            if seen is None:
                seen = reviewed[folder] = _reviewed_folder(folder)
            if seen:
                continue
        folders.setdefault("" if bulk else folder, []).append(img)
    out: list[list[ImageFacts]] = []
    for key in sorted(folders):
        rows = sorted(folders[key], key=lambda r: (*sort_key(r.file_name), r.path))
        out.extend(group_sorted(rows, _name))
    return out


def _name(row: ImageFacts) -> str:
    return row.file_name


def group_id_of(project: str, paths: Sequence[str]) -> str:
    """``<project>_group_<first timestamp>_<paths digest>``: the upstream's Phase 1A shape
    (``<project>_group_<timestamp>_<n>``) with a digest of the images' paths in place of a
    running number, so a group keeps its id however many other groups appear, and the same
    names in two folders are two groups."""
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:12]
    return f"{project}_group_{timestamp_text(os.path.basename(paths[0])) or 'notime'}_{digest}"


def content_key(group: Sequence[ImageFacts]) -> str:
    text = "\n".join(f"{r.file_name}\0{r.sha256 or '-'}" for r in group)
    return hashlib.sha256(text.encode()).hexdigest()


def predict_project(settings: Settings, store: StateStore, project: str, now: datetime, *,
                    bulk: bool = False,
                    stage: Callable[[], EmbeddingStage | None] = lambda: None,
                    progress: Callable[[int, int], None] | None = None,
                    beat: Callable[[str], None] = lambda _: None,
                    batch_groups: int = BATCH_GROUPS) -> PredictResult:
    """Predict the project's unreviewed groups with the champions (see the module doc)."""
    from daemon.embedding.cache import VectorCache
    from daemon.predict.scoring import NoChampion, load_champions
    from daemon.training import registry

    db = predictions_db(settings.data_root, project)
    result = PredictResult(project, "predicted", db=str(db))
    version = registry.champion_version(settings.models_dir, "ranker")
    meta = registry.read_metadata(settings.models_dir, "ranker", version) if version else None
    try:
        # the vectors' embedder: the one that wrote last, else the one the stage would use
        embedder_id = store.get_meta(META_EMBEDDER) if meta is not None else None
        if meta is not None and embedder_id is None:
            emb = stage()
            embedder_id = emb.embedder.embedder_id if emb is not None else None
        embedder_id = embedder_id or str((meta or {}).get("embedder_id") or "")
        champs = load_champions(settings.models_dir, embedder_id, settings.training.device)
    except NoChampion as exc:
        result.status, result.reason = "no_champion", str(exc)
        log.info("predict.no_champion", project=project, reason=str(exc))
        return _live(settings, project, db, now, result)
    result.ranker_version, result.crop_version = champs.ranker_version, champs.crop_version
    groups = find_groups(store.images.facts(project), bulk=bulk)
    result.groups = len(groups)
    if not groups:
        result.status, result.reason = "no_groups", "no image group waiting for review"
        return _live(settings, project, db, now, result)
    cache = VectorCache(settings.cache_dir, embedder_id)
    with PredictionStore(db) as pstore:
        done = 0
        for start in range(0, len(groups), batch_groups):
            batch = groups[start:start + batch_groups]
            beat(f"predicting {project}: groups {start}-{start + len(batch)}")
            _predict_batch(store, pstore, project, batch, cache, champs, now, stage, result)
            done += len(batch)
            if progress is not None:
                progress(done, len(groups))
        beat(f"live accuracy of {project}")
        result.live = record_live_reviews(pstore, settings.project_db(project), now)
    log.info("predict.project_predicted", **{k: v for k, v in result.to_dict().items()
                                              if k != "live"})
    return result


def _live(settings: Settings, project: str, db: Path, now: datetime, result: PredictResult
          ) -> PredictResult:
    """The live-accuracy pass alone (no prediction this time): reviews of earlier ones."""
    if db.is_file():
        with PredictionStore(db) as pstore:
            result.live = record_live_reviews(pstore, settings.project_db(project), now)
    return result


def _embed(store: StateStore, project: str, batch: list[list[ImageFacts]],
           lacking: list[ImageFacts], embedder_id: str,
           stage: Callable[[], EmbeddingStage | None], result: PredictResult
           ) -> list[list[ImageFacts]]:
    """Embed ``lacking`` through the embedding stage (batched, cached by content); the batch
    again with what the stage learned.  Unchanged when no stage of this embedder is at hand."""
    if not lacking:
        return batch
    emb = stage()
    if emb is None or emb.embedder.embedder_id != embedder_id:
        return batch
    ran = emb.run([ImageCandidate(project, r.file_name, Path(r.path), 0) for r in lacking])
    result.embedded += ran.embedded
    fresh = {r.path: r for r in store.images.facts(project, [r.path for r in lacking])}
    return [[fresh.get(r.path, r) for r in g] for g in batch]


def _predict_batch(store: StateStore, pstore: PredictionStore, project: str,
                   batch: list[list[ImageFacts]], cache: VectorCache, champs: Champions,
                   now: datetime, stage: Callable[[], EmbeddingStage | None],
                   result: PredictResult) -> None:
    from daemon.embedding.vector_reader import load_block
    from daemon.predict.scoring import score_rows

    # images never read yet have no content hash: embed them first (that hashes them)
    batch = _embed(store, project, batch, [r for g in batch for r in g if r.sha256 is None],
                   cache.embedder_id, stage, result)
    ids = [group_id_of(project, [r.path for r in g]) for g in batch]
    stored = pstore.stored(ids)
    todo: list[tuple[str, list[ImageFacts], str]] = []
    versions = (champs.ranker_version, champs.crop_version)
    for gid, g in zip(ids, batch, strict=True):
        key, old = content_key(g), stored.get(gid)
        if old is not None and old.reviewed:
            result.reviewed_kept += 1
        elif old is not None and (old.content_key, old.ranker_version, old.crop_version) == (
                key, *versions):
            result.unchanged += 1
        else:
            todo.append((gid, g, key))
    if not todo:
        return
    vectors = load_block(cache, champs.dim, (r.sha256 for _, g, _ in todo for r in g
                                             if r.sha256))
    lacking = [r for _, g, _ in todo for r in g
               if r.sha256 not in vectors.index and r.sha256 not in vectors.damaged]
    if lacking:  # hashed but without a vector of this embedder (e.g. the embedder changed)
        fixed = _embed(store, project, [g for _, g, _ in todo], lacking, cache.embedder_id,
                       stage, result)
        todo = [(gid, g, key) for (gid, _, key), g in zip(todo, fixed, strict=True)]
        vectors = load_block(cache, champs.dim, (r.sha256 for _, g, _ in todo for r in g
                                                 if r.sha256))
    rows, missing = _rows(todo, vectors)
    scores = score_rows(champs, rows, len(todo))
    stamp = iso_utc(now)
    preds, issues, keys = [], [], []
    boxes = scores.box.tolist()
    for k, ((gid, g, key), gone, pick, conf) in enumerate(zip(
            todo, missing, scores.index.tolist(), scores.confidence.tolist(), strict=True)):
        keys.append(ISSUE_KEY + gid)
        if gone:
            issues.append((ISSUE_KEY + gid, _issue(project, gid, g, gone, pick < 0,
                                                   vectors.damaged)))
        if pick < 0:
            result.unpredictable += 1
            continue
        result.partial += bool(gone)
        box = boxes[k]
        preds.append(Prediction(gid, project, tuple(r.file_name for r in g), pick,
                                None if box[0] != box[0] else  # NaN: no box
                                (round(box[0], 6), round(box[1], 6), round(box[2], 6),
                                 round(box[3], 6)),
                                round(conf, 6), key, champs.ranker_version,
                                champs.crop_version, champs.embedder_id, stamp, gone))
    pstore.write(preds)
    result.predicted += len(preds)
    with store.transaction():
        store.replace_issues(project, keys, issues, now)


def _rows(todo: list[tuple[str, list[ImageFacts], str]], vectors: VectorBlock
          ) -> tuple[Rows, list[tuple[str, ...]]]:
    """The batch's images that have a vector, as the scorer's arrays (one Python pass over the
    images), and per group the names of those that have none."""
    import numpy as np

    from daemon.predict.scoring import Rows

    at, group, position, rank, width, height, stages = [], [], [], [], [], [], []
    missing: list[tuple[str, ...]] = []
    index = vectors.index
    for k, (_gid, g, _key) in enumerate(todo):
        top = len(g) - 1
        gone: list[str] = []
        for i, r in enumerate(g):
            row = index.get(r.sha256) if r.sha256 else None
            if row is None:
                gone.append(r.file_name)
                continue
            at.append(row)
            group.append(k)
            position.append(i)
            rank.append(i - top)
            width.append(r.width or 0)
            height.append(r.height or 0)
            stages.append(r.stage or 0.0)
        missing.append(tuple(gone))
    return Rows(vectors.rows[np.asarray(at, dtype=np.int64)], np.asarray(group, dtype=np.int64),
                np.asarray(position, dtype=np.int64), np.asarray(rank, dtype=np.float32),
                np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64),
                np.asarray(stages, dtype=np.float64)), missing


def _issue(project: str, gid: str, group: list[ImageFacts], missing: tuple[str, ...],
           nothing: bool, damaged: dict[str, str]) -> Issue:
    codes = sorted({r.embed_code for r in group if r.file_name in missing and r.embed_code})
    bad = sorted({damaged[r.sha256] for r in group
                  if r.file_name in missing and r.sha256 in damaged})
    found = ([f"embedding: {', '.join(codes)}"] if codes else []) + bad
    why = f" ({'; '.join(found)})" if found else " (not embedded yet)"
    what = ("no image of the group has a vector: nothing was predicted" if nothing
            else "the prediction covers the other images only")
    fix = ("Repair the cache (`trainingd embed --verify`) or fix the image" if bad
           else "Fix or restore the file")
    path = next(r.path for r in group if r.file_name in missing)
    return Issue(code=MISSING_CODE, severity=CODES[MISSING_CODE].severity, project=project,
                 db_file=path, group_id=gid, rowid=None, field="images",
                 value_repr=repr(list(missing)),
                 message=f"{len(missing)} of {len(group)} images have no vector{why}; {what}. "
                         f"{fix}; the group is predicted again when its bytes change or a new "
                         "champion is promoted.")


@dataclass(frozen=True)
class PredictRan:
    """The ``predict`` task's result: one :class:`PredictResult` per project."""

    projects: tuple[PredictResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"projects": [p.to_dict() for p in self.projects]}


def predict_task(settings: Settings, store: StateStore, project: str | None, now: datetime, *,
                 bulk: bool = False, stage: Callable[[], EmbeddingStage | None] = lambda: None,
                 beat: Callable[[str], None] = lambda _: None,
                 should_stop: Callable[[], bool] = lambda: False) -> PredictRan:
    """Every project with image roots (or ``project``): predict, then the live pass."""
    names = [project] if project is not None else sorted(
        n for n, cfg in settings.projects.items() if cfg.image_roots)
    out = []
    for name in names:
        if should_stop():
            break
        out.append(predict_project(settings, store, name, now, bulk=bulk, stage=stage,
                                   beat=beat))
    return PredictRan(tuple(out))
