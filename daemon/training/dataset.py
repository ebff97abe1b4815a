"""Training sets from validated rows and cached embeddings, and nothing else.

A row reaches a training set only when the state DB says it was validated without errors, is
not waiting for its crop, and still has the digest it was validated with (a row edited since is
left for the next validation).  Rows are read from the source DBs read-only; vectors come from a
:class:`daemon.records.VectorSource`.  Every row left out is counted under a reason, and those
counts go into the model's metadata.  No torch here: plain numpy arrays.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from daemon.decisions.checks import (
    AI_CONFIDENCE,
    AI_CROP,
    AI_INDEX,
    DIRECTORY,
    FINAL_CROP,
    GROUP_ID,
    HEIGHT,
    IMAGES,
    USER_INDEX,
    WIDTH,
    check_box,
    is_full_frame,
)
from daemon.decisions.reader import Row, SourceReader
from daemon.errors import SourceError
from daemon.images import parse_stage
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.similar.persist import saved_cells
from daemon.store.db import StateStore
from daemon.training.split import SplitSettings
from daemon.training.units import (
    SIDES,
    SPLIT_RULE,
    GroupImages,
    Side,
    Units,
    build_units,
    content_keys,
    group_key,
)

Kind = Literal["ranker", "crop"]
DIM_SCALE = 2048.0  # the reviewer feeds [width/2048, height/2048]
MAX_STAGE = 3.0
SIDE_CODE: dict[Side, int] = {s: i for i, s in enumerate(SIDES)}  # train 0, validation 1, test 2
TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass
class DatasetInfo:
    """What the metadata says about a dataset: sizes, exclusions, split, provenance."""

    kind: Kind
    embedder_id: str
    exclusions: Counter[str] = field(default_factory=Counter)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # project -> train/holdout
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    #: per project: usable rows seen and rows kept with every vector (the gate's coverage)
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)
    units: Units | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "embedder_id": self.embedder_id,
                "exclusions": dict(sorted(self.exclusions.items())), "sizes": self.sizes,
                "checkpoints": self.checkpoints, "split": self.split,
                "coverage": self.coverage,
                "units": None if self.units is None else self.units.summary().to_dict()}


@dataclass
class RankerData:
    """Whole groups: image ``j`` of group ``g`` is ``vectors[offsets[g] + j]``."""

    vectors: np.ndarray  # (images, dim) float32
    offsets: np.ndarray  # (groups + 1,) int64
    picks: np.ndarray  # (groups,) int64: index of the person's pick within its group
    stages: np.ndarray  # (images,) float32, NaN where unknown
    ai_picks: np.ndarray  # (groups,) int64, -1 where no AI ran
    holdout: np.ndarray  # (groups,) bool
    projects: list[str]
    group_ids: list[str]
    side: np.ndarray | None = None  # (groups,) int8: TRAIN, VALIDATION, TEST; None: holdout only

    @property
    def groups(self) -> int:
        return len(self.picks)

    @property
    def keys(self) -> list[str]:
        """``project/group_id`` of every group (what units and model files name)."""
        return [group_key(p, g) for p, g in zip(self.projects, self.group_ids, strict=True)]

    def on(self, side: int) -> np.ndarray:
        """The mask of groups on ``side`` (TRAIN, VALIDATION, TEST)."""
        return side_mask(self.side, self.holdout, side)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, mask: np.ndarray) -> RankerData:
        idx = np.flatnonzero(mask)
        sizes = self.sizes[idx]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = np.concatenate([np.arange(self.offsets[g], self.offsets[g + 1]) for g in idx]) \
            if len(idx) else np.zeros(0, dtype=np.int64)
        return RankerData(
            vectors=self.vectors[rows], offsets=offsets, picks=self.picks[idx],
            stages=self.stages[rows], ai_picks=self.ai_picks[idx], holdout=self.holdout[idx],
            projects=[self.projects[g] for g in idx], group_ids=[self.group_ids[g] for g in idx],
            side=None if self.side is None else self.side[idx],
        )


@dataclass
class CropData:
    """One crop per example: the picked image's vector, its size and stage, the final box."""

    vectors: np.ndarray  # (n, dim) float32
    dims: np.ndarray  # (n, 2) float32: width, height in pixels
    stages: np.ndarray  # (n,) float32, NaN where unknown
    boxes: np.ndarray  # (n, 4) float32 normalized x1, y1, x2, y2
    holdout: np.ndarray  # (n,) bool
    projects: list[str]
    group_ids: list[str]
    side: np.ndarray | None = None  # (n,) int8: TRAIN, VALIDATION, TEST; None: holdout only

    @property
    def size(self) -> int:
        return len(self.boxes)

    @property
    def keys(self) -> list[str]:
        return [group_key(p, g) for p, g in zip(self.projects, self.group_ids, strict=True)]

    def on(self, side: int) -> np.ndarray:
        """The mask of crops on ``side`` (TRAIN, VALIDATION, TEST)."""
        return side_mask(self.side, self.holdout, side)

    def subset(self, mask: np.ndarray) -> CropData:
        idx = np.flatnonzero(mask)
        return CropData(self.vectors[idx], self.dims[idx], self.stages[idx], self.boxes[idx],
                        self.holdout[idx], [self.projects[i] for i in idx],
                        [self.group_ids[i] for i in idx],
                        None if self.side is None else self.side[idx])


