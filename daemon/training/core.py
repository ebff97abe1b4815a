"""One training run from data to registry, in whatever process calls it.

``run_training`` loads the dataset, trains on the train side, evaluates the new model, the
baselines and the current champion on today's holdout, writes the version files and promotes
only a better model.  The runner calls it in a child process (crash and OOM isolation); tests
call it in-process with their own :class:`daemon.records.VectorSource`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from daemon import __version__
from daemon.errors import NotEnoughDataError
from daemon.records import VectorSource
from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.timeparse import iso_utc
from daemon.training import registry
from daemon.training.dataset import CropData, DatasetInfo, RankerData

log = structlog.get_logger("training")
Kind = Literal["ranker", "crop"]
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainOutcome:
    """What a training attempt ended as.  ``status``: promoted, not_promoted, not_due,
    not_enough_data, stopped, timeout, crashed, failed."""

    kind: str
    status: str
    reason: str
    version: int | None = None
    promoted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _champion(settings: Settings, kind: Kind, embedder_id: str, in_features: int
              ) -> tuple[Any, dict[str, Any] | None, str]:
    """The champion model, its metadata, and why it cannot be compared (or '')."""
    from daemon.training.models import build

    models_dir = settings.models_dir
    version = registry.champion_version(models_dir, kind)
    if version is None:
        return None, None, "no champion yet"
    meta = registry.read_metadata(models_dir, kind, version)
    if meta is None:
        return None, None, f"champion v{version} has no readable metadata"
    arch = meta.get("architecture", {})
    if meta.get("embedder_id") != embedder_id or arch.get("in_features") != in_features:
        return None, meta, f"champion v{version} used another embedder or input; not comparable"
    model = build(kind, in_features, float(arch.get("dropout", 0.0)))
    model.load_state_dict(registry.load_state(registry.model_path(models_dir, kind, version)))
    model.eval()
    return model, meta, ""


def _ranker(settings: Settings, data: RankerData, should_stop: Callable[[], bool],
            progress: Progress | None, embedder_id: str) -> dict[str, Any]:
    from daemon.training.fit import fit_ranker, predict_ranker
    from daemon.training.metrics import baseline_copy_reason, ranker_report

    train, hold = data.subset(~data.holdout), data.subset(data.holdout)
    model, history = fit_ranker(train, settings.training, should_stop=should_stop,
                                progress=progress)
    report = ranker_report(predict_ranker(model, hold), hold.picks, hold.offsets, hold.ai_picks,
                           hold.projects)
    champ, _, note = _champion(settings, "ranker", embedder_id, data.vectors.shape[1])
    champ_report = None if champ is None else ranker_report(
        predict_ranker(champ, hold), hold.picks, hold.offsets, hold.ai_picks, hold.projects)
    return {"model": model, "history": history, "report": report, "champion_report": champ_report,
            "champion_note": note, "in_features": data.vectors.shape[1],
            "baseline_copy": baseline_copy_reason(
                report, settings.training.baseline_agreement_limit),
            "train_size": train.groups, "holdout_size": hold.groups,
            "reviewer_format": data.vectors.shape[1] == 512,
            "reviewer_note": "" if data.vectors.shape[1] == 512 else
            f"embedding dim {data.vectors.shape[1]} != 512: the reviewer cannot load it"}


def _crop(settings: Settings, data: CropData, should_stop: Callable[[], bool],
          progress: Progress | None, embedder_id: str) -> dict[str, Any]:
    from daemon.training.fit import fit_crop, mean_box, predict_crop
    from daemon.training.metrics import crop_report

    use_stage = settings.training.crop_use_stage
    train, hold = data.subset(~data.holdout), data.subset(data.holdout)
    model, history = fit_crop(train, settings.training, use_stage=use_stage,
                              should_stop=should_stop, progress=progress)
    mbox = mean_box(train.boxes)
    report = crop_report(predict_crop(model, hold, use_stage), hold.boxes, hold.stages, mbox)
    in_features = data.vectors.shape[1] + 2 + int(use_stage)
    champ, cmeta, note = _champion(settings, "crop", embedder_id, in_features)
    champ_report = None
    if champ is not None and cmeta is not None:
        champ_stage = bool(cmeta.get("hyperparameters", {}).get("crop_use_stage", False))
        champ_report = crop_report(predict_crop(champ, hold, champ_stage), hold.boxes,
                                   hold.stages, mbox)
    ok = in_features == 514
    why = "" if ok else (f"input has {in_features} features (the reviewer feeds 514: 512-d "
                         "embedding + width, height; crop_use_stage adds one)")
    return {"model": model, "history": history, "report": report, "champion_report": champ_report,
            "champion_note": note, "in_features": in_features, "baseline_copy": None,
            "train_size": train.size, "holdout_size": hold.size,
            "reviewer_format": ok, "reviewer_note": why}


def _check_size(settings: Settings, train: int, hold: int) -> None:
    t = settings.training
    if train < t.min_train_groups or hold < t.min_holdout_groups:
        raise NotEnoughDataError(
            f"{train} train / {hold} holdout examples; need {t.min_train_groups} / "
            f"{t.min_holdout_groups}")


def run_training(settings: Settings, kind: Kind, vectors: VectorSource, *,
                 store: StateStore | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 progress: Progress | None = None, now: datetime | None = None) -> TrainOutcome:
    """Train, evaluate and register one model.  Raises NotEnoughDataError, TrainingStopped."""
    from daemon.training.dataset import load_crop_data, load_ranker_data
    from daemon.training.models import architecture

    started = time.perf_counter()
    own = store is None
    st = StateStore(settings.state_db, read_only=True) if store is None else store
    try:
        info: DatasetInfo
        if kind == "ranker":
            rdata, info = load_ranker_data(settings, st, vectors)
            _check_size(settings, int((~rdata.holdout).sum()), int(rdata.holdout.sum()))
            res = _ranker(settings, rdata, should_stop, progress, vectors.embedder_id)
        else:
            cdata, info = load_crop_data(settings, st, vectors)
            _check_size(settings, int((~cdata.holdout).sum()), int(cdata.holdout.sum()))
            res = _crop(settings, cdata, should_stop, progress, vectors.embedder_id)
    finally:
        if own:
            st.close()
    models_dir = settings.models_dir
    registry.remove_stale_temp_files(models_dir)
    promoted, reason = registry.promotion_decision(
        kind, res["report"], res["champion_report"], baseline_copy=res["baseline_copy"],
        margin=settings.training.promotion_margin, champion_note=res["champion_note"])
    version = registry.next_version(models_dir, kind)
    moment = now or datetime.now(UTC)
    seconds = time.perf_counter() - started
    meta = {
        "kind": kind, "version": version, "file": registry.model_path(models_dir, kind,
                                                                     version).name,
        "created_at": iso_utc(moment), "code_version": __version__,
        "embedder_id": vectors.embedder_id,
        "architecture": architecture(kind, res["in_features"], settings.training.dropout),
        "hyperparameters": settings.training.model_dump(mode="json"),
        "training": {**res["history"], "seconds": round(seconds, 3)},
        "dataset": info.to_dict(), "train_size": res["train_size"],
        "holdout_size": res["holdout_size"], "metrics": res["report"],
        "baseline_copy": res["baseline_copy"], "champion_on_holdout": res["champion_report"],
        "champion_note": res["champion_note"], "promoted": promoted, "promotion_reason": reason,
        "reviewer_export": {"possible": res["reviewer_format"], "note": res["reviewer_note"]},
    }
    state = {k: v.detach().cpu() for k, v in res["model"].state_dict().items()}
    files = registry.save_model(models_dir, kind, version, state, meta)
    if promoted:
        files += registry.promote(models_dir, kind, version, state, meta, moment,
                                  reviewer_format=res["reviewer_format"])
    log.info("training.model_registered", kind=kind, version=version, promoted=promoted,
             reason=reason, train=res["train_size"], holdout=res["holdout_size"],
             seconds=round(seconds, 2))
    return TrainOutcome(kind=kind, status="promoted" if promoted else "not_promoted",
                        reason=reason, version=version, promoted=promoted,
                        metrics=_jsonable(res["report"]), files=[str(p) for p in files],
                        seconds=seconds)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
