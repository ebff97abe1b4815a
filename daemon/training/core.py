"""One training run from data to registry, in whatever process calls it.

``run_training`` loads the dataset, splits it into train / validation / test, trains on the
train side (epochs and the ranker design chosen on the validation side), evaluates the new
model, the baselines and the current champion on the test side once, writes the version files
and promotes only on evidence (:func:`daemon.training.registry.decide_promotion`).

The reviewer is a second consumer with its own limits: it loads a 512-input scorer and takes
the argmax over a group's vectors (no stage), and it reads the crop net's raw output.  So what
it would load is evaluated *as it would use it*, and exported only when that itself passes the
promotion test, the embedder's weights are real (never ``random``), and the version is
promoted; otherwise the reviewer's files stay as they were and the metadata says why.

The runner calls this in a child process (crash and OOM isolation); tests call it in-process
with their own :class:`daemon.records.VectorSource`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
from daemon.training.dataset import CropData, DatasetInfo, RankerData, is_random_embedder
from daemon.training.split import SplitSettings

log = structlog.get_logger("training")
Kind = Literal["ranker", "crop"]
Progress = Callable[[dict[str, Any]], None]
REVIEWER_DIM, REVIEWER_CROP_FEATURES = 512, 514  # inputs of the reviewer's scorer / crop net


@dataclass(frozen=True)
class TrainOutcome:
    """What a training attempt ended as.  ``status``: promoted, not_promoted, not_due,
    not_enough_data, refused (the data gate; ``files`` names its report), stopped, timeout,
    crashed, failed."""

    kind: str
    status: str
    reason: str
    version: int | None = None
    promoted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embedder_id: str = ""
    embedder_random: bool = False
    reviewer_export: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- sides ----------------------------------------------------------------------------------------

def _sides(settings: Settings, projects: Sequence[str], group_ids: Sequence[str],
           side: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, SplitSettings]:
    """Train / validation / test masks per example, and the split as the metadata records it.

    ``side``: the dataset's codes (each group on its unit's side); data built without them
    (in-memory callers) puts each group on the side of its own key, as a one-group unit."""
    from daemon.training.dataset import SIDE_CODE, split_settings
    from daemon.training.units import group_key, side_of

    t = settings.training
    if side is None:
        side = np.asarray([SIDE_CODE[side_of(group_key(p, g), seed=t.holdout_seed,
                                             test_fraction=t.holdout_fraction,
                                             validation_fraction=t.validation_fraction,
                                             forced_test=p in t.holdout_projects)]
                           for p, g in zip(projects, group_ids, strict=True)], dtype=np.int8)
    return (side == SIDE_CODE["train"], side == SIDE_CODE["validation"],
            side == SIDE_CODE["test"], split_settings(t))


def _keys(projects: Sequence[str], group_ids: Sequence[str]) -> list[str]:
    from daemon.training.units import group_key

    return [group_key(p, g) for p, g in zip(projects, group_ids, strict=True)]


def _decide(settings: Settings, kind: Kind, challenger: np.ndarray, keys: Sequence[str],
            baselines: dict[str, np.ndarray], champion: registry.ChampionEvidence | None,
            split: SplitSettings, *, blockers: Sequence[str] = (),
            champion_note: str = "") -> registry.PromotionDecision:
    t = settings.training
    min_test = t.min_test_groups if kind == "ranker" else t.min_test_crops
    return registry.decide_promotion(
        kind, challenger, keys, baselines, champion, alpha=t.promotion_alpha, min_test=min_test,
        split=split, blockers=blockers, champion_note=champion_note, seed=t.seed)


# -- champions ------------------------------------------------------------------------------------

def _champion(settings: Settings, kind: Kind, embedder_id: str, in_features: int
              ) -> tuple[Any, dict[str, Any] | None, str, int | None]:
    """The champion model, its metadata, why it cannot be compared (or ''), its version."""
    from daemon.training.models import build

    models_dir = settings.models_dir
    version = registry.champion_version(models_dir, kind)
    if version is None:
        return None, None, "no champion yet", None
    meta = registry.read_metadata(models_dir, kind, version)
    if meta is None:
        return None, None, f"champion v{version} has no readable metadata", version
    arch = meta.get("architecture", {})
    if meta.get("embedder_id") != embedder_id or arch.get("in_features") != in_features:
        return None, meta, (f"champion v{version} used another embedder or input; not "
                            "comparable"), version
    model = build(kind, in_features, float(arch.get("dropout", 0.0)),
                  str(arch.get("design", "scorer")))
    model.load_state_dict(registry.load_state(registry.model_path(models_dir, kind, version)))
    model.eval()
    return model, meta, "", version


def _reviewer_champion(settings: Settings, kind: Kind, embedder_id: str, in_features: int
                       ) -> tuple[Any, dict[str, Any] | None]:
    """What the reviewer loads now, when it was made from the same embedder and input."""
    from daemon.training.models import build

    pt, meta_path = registry.reviewer_paths(settings.models_dir, kind)
    meta = registry.read_json(meta_path)
    if meta is None or not pt.is_file() or meta.get("embedder_id") != embedder_id:
        return None, meta
    try:
        model = build(kind, in_features, 0.0, "scorer")
        model.load_state_dict(registry.load_state(pt))
    except (RuntimeError, OSError, ValueError):
        return None, meta
    model.eval()
    return model, meta


def _evidence(settings: Settings, kind: Kind, version: int | None, scores: np.ndarray
              ) -> registry.ChampionEvidence | None:
    if version is None:
        return None
    seen, split = registry.read_units(settings.models_dir, kind, version) or (None, None)
    return registry.ChampionEvidence(version, scores, seen, split)


# -- the two kinds --------------------------------------------------------------------------------

def _ranker_baselines(data: RankerData, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-group hits of the rules a ranker must beat."""
    from daemon.training.metrics import ranker_baseline_picks, ranker_hits

    return {name: ranker_hits(pred, data.picks)
            for name, pred in ranker_baseline_picks(data.offsets, data.ai_picks, keys).items()}


