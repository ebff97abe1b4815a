"""The model registry in ``settings.models_dir``: versioned models, metadata, the champion.

Files (N counts up per kind, never reused)::

    ranker_vN.pt, ranker_vN_metadata.json                 every trained ranker, promoted or not
    crop_proposer_vN.pt, crop_proposer_vN_metadata.json   every trained crop proposer
    champions.json                                        pointer: the promoted version per kind
    reviewer/ranker.pt, reviewer/crop_proposer.pt (+ _metadata.json)
                                                          the champion in the reviewer's format:
                                                          trainingd's record of what it gave the
                                                          reviewer (the next challenger's rival)
    reviewer_exports.json                                 the drop-in ledger (training.dropin)

The reviewer's own drop-in files (``ranker_v3_w10.pt``, ``crop_proposer_v2.pt``, see
:mod:`daemon.training.dropin`) may sit in this same folder: a version whose file name would be
one of them is never used (crop version 2 is skipped) and never listed.

A ``.pt`` file is a plain ``state_dict`` (loaded with ``weights_only=True``); its config and
metrics live in the metadata beside it.  Every file is written atomically, and the pointer is
written last, so a run killed at any moment leaves the champion as it was.  The promotion rule
(:func:`decide_promotion`) is pure.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy stays out of the start-up path of status
    import numpy as np
    from torch import Tensor

    from daemon.settings import Settings
    from daemon.training.dropin import Target

from daemon.fsutil import atomic_write_bytes, atomic_write_text
from daemon.timeparse import iso_utc
from daemon.training.split import SplitSettings

PREFIX = {"ranker": "ranker", "crop": "crop_proposer"}
POINTER = "champions.json"
REVIEWER_DIR = "reviewer"


def model_path(models_dir: Path, kind: str, version: int) -> Path:
    return models_dir / f"{PREFIX[kind]}_v{version}.pt"


def metadata_path(models_dir: Path, kind: str, version: int) -> Path:
    return models_dir / f"{PREFIX[kind]}_v{version}_metadata.json"


def _reserved(kind: str, version: int) -> bool:
    """A version whose file name is the reviewer's own (``crop_proposer_v2.pt``): in the shared
    folder it would overwrite the reviewer's file and read the reviewer's metadata as ours."""
    from daemon.training.dropin import DEFAULT_NAMES

    return f"{PREFIX[kind]}_v{version}.pt" in DEFAULT_NAMES.values()


def versions(models_dir: Path, kind: str) -> list[int]:
    """Versions with a model file, ascending."""
    pattern = re.compile(rf"^{PREFIX[kind]}_v(\d+)\.pt$")
    if not models_dir.is_dir():
        return []
    found = (pattern.match(p.name) for p in models_dir.iterdir())
    return sorted(v for m in found if m and not _reserved(kind, v := int(m.group(1))))


def next_version(models_dir: Path, kind: str) -> int:
    # metadata files count too: a version whose .pt was removed by hand is not reused
    pattern = re.compile(rf"^{PREFIX[kind]}_v(\d+)(?:\.pt|_metadata\.json)$")
    used = [int(m.group(1)) for p in (models_dir.iterdir() if models_dir.is_dir() else [])
            if (m := pattern.match(p.name))]
    version = max(used, default=0) + 1
    while _reserved(kind, version):
        version += 1
    return version


@dataclass(frozen=True)
class ChampionPointer:
    """One kind's entry in ``champions.json``: the promoted version, its file, and when."""

    version: int
    file: str | None = None
    promoted_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "file": self.file, "promoted_at": self.promoted_at}


