"""The sections of :class:`daemon.settings.Settings`, one model per ``[section]`` of
``config.toml`` (keys, defaults, bounds and the checks of single values).  Every section rejects
unknown keys and is frozen.  Loading, precedence and the checks that span sections live in
:mod:`daemon.settings`, which re-exports these names.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsSettings(_Section):
    """Where the runtime tree lives.  Unset paths derive from ``data_root`` (the playbook's
    layout); relative ones are taken from the config file's folder."""

    data_root: Path = Path("data")
    decisions_dir: Path | None = None  # default: <data_root>/training/ai_training_decisions
    state_db: Path | None = None  # default: <data_root>/daemon/state.db
    summaries_dir: Path | None = None  # default: <data_root>/daily_summaries
    cache_dir: Path | None = None  # default: <data_root>/ai_data/cache
    models_dir: Path | None = None  # default: <data_root>/ai_data/models
    triggers_dir: Path | None = None  # default: <data_root>/triggers
    #: create a missing decisions folder or image root instead of refusing to start (exit 78):
    #: for demos and first installs; off, a typo'd path is an error, not an empty project list
    create_missing: bool = False


class ValidationSettings(_Section):
    chunk_rows: int = Field(5000, ge=100, le=1_000_000)
    aspect_tolerance: float = Field(0.01, ge=0, le=1)
    full_frame_tolerance: float = Field(0.001, ge=0, le=0.1)
    future_slack_hours: float = Field(24.0, ge=0)
    full_reconcile_minutes: float = Field(60.0, ge=0)
    report_first_rows: int = Field(50, ge=0, le=10_000)


class SourcesSettings(_Section):
    busy_timeout_ms: int = Field(2000, ge=0, le=600_000)
    busy_retry_seconds: float = Field(30.0, ge=0)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class WatcherSettings(_Section):
    """The file watcher (owned by the daemon room)."""

    observer: Literal["auto", "inotify", "polling"] = "auto"  # polling: network filesystems
    polling_interval_seconds: float = Field(2.0, gt=0)
    settle_seconds: float = Field(0.5, ge=0)  # quiet time before a burst of events is worked
    max_wait_seconds: float = Field(5.0, gt=0)  # a steady stream is worked at least this often
    reconcile_minutes: float = Field(10.0, gt=0)  # full rescan: a missed event costs minutes