def _ranker(settings: Settings, data: RankerData, should_stop: Callable[[], bool],
            progress: Progress | None, embedder_id: str) -> dict[str, Any]:
    from daemon.training.fit import FitHistory, fit_ranker, predict_ranker
    from daemon.training.metrics import baseline_copy_reason, ranker_report

    hp = settings.training
    tr_m, va_m, te_m, split = _sides(settings, data.projects, data.group_ids, data.side)
    train, val, test = data.subset(tr_m), data.subset(va_m), data.subset(te_m)
    _check_size(settings, train.groups, test.groups)
    dim = data.vectors.shape[1]

    def tagged(design: str) -> Progress | None:
        return None if progress is None else (lambda e: progress({**e, "design": design}))

    candidates: dict[str, Any] = {}
    histories: dict[str, FitHistory] = {}
    for design in ("residual", "scorer"):
        candidates[design], histories[design] = fit_ranker(
            train, hp, validation=val, design=design, should_stop=should_stop,
            progress=tagged(design))

    def val_top1(model: Any) -> float | None:
        return float((predict_ranker(model, val) == val.picks).mean()) if val.groups else None

    chosen_val = {d: val_top1(m) for d, m in candidates.items()}
    # the residual ranker keeps the rule's wins by construction: it wins ties
    design = "residual" if (chosen_val["scorer"] or 0.0) <= (chosen_val["residual"] or 0.0) \
        else "scorer"
    model = candidates[design]
    pred = predict_ranker(model, test)
    report = ranker_report(pred, test.picks, test.offsets, test.ai_picks, test.projects)
    keys = _keys(test.projects, test.group_ids)
    baselines = _ranker_baselines(test, keys)
    report["baseline_top1"] = {k: float(np.nanmean(v)) if v.size else None
                               for k, v in baselines.items()}
    champ, _, note, champ_version = _champion(settings, "ranker", embedder_id, dim)
    champ_report, champ_evidence = None, None
    if champ is not None:
        cpred = predict_ranker(champ, test)
        champ_report = ranker_report(cpred, test.picks, test.offsets, test.ai_picks,
                                     test.projects)
        champ_evidence = _evidence(settings, "ranker", champ_version,
                                   (cpred == test.picks).astype(float))
    copy = baseline_copy_reason(report, hp.baseline_agreement_limit)
    decision = _decide(settings, "ranker", (pred == test.picks).astype(float), keys, baselines,
                       champ_evidence, split, blockers=[copy] if copy else [],
                       champion_note=note)
    # the reviewer's view: the plain scorer, argmax over the group's vectors, nothing else
    scorer = candidates["scorer"]
    spred = predict_ranker(scorer, test)
    scorer_report = ranker_report(spred, test.picks, test.offsets, test.ai_picks,
                                  test.projects)
    reviewer = _reviewer_gate(
        settings, "ranker", embedder_id, dim == REVIEWER_DIM,
        f"embedding dim {dim} != {REVIEWER_DIM}: the reviewer cannot load it",
        decision.promoted, (spred == test.picks).astype(float), keys, baselines, split,
        lambda m: (predict_ranker(m, test) == test.picks).astype(float), dim,
        scorer_report)
    return {"model": model, "design": design, "history": histories[design],
            "report": report, "champion_report": champ_report, "champion_note": note,
            "decision": decision, "in_features": dim, "baseline_copy": copy,
            "train_size": train.groups, "validation_size": val.groups,
            "holdout_size": test.groups, "split": split,
            "seen_keys": _keys(train.projects + val.projects, train.group_ids + val.group_ids),
            "candidates": {d: {"validation_top1": chosen_val[d], "best_epoch": h.best_epoch,
                               "epochs_run": h.epochs_run} for d, h in histories.items()},
            "reviewer": reviewer, "reviewer_state": scorer.state_dict()}