def is_backfilled(row: Row) -> bool:
    """Rows written by ``trainingd backfill``: a legacy group id and no source folder."""
    gid = row[GROUP_ID]
    return isinstance(gid, str) and "_legacy_" in gid and row[DIRECTORY] is None


def side_mask(sides: np.ndarray | None, holdout: np.ndarray, side: int) -> np.ndarray:
    """Examples on ``side``; without side codes (in-memory callers) the holdout is the test
    side, the rest is train, and the validation side is empty."""
    if sides is None:
        return holdout if side == TEST else (~holdout if side == TRAIN
                                             else np.zeros(len(holdout), dtype=bool))
    return np.asarray(sides == side)


def untrained_projects(settings: Settings) -> frozenset[str]:
    """Projects configured as validation-only (``train = false``)."""
    return frozenset(name for name, cfg in settings.projects.items() if not cfg.train)


def _candidates(store: StateStore, kind: Kind, info: DatasetInfo, *,
                skip: frozenset[str] = frozenset()) -> dict[str, list[tuple[str, int, int]]]:
    """``project -> [(row_key, src_rowid, digest)]`` of rows the state DB calls usable; the
    projects in ``skip`` (``projects.<name>.train = false``) are left out whole."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for project, key, rowid, digest, errors, pending, action in store.conn.execute(
        "SELECT project, row_key, src_rowid, digest, errors, pending_crop, user_action "
        "FROM row_state ORDER BY project, src_rowid"
    ):
        if project in skip:
            continue
        if kind == "crop" and action != "crop":
            continue  # not a crop label: nothing excluded
        if errors:
            info.exclusions["invalid_row"] += 1
        elif pending:
            info.exclusions["pending_crop"] += 1
        elif kind == "ranker" and action == "reject":
            info.exclusions["reject_action"] += 1
        else:
            out.setdefault(project, []).append((key, rowid, digest))
    return out


def _source_rows(settings: Settings, store: StateStore, project: str,
                 wanted: Sequence[tuple[str, int, int]], info: DatasetInfo) -> list[Row]:
    """The wanted rows as read now, minus rows changed or gone since validation."""
    from daemon.validation import row_digest  # the validator's own digest: one definition

    cp = store.checkpoint(project)
    path = Path(cp.db_path) if cp is not None else settings.project_db(project)
    if cp is not None:
        info.checkpoints[project] = {"max_rowid": cp.max_rowid, "row_count": cp.row_count,
                                     "last_checked_at": cp.last_checked_at}
    s = settings.sources
    try:
        with SourceReader(path, busy_timeout_ms=s.busy_timeout_ms,
                          busy_budget_seconds=s.busy_retry_seconds) as reader:
            rows = reader.rows_by_rowid([w[1] for w in wanted])
    except SourceError:
        info.exclusions["source_unreadable"] += len(wanted)
        return []
    by_rowid = {int(r[0]): r for r in rows}
    kept: list[Row] = []
    for _key, rowid, digest in wanted:
        row = by_rowid.get(rowid)
        if row is None:
            info.exclusions["row_gone"] += 1
        elif row_digest(row) != digest:
            info.exclusions["changed_since_validation"] += 1
        else:
            kept.append(row)
    return kept


def _stage(name: str) -> float:
    s = parse_stage(name)
    return float("nan") if s is None else s


def _new_info(settings: Settings, kind: Kind, vectors: VectorSource) -> DatasetInfo:
    t = settings.training
    return DatasetInfo(kind=kind, embedder_id=vectors.embedder_id,
                       split=split_settings(t).to_dict())


def split_settings(t: Any) -> SplitSettings:
    """What defines the sides: a champion trained under other values is flagged."""
    return SplitSettings(rule=SPLIT_RULE, unit="union of groups sharing content or "
                         "near-duplicates", seed=t.holdout_seed, test_fraction=t.holdout_fraction,
                         validation_fraction=t.validation_fraction,
                         holdout_projects=tuple(t.holdout_projects),
                         near_duplicate_cosine=t.near_duplicate_cosine)


def _coverage(info: DatasetInfo, project: str, kept: bool) -> None:
    c = info.coverage.setdefault(project, {"rows": 0, "embedded": 0})
    c["rows"] += 1
    c["embedded"] += int(kept)


def is_random_embedder(embedder_id: str) -> bool:
    """Random-init embedders say so in their id (``...:random-init-seed0:...``)."""
    return "random" in embedder_id.lower()


#: a threshold no cosine reaches: the near-duplicate search is skipped
NO_NEAR_DUPLICATES = 2.0


def assign_sides(settings: Settings, info: DatasetInfo, groups: list[GroupImages],
                 keys: list[str]) -> np.ndarray:
    """Build the units over every loaded group and return each example's side code."""
    t = settings.training
    cosine = t.near_duplicate_cosine
    if is_random_embedder(info.embedder_id):
        # a random-init network maps different pictures to nearly the same vector, so
        # "near-duplicate" would join every group into one unit: only content hashes, file
        # names and identical vectors join groups then (the run is named random anyway)
        cosine = NO_NEAR_DUPLICATES
        import structlog

        structlog.get_logger("training").info(
            "training.near_duplicates_skipped", embedder_id=info.embedder_id,
            reason="random-init embedder: its vectors say nothing about the pictures")
    units = build_units(groups, cosine=cosine, seed=t.holdout_seed,
                        test_fraction=t.holdout_fraction,
                        validation_fraction=t.validation_fraction,
                        holdout_projects=t.holdout_projects,
                        cells=saved_cells(settings.cache_dir, info.embedder_id)
                        if cosine <= 1.0 else None)
    info.units = units
    codes = np.asarray([SIDE_CODE[units.side_of_group(k)] for k in keys], dtype=np.int8)
    for k, c in zip(keys, codes, strict=True):
        project = k.split("/", 1)[0]
        side = info.sizes.setdefault(project, {"train": 0, "validation": 0, "holdout": 0})
        side[("train", "validation", "holdout")[int(c)]] += 1
    return codes