class ServiceSettings(_Section):
    """Service lifecycle (owned by the daemon room)."""

    shutdown_budget_seconds: float = Field(20.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    daily_summary_time: str = Field("06:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone: str = "UTC"  # IANA name for daily_summary_time
    retrain_check_minutes: float = Field(15.0, gt=0)
    #: a task with no progress for this long is a stall: watchdog pings stop, exit 70.  Below
    #: the unit's WatchdogSec (60); above the longest step between two progress reports
    stall_seconds: float = Field(45.0, gt=0)
    #: a task failed by its environment (disk full, read-only, folder gone) is retried after
    #: base, 2 base, 4 base ... seconds, never more than max
    retry_base_seconds: float = Field(5.0, gt=0)
    retry_max_seconds: float = Field(300.0, gt=0)
    trigger_attempts: int = Field(5, ge=1)  # a trigger is failed after this many tries

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class EmbeddingSettings(_Section):
    """CLIP embedding extraction (owned by the embedding room).  Reference: EMBEDDINGS.md."""

    model: str = "ViT-B-32"  # an open_clip model name
    #: open_clip pretrained tag resolved ONLY from the local Hugging Face cache (never
    #: downloaded), or "none": random init, for tests and demos (recorded in the embedder_id)
    pretrained: str = "openai"
    weights_path: Path | None = None  # a local checkpoint file; wins over the tag's file
    hf_cache_dir: Path | None = None  # default: huggingface_hub's (HF_HUB_CACHE / HF_HOME)
    random_seed: int = Field(0, ge=0)  # the seed of pretrained = "none"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: CUDA, then MPS, then CPU
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on a GPU
    batch_size: int = Field(32, ge=1, le=4096)  # images per model call
    decode_workers: int = Field(0, ge=0, le=64)  # decode threads; 0: one per usable core
    queue_batches: int = Field(2, ge=1, le=64)  # decoded batches held ahead of the model
    max_image_pixels: int = Field(100_000_000, ge=1)  # larger: image_too_large (bomb guard)
    jpeg_draft: bool = True  # decode large JPEGs at reduced scale (DCT draft mode)
    # -- Ray Data backend for bulk embedding (issue 14; the [ray] extra) --
    backend: Literal["local", "ray"] = "local"  # what `trainingd embed` uses without --backend
    #: "" (none), "local" (a cluster of this box, started per run), "auto" (the running
    #: cluster), or "ray://HOST:PORT"; the daemon hands big backlogs to Ray only when set
    ray_address: str = ""
    ray_min_backlog: int = Field(10_000, ge=1)  # the daemon hands larger backlogs to Ray
    ray_local_cpus: int = Field(0, ge=0)  # CPUs of a cluster started per run; 0: all usable


class TrainingSettings(_Section):
    """Ranker / crop proposer training and the retrain policy (owned by the training room)."""

    # -- retrain policy (Documents/TRAINING.md) --
    min_new_labels: int = Field(200, ge=1)  # new valid labels since the last training
    min_interval_hours: float = Field(6.0, ge=0)  # between two attempts of one model kind
    max_staleness_hours: float = Field(168.0, gt=0)  # retrain on any new label after this
    timeout_minutes: float = Field(60.0, gt=0)  # a training process running longer is killed
    # -- split --
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_seed: int = Field(0, ge=0)  # part of the hash: changing it reshuffles every group
    holdout_projects: list[str] = Field(default_factory=list)  # held out whole
    min_train_groups: int = Field(20, ge=1)
    min_holdout_groups: int = Field(5, ge=1)
    # -- optimisation --
    epochs: int = Field(15, ge=1, le=10_000)
    crop_epochs: int = Field(60, ge=1, le=10_000)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(512, ge=1, le=65_536)  # groups (ranker) or crops per step
    anomaly_weight: float = Field(3.0, ge=1)  # loss weight of anomaly groups (1: none)
    crop_use_stage: bool = False  # stage as an input: better fit, but no reviewer-format export
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # -- evaluation and promotion --
    baseline_agreement_limit: float = Field(0.99, gt=0, le=1)  # flagged as baseline copy above
    promotion_margin: float = Field(0.0, ge=0, le=1)  # must beat the champion by more than this
    # -- units, sides, promotion on evidence, data gate (issue 12; Documents/TRAINING.md) --
    #: share of units on the validation side (epochs/hyperparameters); holdout_fraction is the
    #: test side, read once per run for the report and the promotion decision
    validation_fraction: float = Field(0.15, ge=0, lt=1)
    #: groups whose images have embeddings at least this similar join one unit (never split);
    #: 0.97 sits above re-encodes of one photo (>= 0.98) and below distinct shots (<= 0.95)
    near_duplicate_cosine: float = Field(0.97, gt=0, le=1.01)  # above 1: search off
    promotion_alpha: float = Field(0.05, gt=0, lt=0.5)  # paired test level (two-sided)
    min_test_groups: int = Field(100, ge=1)  # ranker: fewer test groups never promote
    min_test_crops: int = Field(50, ge=1)  # crop proposer: fewer test crops never promote
    gate_max_error_share: float = Field(0.2, ge=0, le=1)  # rows failing must-pass checks
    gate_min_coverage: float = Field(0.5, ge=0, le=1)  # usable rows with every vector


class AuditSettings(_Section):
    """The optional LLM audit hook and its token budget (owned by the training room)."""

    command: list[str] = Field(default_factory=list)  # argv; empty: no audits
    soft_limit_tokens_per_day: int = Field(10_000, ge=0)
    timeout_seconds: float = Field(120.0, gt=0)  # one hook call; killed after
    max_rows_per_call: int = Field(50, ge=1, le=10_000)


def parse_listen(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> ``(host, port)``; ValueError says why.
    Port 0 lets the kernel pick one (logged as ``metrics.listening``)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9477)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{value!r}: port {number} is out of range 0-65535")
    return host, number


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and ``localhost`` (no DNS lookup at config time)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsSettings(_Section):
    """Prometheus metrics and the health endpoint (owned by the metrics room).  Reference:
    Documents/METRICS.md.  Both outputs are off by default."""

    #: "HOST:PORT" of the HTTP listener serving /metrics and /healthz; "" = no listener.
    #: Loopback only unless allow_remote (the hardened unit has no network: METRICS.md)
    listen: str = ""
    allow_remote: bool = False  # let listen name a non-loopback address (exposes the data)
    #: node_exporter textfile collector output, rewritten on every heartbeat; None = off
    textfile: Path | None = None
    cache_seconds: float = Field(5.0, ge=0, le=300)  # state-DB figures are re-read this often
    #: /healthz answers 503 once the current task has made no progress for this long (the
    #: probe sees trouble before the daemon restarts itself); default: service.stall_seconds / 2
    healthz_quiet_seconds: float | None = Field(None, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value.strip():
            parse_listen(value)  # raises ValueError with the reason
        return value.strip()

    @model_validator(mode="after")
    def _loopback_only(self) -> MetricsSettings:
        if self.listen and not self.allow_remote:
            host, _ = parse_listen(self.listen)
            if not is_loopback(host):
                raise ValueError(
                    f"metrics.listen {self.listen!r} is not a loopback address: /metrics and "
                    "/healthz would be reachable from other machines; use 127.0.0.1:PORT, or "
                    "set metrics.allow_remote = true if you mean it (Documents/METRICS.md)")
        return self


class SummarySettings(_Section):
    """The daily summary (owned by the summary room)."""

    #: at start, a day whose summary was missed (the daemon was down at its hour) is written
    #: from the data, marked as written late, for at most this many days back; 0 = never
    backfill_days: int = Field(7, ge=0, le=366)


class ReviewerSettings(_Section):
    """The drop-in files the upstream reviewer loads (owned by ``daemon.training.dropin``)."""

    models_dir: Path | None = None  # default: <data_root>/ai_data/models, where the reviewer looks
    ranker_file: str = Field("ranker_v3_w10.pt", pattern=r"^[^/\\]+\.pt$")  # 512-input scorer
    crop_file: str = Field("crop_proposer_v2.pt", pattern=r"^[^/\\]+\.pt$")  # 514-input crop net
    backups_kept: int = Field(5, ge=1, le=1000)  # replaced files kept per kind (rollback depth)
    export: bool = True  # false: a promoted champion never replaces the reviewer's files


class ProjectSettings(_Section):
    """``[projects.<name>]``: optional per project; DBs found in the decisions folder are
    validated without one."""

    db: Path | None = None  # default: <decisions_dir>/<name>.db
    image_roots: list[Path] = Field(default_factory=list)
    #: whether rows written by ``trainingd backfill`` count as new labels for retraining
    backfill_counts_toward_retrain: bool = False
    #: false: a validation-only project (e.g. a legacy DB whose images are gone): its rows are
    #: validated and reported but never trained on, and the training data gate skips it
    train: bool = True
