"""Training sets from validated rows and cached embeddings, and nothing else.

A row reaches a training set only when the state DB says it was validated without errors, is
not waiting for its crop, and still has the digest it was validated with (a row edited since is
left for the next validation).  Rows are read from the source DBs read-only; vectors come from a
:class:`daemon.records.VectorSource`.  Every row left out is counted under a reason, and those
counts go into the model's metadata.  No torch here: plain numpy arrays.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from daemon.decisions.checks import (
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
from daemon.store.db import StateStore
from daemon.training.split import SPLIT_RULE, in_holdout

Kind = Literal["ranker", "crop"]
DIM_SCALE = 2048.0  # the reviewer feeds [width/2048, height/2048]
MAX_STAGE = 3.0


@dataclass
class DatasetInfo:
    """What the metadata says about a dataset: sizes, exclusions, split, provenance."""

    kind: Kind
    embedder_id: str
    exclusions: Counter[str] = field(default_factory=Counter)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # project -> train/holdout
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "embedder_id": self.embedder_id,
                "exclusions": dict(sorted(self.exclusions.items())), "sizes": self.sizes,
                "checkpoints": self.checkpoints, "split": self.split}


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

    @property
    def groups(self) -> int:
        return len(self.picks)

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

    @property
    def size(self) -> int:
        return len(self.boxes)

    def subset(self, mask: np.ndarray) -> CropData:
        idx = np.flatnonzero(mask)
        return CropData(self.vectors[idx], self.dims[idx], self.stages[idx], self.boxes[idx],
                        self.holdout[idx], [self.projects[i] for i in idx],
                        [self.group_ids[i] for i in idx])


def is_backfilled(row: Row) -> bool:
    """Rows written by ``trainingd backfill``: a legacy group id and no source folder."""
    gid = row[GROUP_ID]
    return isinstance(gid, str) and "_legacy_" in gid and row[DIRECTORY] is None


def _candidates(store: StateStore, kind: Kind, info: DatasetInfo
                ) -> dict[str, list[tuple[str, int, int]]]:
    """``project -> [(row_key, src_rowid, digest)]`` of rows the state DB calls usable."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for project, key, rowid, digest, errors, pending, action in store.conn.execute(
        "SELECT project, row_key, src_rowid, digest, errors, pending_crop, user_action "
        "FROM row_state ORDER BY project, src_rowid"
    ):
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


def _count_size(info: DatasetInfo, project: str, holdout: bool) -> None:
    side = info.sizes.setdefault(project, {"train": 0, "holdout": 0})
    side["holdout" if holdout else "train"] += 1


def _new_info(settings: Settings, kind: Kind, vectors: VectorSource) -> DatasetInfo:
    t = settings.training
    return DatasetInfo(kind=kind, embedder_id=vectors.embedder_id, split={
        "rule": SPLIT_RULE, "unit": "group", "seed": t.holdout_seed,
        "holdout_fraction": t.holdout_fraction, "holdout_projects": list(t.holdout_projects)})


def load_ranker_data(settings: Settings, store: StateStore, vectors: VectorSource
                     ) -> tuple[RankerData, DatasetInfo]:
    """Every usable group, with all its images' vectors."""
    t = settings.training
    info = _new_info(settings, "ranker", vectors)
    vecs: list[np.ndarray] = []
    stages: list[float] = []
    offsets, picks, ai_picks, holdout = [0], [], [], []
    projects: list[str] = []
    gids: list[str] = []
    dim: int | None = None
    for project, wanted in _candidates(store, "ranker", info).items():
        rows = _source_rows(settings, store, project, wanted, info)
        parsed = [(r, json.loads(r[IMAGES])) for r in rows]
        names = sorted({n for _, imgs in parsed for n in imgs})
        found = vectors.vectors_for(project, names) if names else {}
        for row, imgs in parsed:
            if len(imgs) < 2:
                info.exclusions["single_image"] += 1
                continue
            if any(n not in found for n in imgs):
                info.exclusions["missing_embedding"] += 1
                continue
            group = [np.asarray(found[n], dtype=np.float32).reshape(-1) for n in imgs]
            dim = dim if dim is not None else group[0].shape[0]
            if any(v.shape[0] != dim for v in group):
                info.exclusions["embedding_dim_mismatch"] += 1
                continue
            gid = str(row[GROUP_ID])
            side = in_holdout(project, gid, fraction=t.holdout_fraction, seed=t.holdout_seed,
                              holdout_projects=t.holdout_projects)
            vecs.extend(group)
            stages.extend(_stage(n) for n in imgs)
            offsets.append(offsets[-1] + len(imgs))
            picks.append(int(row[USER_INDEX]))
            ai = row[AI_INDEX]
            ai_picks.append(int(ai) if isinstance(ai, int) and 0 <= ai < len(imgs) else -1)
            holdout.append(side)
            projects.append(project)
            gids.append(gid)
            _count_size(info, project, side)
    data = RankerData(
        vectors=np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32),
        offsets=np.asarray(offsets, dtype=np.int64), picks=np.asarray(picks, dtype=np.int64),
        stages=np.asarray(stages, dtype=np.float32), ai_picks=np.asarray(ai_picks, np.int64),
        holdout=np.asarray(holdout, dtype=bool), projects=projects, group_ids=gids)
    return data, info


def load_crop_data(settings: Settings, store: StateStore, vectors: VectorSource
                   ) -> tuple[CropData, DatasetInfo]:
    """Every finished crop with a real (not full-frame) final box."""
    t = settings.training
    tol = settings.validation.full_frame_tolerance
    info = _new_info(settings, "crop", vectors)
    vecs: list[np.ndarray] = []
    dims: list[tuple[float, float]] = []
    stages: list[float] = []
    boxes: list[tuple[float, float, float, float]] = []
    holdout: list[bool] = []
    projects: list[str] = []
    gids: list[str] = []
    dim: int | None = None
    for project, wanted in _candidates(store, "crop", info).items():
        rows = _source_rows(settings, store, project, wanted, info)
        picked: list[tuple[Row, str, tuple[float, float, float, float]]] = []
        for row in rows:
            _, box = check_box("final_crop_coords", row[FINAL_CROP])
            if box is None:
                info.exclusions["invalid_box"] += 1
            elif is_full_frame(box, tol):
                info.exclusions["placeholder_crop"] += 1
            else:
                picked.append((row, json.loads(row[IMAGES])[int(row[USER_INDEX])], box))
        found = vectors.vectors_for(project, sorted({p[1] for p in picked})) if picked else {}
        for row, name, box in picked:
            if name not in found:
                info.exclusions["missing_embedding"] += 1
                continue
            v = np.asarray(found[name], dtype=np.float32).reshape(-1)
            dim = dim if dim is not None else v.shape[0]
            if v.shape[0] != dim:
                info.exclusions["embedding_dim_mismatch"] += 1
                continue
            gid = str(row[GROUP_ID])
            side = in_holdout(project, gid, fraction=t.holdout_fraction, seed=t.holdout_seed,
                              holdout_projects=t.holdout_projects)
            vecs.append(v)
            dims.append((float(row[WIDTH]), float(row[HEIGHT])))
            stages.append(_stage(name))
            boxes.append(box)
            holdout.append(side)
            projects.append(project)
            gids.append(gid)
            _count_size(info, project, side)
    data = CropData(
        vectors=np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32),
        dims=np.asarray(dims, dtype=np.float32).reshape(-1, 2),
        stages=np.asarray(stages, dtype=np.float32),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        holdout=np.asarray(holdout, dtype=bool), projects=projects, group_ids=gids)
    return data, info