def _crop_baselines(train: CropData, test: CropData) -> dict[str, np.ndarray]:
    """Per-crop IoU of every crop baseline (all fitted on the train side)."""
    from daemon.training.metrics import box_iou, crop_baseline_boxes

    boxes = crop_baseline_boxes(train.boxes, train.dims, train.stages, test.dims, test.stages)
    return {name: box_iou(b, test.boxes).astype(float) for name, b in boxes.items()}


def _crop(settings: Settings, data: CropData, should_stop: Callable[[], bool],
          progress: Progress | None, embedder_id: str) -> dict[str, Any]:
    import torch

    from daemon.training.fit import fit_crop, mean_box, predict_crop_raw
    from daemon.training.metrics import box_iou, box_metrics, crop_report
    from daemon.training.models import project_box, raw_box_figures

    hp = settings.training
    use_stage = hp.crop_use_stage
    tr_m, va_m, te_m, split = _sides(settings, data.projects, data.group_ids, data.side)
    train, val, test = data.subset(tr_m), data.subset(va_m), data.subset(te_m)
    _check_size(settings, train.size, test.size)
    model, history = fit_crop(train, hp, use_stage=use_stage, validation=val,
                              should_stop=should_stop, progress=progress)
    raw_t = torch.from_numpy(predict_crop_raw(model, test, use_stage))
    proj_t = project_box(raw_t)
    raw, proj = raw_t.numpy(), proj_t.numpy().astype(np.float32)
    report = crop_report(proj, test.boxes, test.stages, mean_box(train.boxes))
    report["model_raw"] = box_metrics(raw, test.boxes, test.stages).to_dict()
    report["raw_output"] = raw_box_figures(raw_t, proj_t, settings.validation.aspect_tolerance)
    in_features = data.vectors.shape[1] + 2 + int(use_stage)
    keys = _keys(test.projects, test.group_ids)
    baselines = _crop_baselines(train, test)
    report["baseline_mean_iou"] = {k: float(v.mean()) if v.size else None
                                   for k, v in baselines.items()}
    champ, cmeta, note, champ_version = _champion(settings, "crop", embedder_id, in_features)
    champ_report, champ_evidence = None, None
    if champ is not None and cmeta is not None:
        champ_stage = bool(cmeta.get("hyperparameters", {}).get("crop_use_stage", False))
        from daemon.training.fit import predict_crop

        cbox = predict_crop(champ, test, champ_stage)
        champ_report = crop_report(cbox, test.boxes, test.stages, mean_box(train.boxes))
        champ_evidence = _evidence(settings, "crop", champ_version,
                                   box_iou(cbox, test.boxes).astype(float))
    decision = _decide(settings, "crop", box_iou(proj, test.boxes).astype(float), keys,
                       baselines, champ_evidence, split, champion_note=note)
    why = "" if in_features == REVIEWER_CROP_FEATURES else (
        f"input has {in_features} features (the reviewer feeds 514: 512-d embedding + width, "
        "height; crop_use_stage adds one)")

    def raw_iou(m: Any) -> np.ndarray:
        return box_iou(predict_crop_raw(m, test, False), test.boxes).astype(float)

    reviewer = _reviewer_gate(
        settings, "crop", embedder_id, not why, why, decision.promoted,
        box_iou(raw, test.boxes).astype(float), keys, baselines, split, raw_iou, in_features,
        {"model": report["model_raw"]})
    return {"model": model, "design": "crop", "history": history, "report": report,
            "champion_report": champ_report, "champion_note": note, "decision": decision,
            "in_features": in_features, "baseline_copy": None, "train_size": train.size,
            "validation_size": val.size, "holdout_size": test.size, "split": split,
            "seen_keys": _keys(train.projects + val.projects, train.group_ids + val.group_ids),
            "candidates": {}, "reviewer": reviewer, "reviewer_state": model.state_dict()}


