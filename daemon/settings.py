"""Configuration: ``config.toml`` overridden by ``TRAININGD_*`` environment variables.

The only reader of configuration.  Every section rejects unknown keys (a typo in a nested TOML
table is otherwise silently ignored).  Relative paths are resolved against the folder of the
config file (or the working directory when running on the embedded defaults), so the service
behaves the same whatever its working directory.  A bad config raises :class:`ConfigError`,
whose message names the key, where it came from and the bad value; the CLI exits 78 on it.

Precedence, highest first: environment (``TRAININGD_SECTION__KEY``), config file, defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.errors import ConfigError
from daemon.settings_sections import (
    AuditSettings,
    EmbeddingSettings,
    LoggingSettings,
    MetricsSettings,
    PathsSettings,
    ProjectSettings,
    ReviewerSettings,
    ServiceSettings,
    SourcesSettings,
    SummarySettings,
    TrainingSettings,
    ValidationSettings,
    WatcherSettings,
    is_loopback,
    parse_listen,
)

__all__ = [
    "ENV_CONFIG",
    "ENV_PREFIX",
    "AuditSettings",
    "EmbeddingSettings",
    "LoggingSettings",
    "MetricsSettings",
    "PathsSettings",
    "ProjectSettings",
    "ReviewerSettings",
    "ServiceSettings",
    "Settings",
    "SourcesSettings",
    "SummarySettings",
    "TrainingSettings",
    "ValidationSettings",
    "WatcherSettings",
    "changed_sections",
    "check_input_folders",
    "input_folders",
    "is_loopback",
    "load_settings",
    "parse_listen",
]

ENV_PREFIX = "TRAININGD_"
ENV_CONFIG = "TRAININGD_CONFIG"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True,
        case_sensitive=False,
    )

    paths: PathsSettings = PathsSettings()
    validation: ValidationSettings = ValidationSettings()
    sources: SourcesSettings = SourcesSettings()
    logging: LoggingSettings = LoggingSettings()
    watcher: WatcherSettings = WatcherSettings()
    service: ServiceSettings = ServiceSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    training: TrainingSettings = TrainingSettings()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    summary: SummarySettings = SummarySettings()
    reviewer: ReviewerSettings = ReviewerSettings()
    projects: dict[str, ProjectSettings] = Field(default_factory=dict)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _config_file: Path | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the TOML file arrives as init kwargs; the environment overrides it
        return (env_settings, init_settings)

    # -- resolved paths -------------------------------------------------------------------------

    @property
    def config_file(self) -> Path | None:
        return self._config_file

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    @property
    def data_root(self) -> Path:
        return self.resolve(self.paths.data_root)

    @property
    def decisions_dir(self) -> Path:
        p = self.paths.decisions_dir
        return self.resolve(p) if p else self.data_root / "training" / "ai_training_decisions"

    @property
    def state_db(self) -> Path:
        p = self.paths.state_db
        return self.resolve(p) if p else self.data_root / "daemon" / "state.db"

    @property
    def summaries_dir(self) -> Path:
        p = self.paths.summaries_dir
        return self.resolve(p) if p else self.data_root / "daily_summaries"

    @property
    def cache_dir(self) -> Path:
        p = self.paths.cache_dir
        return self.resolve(p) if p else self.data_root / "ai_data" / "cache"

    @property
    def models_dir(self) -> Path:
        p = self.paths.models_dir
        return self.resolve(p) if p else self.data_root / "ai_data" / "models"

    @property
    def reviewer_dir(self) -> Path:
        p = self.reviewer.models_dir
        return self.resolve(p) if p else self.data_root / "ai_data" / "models"

    @property
    def triggers_dir(self) -> Path:
        p = self.paths.triggers_dir
        return self.resolve(p) if p else self.data_root / "triggers"

    def project_db(self, name: str) -> Path:
        cfg = self.projects.get(name)
        if cfg is not None and cfg.db is not None:
            return self.resolve(cfg.db)
        return self.decisions_dir / f"{name}.db"

    def with_data_root(self, root: Path) -> Settings:
        """A copy whose runtime tree lives under ``root`` (the demo uses this)."""
        paths = self.paths.model_copy(update={
            "data_root": root.resolve(), "decisions_dir": None, "state_db": None,
            "summaries_dir": None, "cache_dir": None, "models_dir": None, "triggers_dir": None,
        })
        # the demo must never write into a real reviewer's folder
        reviewer = self.reviewer.model_copy(update={"models_dir": None})
        new = self.model_copy(update={"paths": paths, "reviewer": reviewer})
        new._base_dir, new._config_file = self._base_dir, self._config_file
        return new


def _folder_key(settings: Settings) -> str:
    """How the decisions folder was configured, for a message a person can act on."""
    if settings.paths.decisions_dir is not None:
        return f"paths.decisions_dir = {str(settings.paths.decisions_dir)!r}"
    return (f"paths.decisions_dir (unset: <data_root>/training/ai_training_decisions, "
            f"paths.data_root = {str(settings.paths.data_root)!r})")


def input_folders(settings: Settings, *, image_roots: bool = True) -> list[tuple[str, Path]]:
    """The folders trainingd reads but does not own, each with the config key that names it."""
    folders = [(_folder_key(settings), settings.decisions_dir)]
    if image_roots:
        for name, cfg in settings.projects.items():
            folders.extend((f"projects.{name}.image_roots[{i}] = {str(root)!r}",
                            settings.resolve(root)) for i, root in enumerate(cfg.image_roots))
    return folders


def check_input_folders(settings: Settings, *, image_roots: bool = True) -> list[Path]:
    """Refuse a missing decisions folder or image root (a typo'd path would otherwise pass every
    check with no projects), or create it when ``paths.create_missing`` says so.  Returns the
    folders created; raises :class:`ConfigError` naming the key and the path."""
    created: list[Path] = []
    origin = str(settings.config_file) if settings.config_file else "embedded defaults"
    for key, folder in input_folders(settings, image_roots=image_roots):
        if folder.is_dir():
            continue
        if folder.exists() or folder.is_symlink():
            raise ConfigError(f"config error: {origin}: {key}: {folder} is not a folder")
        if not settings.paths.create_missing:
            raise ConfigError(
                f"config error: {origin}: {key}: no such folder {folder}; fix the path, or set "
                "paths.create_missing = true to have it created")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"config error: {origin}: {key}: cannot create {folder}: "
                              f"{exc.strerror or exc}") from exc
        created.append(folder)
    return created


def changed_sections(old: Settings, new: Settings) -> list[str]:
    """The top-level sections whose values differ (a reload acts on these only)."""
    changed = [name for name in Settings.model_fields if getattr(old, name) != getattr(new, name)]
    if old.base_dir != new.base_dir:  # relative paths now resolve elsewhere
        changed += [n for n in ("paths", "embedding", "projects") if n not in changed]
    return changed


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p) for p in loc).upper()


def _describe(error: Any, origin: str) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    env = _env_name(loc)
    env_hit = next((k for k in os.environ if k.upper() == env), None)
    where = f"environment variable {env_hit}" if env_hit else origin
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key {key!r} = {value!r} (typo? see Documents/CONFIGURATION.md)"
    return f"{where}: {key} = {value!r}: {error['msg']}"


def _check_env_names() -> None:
    allowed = {name.upper() for name in Settings.model_fields}
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == ENV_CONFIG:
            continue
        section = upper[len(ENV_PREFIX):].split("__", 1)[0]
        if section not in allowed:
            raise ConfigError(
                f"config error: environment variable {name}: unknown key "
                f"{section.lower()!r} = {os.environ[name]!r} "
                f"(known sections: {', '.join(sorted(a.lower() for a in allowed))})"
            )


def load_settings(config: Path | str | None = None) -> Settings:
    """Load settings from ``config`` (or ``$TRAININGD_CONFIG``, or ``./config.toml`` if present,
    else the embedded defaults), with environment overrides.  Raises :class:`ConfigError`."""
    explicit = config is not None or ENV_CONFIG in os.environ
    if config is None:
        config = os.environ.get(ENV_CONFIG) or "config.toml"
    path = Path(config).expanduser().resolve()
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"config error: {path}: cannot read: {exc.strerror}") from exc
        origin, base, used = str(path), path.parent, path
    elif explicit:
        raise ConfigError(f"config error: {path}: no such config file")
    else:
        origin, base, used = "embedded defaults", Path.cwd(), None
    _check_env_names()
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        lines = [_describe(e, origin) for e in exc.errors()]
        raise ConfigError("config error: " + "\n  ".join(lines)) from None
    settings._base_dir = base
    settings._config_file = used
    return settings