def read_pointer(models_dir: Path) -> dict[str, ChampionPointer]:
    """Per kind, the champion ``champions.json`` names; an entry without an integer version
    (a damaged or hand-edited file) names none."""
    try:
        data = json.loads((models_dir / POINTER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for kind, e in data.items():
        if isinstance(e, dict) and isinstance(e.get("version"), int):
            file, at = e.get("file"), e.get("promoted_at")
            out[str(kind)] = ChampionPointer(int(e["version"]), file if isinstance(file, str)
                                             else None, at if isinstance(at, str) else None)
    return out


def champion_version(models_dir: Path, kind: str) -> int | None:
    entry = read_pointer(models_dir).get(kind)
    return None if entry is None else entry.version


def read_metadata(models_dir: Path, kind: str, version: int) -> dict[str, Any] | None:
    try:
        data = json.loads(metadata_path(models_dir, kind, version).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def all_metadata(models_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [m for v in versions(models_dir, kind) if (m := read_metadata(models_dir, kind, v))]


def _state_bytes(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_state(path: Path) -> dict[str, Tensor]:
    """A saved ``state_dict``; never unpickles anything but tensors."""
    import torch

    state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def save_model(models_dir: Path, kind: str, version: int, state: dict[str, Any],
               metadata: dict[str, Any]) -> list[Path]:
    """Write ``<prefix>_vN.pt`` and its metadata (model first: metadata names a real file)."""
    pt, meta = model_path(models_dir, kind, version), metadata_path(models_dir, kind, version)
    atomic_write_bytes(pt, _state_bytes(state))
    atomic_write_text(meta, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return [pt, meta]


def reviewer_paths(models_dir: Path, kind: str) -> tuple[Path, Path]:
    """The file the reviewer loads for ``kind`` and its metadata."""
    folder = models_dir / REVIEWER_DIR
    return folder / f"{PREFIX[kind]}.pt", folder / f"{PREFIX[kind]}_metadata.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def promote(models_dir: Path, kind: str, version: int, state: dict[str, Any],
            metadata: dict[str, Any], now: datetime, *,
            reviewer: tuple[dict[str, Any], dict[str, Any]] | None = None,
            dropin: Target | None = None) -> list[Path]:
    """Export ``reviewer`` (state, metadata) for the reviewer where the run allowed it (real
    embedder weights, a reviewer-loadable model that itself passed the promotion test): the
    ``reviewer/`` copy, then the drop-in files the reviewer loads (``dropin``), then move the
    pointer.  Without it the reviewer's files are left exactly as they were.  A drop-in export
    that cannot be written (missing folder, disk) is logged and shown by ``trainingd models``;
    the champion is promoted for trainingd all the same."""
    written: list[Path] = []
    if reviewer is not None:
        rstate, rmeta = reviewer
        if rmeta.get("embedder_random") is not False:  # a last guard: never random weights
            raise ValueError(f"refusing to export {kind} v{version} to the reviewer: "
                             f"embedder {rmeta.get('embedder_id')!r} is random or unknown")
        pt, meta = reviewer_paths(models_dir, kind)
        data = _state_bytes(rstate)
        atomic_write_bytes(pt, data)
        atomic_write_text(meta, json.dumps(rmeta, indent=2, sort_keys=True, default=str) + "\n")
        written += [pt, meta]
        if dropin is not None:
            written += _export_dropin(dropin, kind, version, data, rmeta, now)
    pointer = read_pointer(models_dir)
    pointer[kind] = ChampionPointer(version, model_path(models_dir, kind, version).name,
                                    iso_utc(now))
    atomic_write_text(models_dir / POINTER, json.dumps(
        {k: p.to_dict() for k, p in pointer.items()}, indent=2, sort_keys=True) + "\n")
    written.append(models_dir / POINTER)
    return written


def dropin_target(settings: Settings) -> Target:
    """Where the drop-in export writes (``[reviewer]``)."""
    from daemon.training.dropin import target

    return target(settings)


def _export_dropin(target: Target, kind: str, version: int, data: bytes, rmeta: dict[str, Any],
                   now: datetime) -> list[Path]:
    from daemon.training.dropin import export

    try:
        return export(target, kind, version, data, json.loads(json.dumps(rmeta, default=str)),
                      now).written
    except OSError as exc:  # the reviewer keeps its file; trainingd's champion still moves
        import structlog

        structlog.get_logger("dropin").error(
            "dropin.export_failed", kind=kind, version=version, folder=str(target.folder),
            error=f"{type(exc).__name__}: {exc}")
        return []


def sync_reviewer_copy(models_dir: Path, kind: str, data: bytes,
                       dropin_meta: dict[str, Any] | None) -> None:
    """After a rollback: ``reviewer/`` (what the next challenger is compared against) becomes
    what the reviewer has again, or nothing when that file is not trainingd's."""
    pt, meta_path = reviewer_paths(models_dir, kind)
    inner = (dropin_meta or {}).get("trainingd")
    if isinstance(inner, dict):
        atomic_write_bytes(pt, data)
        atomic_write_text(meta_path, json.dumps(inner, indent=2, sort_keys=True) + "\n")
    else:
        pt.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)


def reviewer_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The keys the old metadata files held (data contract section 6), describing what the
    reviewer loads (for the ranker: the 512-input scorer, not trainingd's residual ranker),
    plus the embedder it needs: the reviewer must embed with the same weights."""
    export = meta.get("reviewer_export", {})
    arch = dict(meta.get("architecture") or {})
    if meta.get("kind") == "ranker":
        from daemon.training.models import architecture

        arch = architecture("ranker", int(arch.get("in_features", 512)),
                            float(arch.get("dropout", 0.0)), "scorer")
    return {"version": meta.get("version"), "created_at": meta.get("created_at"),
            "train_size": meta.get("train_size"),
            "validation_size": meta.get("validation_size"),
            "test_size": meta.get("test_size", meta.get("holdout_size")),
            "best_epoch": (meta.get("candidates") or {}).get("scorer", {}).get(
                "best_epoch", meta.get("training", {}).get("best_epoch")),
            "metrics": export.get("metrics"), "evaluated_as": export.get("evaluated_as"),
            "promotion": export.get("decision"),
            "hyperparameters": meta.get("hyperparameters"), "architecture": arch,
            "loss": meta.get("training", {}).get("loss"),
            "embedder_id": meta.get("embedder_id"),
            "embedder_random": meta.get("embedder_random"),
            "source": f"trainingd {meta.get('file')}"}


def remove_stale_temp_files(models_dir: Path) -> int:
    """Temp files a killed run left behind (atomic writes name them ``.<target>.*.tmp``)."""
    count = 0
    for folder in (models_dir, models_dir / REVIEWER_DIR):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                count += 1
    return count


def primary_score(kind: str, report: dict[str, Any]) -> float | None:
    """The number promotion compares: top-1 agreement (ranker), mean IoU (crop)."""
    value = report["model"]["top1"] if kind == "ranker" else report["model"]["mean_iou"]
    return None if value is None else float(value)


def baseline_score(kind: str, report: dict[str, Any]) -> float | None:
    if kind == "ranker":
        v = report["baseline_highest_stage"]["top1"]
        return None if v is None else float(v)
    vals = [report[k]["mean_iou"] for k in ("baseline_full_frame", "baseline_mean_box")
            if report[k]["mean_iou"] is not None]
    return max(vals) if vals else None


# -- promotion on evidence (issue 12) -------------------------------------------------------------

UNITS_SUFFIX = "_units.json"


def units_path(models_dir: Path, kind: str, version: int) -> Path:
    """Beside the model: the digests of every group it trained on or was selected on."""
    return models_dir / f"{PREFIX[kind]}_v{version}{UNITS_SUFFIX}"


def write_units(models_dir: Path, kind: str, version: int, seen_groups: Iterable[str],
                split: SplitSettings) -> Path:
    """Record the groups (train + validation sides, as ``units.key_digest``) a model saw."""
    from daemon.training.units import key_digest

    path = units_path(models_dir, kind, version)
    digests = sorted({key_digest(k) for k in seen_groups})
    atomic_write_text(path, json.dumps({"split": split.to_dict(),
                                        "seen_group_digests": digests}) + "\n")
    return path


def read_units(models_dir: Path, kind: str, version: int
               ) -> tuple[frozenset[str], SplitSettings] | None:
    """``(seen group digests, split)`` of a model, or None when it recorded none (older)."""
    try:
        data = json.loads(units_path(models_dir, kind, version).read_text(encoding="utf-8"))
        return (frozenset(str(d) for d in data["seen_group_digests"]),
                SplitSettings.from_dict(data["split"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class ChampionEvidence:
    """The champion's per-test-item scores (aligned with the challenger's ``test_keys``; NaN
    where it could not be scored) and what it saw (``read_units``); None seen = unknown."""

    version: int
    scores: np.ndarray
    seen: frozenset[str] | None
    split: SplitSettings | None


@dataclass
class PromotionDecision:
    """Whether to promote, why, and the evidence: every paired comparison made."""

    promoted: bool
    reason: str
    metric: str
    n_test: int
    best_baseline: str | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    champion_compared_on: int | None = None
    champion_excluded_seen: int = 0
    split_changed: bool = False
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_promotion(kind: str, challenger: np.ndarray, test_keys: Sequence[str],
                     baselines: Mapping[str, np.ndarray], champion: ChampionEvidence | None, *,
                     alpha: float, min_test: int, split: SplitSettings,
                     blockers: Sequence[str] = (), champion_note: str = "",
                     seed: int = 0) -> PromotionDecision:
    """Promote only a challenger that beats the best baseline and the champion, paired on the
    same test items (``daemon.training.evidence``), on at least ``min_test`` items.

    ``challenger`` and every ``baselines[name]`` are per-test-item scores aligned with
    ``test_keys`` (group keys ``project/group_id``): 0/1 hits for the ranker, IoU for crops.
    The best baseline is the one with the highest mean.  The champion is compared only on test
    items whose group it never saw; a champion trained under another split is flagged."""
    import numpy as np

    from daemon.training.evidence import Metric, compare
    from daemon.training.units import key_digest

    metric: Metric = "top1" if kind == "ranker" else "mean_iou"
    label = "top-1" if kind == "ranker" else "mean IoU"
    x = np.asarray(challenger, dtype=np.float64)
    n = int(x.size)
    out = PromotionDecision(False, "", metric, n)
    out.flags += list(blockers)
    if n < min_test:
        out.reason = (f"{n} test {'groups' if kind == 'ranker' else 'crops'} < minimum "
                      f"{min_test}: too few to tell a better model from a lucky seed")
        return out
    means = {name: float(np.nanmean(v)) for name, v in baselines.items()
             if np.asarray(v).size == n and not np.all(np.isnan(np.asarray(v, np.float64)))}
    if not means:
        out.reason = "no baseline scored on the test side"
        return out
    best = max(means, key=lambda k: means[k])
    out.best_baseline = best
    bvec = np.asarray(baselines[best], dtype=np.float64)
    ok = ~np.isnan(bvec)
    vs_base = compare(metric, x[ok], bvec[ok], against=f"baseline {best}", alpha=alpha,
                      seed=seed)
    out.comparisons.append(vs_base.to_dict())
    vs_champ = None
    if champion is not None:
        cvec = np.asarray(champion.scores, dtype=np.float64)
        use = ~np.isnan(cvec) if cvec.size == n else np.zeros(n, dtype=bool)
        if champion.seen is not None:
            seen = np.asarray([key_digest(k) in champion.seen for k in test_keys], dtype=bool)
            out.champion_excluded_seen = int((use & seen).sum())
            use &= ~seen
        else:
            out.flags.append(f"champion v{champion.version} recorded no units: compared on "
                             "every test group")
        if champion.split is not None and champion.split.key() != split.key():
            out.split_changed = True
            out.flags.append(f"split changed since champion v{champion.version} "
                             f"({champion.split.key()} -> {split.key()}): "
                             f"{out.champion_excluded_seen} test groups it saw are left out")
        out.champion_compared_on = int(use.sum())
        vs_champ = compare(metric, x[use], cvec[use], against=f"champion v{champion.version}",
                           alpha=alpha, seed=seed)
        out.comparisons.append(vs_champ.to_dict())
    if blockers:
        out.reason = "not promoted: " + "; ".join(blockers)
        return out
    if not vs_base.passed:
        out.reason = _why_not(label, vs_base.to_dict(), alpha)
        return out
    if vs_champ is not None:
        if vs_champ.n < min_test:
            out.reason = (f"only {vs_champ.n} test groups the {vs_champ.against} never saw "
                          f"(< {min_test}): cannot show it is better than the champion")
            return out
        if not vs_champ.passed:
            out.reason = _why_not(label, vs_champ.to_dict(), alpha)
            return out
    out.promoted = True
    extra = "" if vs_champ is not None else f" ({champion_note or 'no champion yet'})"
    out.reason = "; ".join(_figures(label, c) for c in out.comparisons) + extra
    return out


def _figures(label: str, c: dict[str, Any]) -> str:
    return (f"{label} {c['challenger']:.4f} vs {c['other']:.4f} for the {c['against']} on "
            f"n={c['n']}: difference {c['difference']:+.4f}, {100 * (1 - c['alpha']):.0f}% CI "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], p={c['p']:.3g} ({c['test']})")


def _why_not(label: str, c: dict[str, Any], alpha: float) -> str:
    if c["n"] == 0 or c["difference"] is None:
        return f"nothing to compare with the {c['against']}"
    return (f"not shown better than the {c['against']} at alpha {alpha}: "
            + _figures(label, c))