def _reviewer_gate(settings: Settings, kind: Kind, embedder_id: str, loadable: bool,
                   not_loadable: str, promoted: bool, scores: np.ndarray, keys: Sequence[str],
                   baselines: dict[str, np.ndarray], split: SplitSettings,
                   score_current: Callable[[Any], np.ndarray], in_features: int,
                   report: dict[str, Any]) -> dict[str, Any]:
    """Whether what the reviewer would load may replace its file, and why (or why not)."""
    out: dict[str, Any] = {"possible": False, "exported": False, "note": "",
                           "embedder_id": embedder_id,
                           "embedder_random": is_random_embedder(embedder_id),
                           "evaluated_as": ("argmax of the 512-input scorer over the group's "
                                            "vectors" if kind == "ranker" else
                                            "the crop net's raw output"),
                           "metrics": report.get("model"), "decision": None}
    blocked = [not_loadable] if not loadable else []
    if is_random_embedder(embedder_id):
        blocked.append(f"random-init embedder weights ({embedder_id}): never exported to the "
                       "reviewer; its files are left as they were")
    if blocked:
        out["note"] = "; ".join(blocked)
        return out
    out["possible"] = True
    current, current_meta = _reviewer_champion(settings, kind, embedder_id, in_features)
    evidence = None
    if current is not None and current_meta is not None:
        made_from = current_meta.get("version")
        evidence = _evidence(settings, kind, made_from if isinstance(made_from, int) else 0,
                             score_current(current))
    decision = _decide(settings, kind, scores, keys, baselines, evidence, split,
                       champion_note="the reviewer has no comparable model yet")
    out["decision"] = decision.to_dict()
    if not promoted:
        out["note"] = "this version was not promoted; the reviewer's file is left as it was"
    elif not decision.promoted:
        out["note"] = (f"what the reviewer would load ({out['evaluated_as']}) does not pass "
                       f"the promotion test itself: {decision.reason}; the reviewer's file is "
                       "left as it was")
    else:
        out["exported"] = True
        out["note"] = f"exported: {decision.reason}"
    return out


def _check_size(settings: Settings, train: int, hold: int) -> None:
    t = settings.training
    if train < t.min_train_groups or hold < t.min_holdout_groups:
        raise NotEnoughDataError(
            f"{train} train / {hold} test examples; need {t.min_train_groups} / "
            f"{t.min_holdout_groups}")