def _shas(store: StateStore, project: str, names: Sequence[str]) -> dict[str, str]:
    from daemon.embedding.ledger import Ledger  # content hashes: the embedding room's ledger

    try:
        return Ledger(store).shas_for(project, names) if names else {}
    except sqlite3.Error as exc:  # an old state DB: fall back to file names and vectors
        log_missing_ledger(project, exc)
        return {}


def log_missing_ledger(project: str, exc: Exception) -> None:
    import structlog

    structlog.get_logger("training").warning("training.content_hashes_unavailable",
                                             project=project, error=repr(exc))


def load_ranker_data(settings: Settings, store: StateStore, vectors: VectorSource
                     ) -> tuple[RankerData, DatasetInfo]:
    """Every usable group, with all its images' vectors, on its unit's side."""
    info = _new_info(settings, "ranker", vectors)
    vecs: list[np.ndarray] = []
    stages: list[float] = []
    offsets, picks, ai_picks = [0], [], []
    projects: list[str] = []
    gids: list[str] = []
    unit_groups: list[GroupImages] = []
    dim: int | None = None
    for project, wanted in _candidates(store, "ranker", info,
                                         skip=untrained_projects(settings)).items():
        rows = _source_rows(settings, store, project, wanted, info)
        parsed = [(r, json.loads(r[IMAGES])) for r in rows]
        names = sorted({n for _, imgs in parsed for n in imgs})
        found = vectors.vectors_for(project, names) if names else {}
        shas = _shas(store, project, names)
        for row, imgs in parsed:
            if len(imgs) < 2:
                info.exclusions["single_image"] += 1
                continue
            if any(n not in found for n in imgs):
                info.exclusions["missing_embedding"] += 1
                _coverage(info, project, False)
                continue
            _coverage(info, project, True)
            group = [np.asarray(found[n], dtype=np.float32).reshape(-1) for n in imgs]
            dim = dim if dim is not None else group[0].shape[0]
            if any(v.shape[0] != dim for v in group):
                info.exclusions["embedding_dim_mismatch"] += 1
                continue
            gid = str(row[GROUP_ID])
            vecs.extend(group)
            stages.extend(_stage(n) for n in imgs)
            offsets.append(offsets[-1] + len(imgs))
            picks.append(int(row[USER_INDEX]))
            ai_picks.append(recorded_ai_pick(row, len(imgs)))
            projects.append(project)
            gids.append(gid)
            unit_groups.append(GroupImages(group_key(project, gid),
                                           content_keys(project, imgs, shas, found),
                                           np.stack(group)))
    keys = [group_key(p, g) for p, g in zip(projects, gids, strict=True)]
    side = assign_sides(settings, info, unit_groups, keys)
    data = RankerData(
        vectors=np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32),
        offsets=np.asarray(offsets, dtype=np.int64), picks=np.asarray(picks, dtype=np.int64),
        stages=np.asarray(stages, dtype=np.float32), ai_picks=np.asarray(ai_picks, np.int64),
        holdout=side == TEST, projects=projects, group_ids=gids, side=side)
    return data, info