def run_training(settings: Settings, kind: Kind, vectors: VectorSource, *,
                 store: StateStore | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 progress: Progress | None = None, now: datetime | None = None) -> TrainOutcome:
    """Train, evaluate and register one model.  Raises NotEnoughDataError, TrainingStopped."""
    from daemon.training.dataset import load_crop_data, load_ranker_data
    from daemon.training.gate import data_gate
    from daemon.training.models import architecture

    started = time.perf_counter()
    own = store is None
    st = StateStore(settings.state_db, read_only=True) if store is None else store
    embedder_id = vectors.embedder_id
    moment = now or datetime.now(UTC)
    try:
        info: DatasetInfo
        rdata: RankerData | None = None
        cdata: CropData | None = None
        if kind == "ranker":
            rdata, info = load_ranker_data(settings, st, vectors)
        else:
            cdata, info = load_crop_data(settings, st, vectors)
        # inspect before the bulk work: the report is written first, and bad data refuses
        gate = data_gate(settings, st, moment, coverage=info.coverage, units=info.units,
                         kind=kind)
        if not gate.passed:
            return TrainOutcome(kind=kind, status="refused", reason=gate.reason,
                                files=[str(gate.report)] if gate.report else [],
                                seconds=time.perf_counter() - started,
                                embedder_id=embedder_id,
                                embedder_random=is_random_embedder(embedder_id))
        if rdata is not None:
            res = _ranker(settings, rdata, should_stop, progress, embedder_id)
        else:
            assert cdata is not None
            res = _crop(settings, cdata, should_stop, progress, embedder_id)
    finally:
        if own:
            st.close()
    models_dir = settings.models_dir
    registry.remove_stale_temp_files(models_dir)
    decision: registry.PromotionDecision = res["decision"]
    promoted, reason = decision.promoted, decision.reason
    version = registry.next_version(models_dir, kind)
    seconds = time.perf_counter() - started
    random_embedder = is_random_embedder(embedder_id)
    meta = {
        "kind": kind, "version": version, "file": registry.model_path(models_dir, kind,
                                                                     version).name,
        "created_at": iso_utc(moment), "code_version": __version__,
        "embedder_id": embedder_id, "embedder_random": random_embedder,
        "architecture": architecture(kind, res["in_features"], settings.training.dropout,
                                     res["design"]),
        "hyperparameters": settings.training.model_dump(mode="json"),
        "training": {**res["history"].to_dict(), "seconds": round(seconds, 3)},
        "candidates": res["candidates"],
        "dataset": info.to_dict(), "split": res["split"].to_dict(), "train_size": res["train_size"],
        "validation_size": res["validation_size"], "holdout_size": res["holdout_size"],
        "test_size": res["holdout_size"], "metrics": res["report"],
        "baseline_copy": res["baseline_copy"], "champion_on_holdout": res["champion_report"],
        "champion_note": res["champion_note"], "promoted": promoted, "promotion_reason": reason,
        "promotion": decision.to_dict(),
        "reviewer_export": {k: v for k, v in res["reviewer"].items()},
    }
    state = {k: v.detach().cpu() for k, v in res["model"].state_dict().items()}
    files = registry.save_model(models_dir, kind, version, state, meta)
    files.append(registry.write_units(models_dir, kind, version, res["seen_keys"], res["split"]))
    if promoted:
        reviewer = None
        if res["reviewer"]["exported"]:
            rstate = {k: v.detach().cpu() for k, v in res["reviewer_state"].items()}
            reviewer = (rstate, registry.reviewer_metadata(meta))
        files += registry.promote(models_dir, kind, version, state, meta, moment,
                                  reviewer=reviewer, dropin=registry.dropin_target(settings))
    log.info("training.model_registered", kind=kind, version=version, promoted=promoted,
             reason=reason, train=res["train_size"], validation=res["validation_size"],
             test=res["holdout_size"], design=res["design"], embedder_id=embedder_id,
             embedder_random=random_embedder, reviewer_exported=res["reviewer"]["exported"],
             seconds=round(seconds, 2))
    return TrainOutcome(kind=kind, status="promoted" if promoted else "not_promoted",
                        reason=reason, version=version, promoted=promoted,
                        metrics=_jsonable(res["report"]), files=[str(p) for p in files],
                        seconds=seconds, embedder_id=embedder_id,
                        embedder_random=random_embedder,
                        reviewer_export=_jsonable({k: res["reviewer"][k] for k in (
                            "possible", "exported", "note", "evaluated_as")}))


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