def recorded_ai_pick(row: Row, count: int) -> int:
    """The AI's pick, or -1 where no AI ran: NULL, out of range, or the fake index 0 that live
    rows with no model wrote (data contract: index 0 with no confidence and no AI crop)."""
    ai = row[AI_INDEX]
    if not (isinstance(ai, int) and not isinstance(ai, bool) and 0 <= ai < count):
        return -1
    if ai == 0 and row[AI_CONFIDENCE] is None and row[AI_CROP] is None:
        return -1
    return int(ai)


def load_crop_data(settings: Settings, store: StateStore, vectors: VectorSource
                   ) -> tuple[CropData, DatasetInfo]:
    """Every finished crop with a real (not full-frame) final box, on its unit's side."""
    tol = settings.validation.full_frame_tolerance
    info = _new_info(settings, "crop", vectors)
    vecs: list[np.ndarray] = []
    dims: list[tuple[float, float]] = []
    stages: list[float] = []
    boxes: list[tuple[float, float, float, float]] = []
    projects: list[str] = []
    gids: list[str] = []
    unit_groups: list[GroupImages] = []
    dim: int | None = None
    for project, wanted in _candidates(store, "crop", info,
                                         skip=untrained_projects(settings)).items():
        rows = _source_rows(settings, store, project, wanted, info)
        picked: list[tuple[Row, list[str], str, tuple[float, float, float, float]]] = []
        for row in rows:
            _, box = check_box("final_crop_coords", row[FINAL_CROP])
            if box is None:
                info.exclusions["invalid_box"] += 1
            elif is_full_frame(box, tol):
                info.exclusions["placeholder_crop"] += 1
            else:
                imgs = json.loads(row[IMAGES])
                picked.append((row, imgs, imgs[int(row[USER_INDEX])], box))
        found = vectors.vectors_for(project, sorted({p[2] for p in picked})) if picked else {}
        shas = _shas(store, project, sorted({n for p in picked for n in p[1]}))
        for row, imgs, name, box in picked:
            if name not in found:
                info.exclusions["missing_embedding"] += 1
                _coverage(info, project, False)
                continue
            _coverage(info, project, True)
            v = np.asarray(found[name], dtype=np.float32).reshape(-1)
            dim = dim if dim is not None else v.shape[0]
            if v.shape[0] != dim:
                info.exclusions["embedding_dim_mismatch"] += 1
                continue
            gid = str(row[GROUP_ID])
            vecs.append(v)
            dims.append((float(row[WIDTH]), float(row[HEIGHT])))
            stages.append(_stage(name))
            boxes.append(box)
            projects.append(project)
            gids.append(gid)
            unit_groups.append(GroupImages(group_key(project, gid),
                                           content_keys(project, imgs, shas, {name: v}),
                                           v.reshape(1, -1)))
    keys = [group_key(p, g) for p, g in zip(projects, gids, strict=True)]
    side = assign_sides(settings, info, unit_groups, keys)
    data = CropData(
        vectors=np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32),
        dims=np.asarray(dims, dtype=np.float32).reshape(-1, 2),
        stages=np.asarray(stages, dtype=np.float32),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        holdout=side == TEST, projects=projects, group_ids=gids, side=side)
    return data, info
