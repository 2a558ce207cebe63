"""Settings: a TOML file, overridden by ``MEMCHAT_*`` variables, plus ``OPENAI_*``.

Precedence, highest first: explicit overrides passed to :func:`load_settings`,
``MEMCHAT_SECTION__KEY`` environment variables, ``OPENAI_API_KEY`` /
``OPENAI_BASE_URL``, the TOML file, built-in defaults.

The file is the first that exists of: ``--config PATH``, ``$MEMCHAT_CONFIG``,
``./config.toml``, ``<user config dir>/memchat/config.toml``. A path given
explicitly (flag or variable) must exist; the implicit ones are optional.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from engine.errors import ConfigError
from engine.validation import printable

ENV_PREFIX = "MEMCHAT_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV_VAR = "MEMCHAT_CONFIG"
APP_NAME = "memchat"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatabaseSettings(_Section):
    url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL DSN. Unset: an embedded PostgreSQL in data_dir is used.",
    )
    app_url: SecretStr | None = Field(
        default=None,
        description="Login for the app's pool (a role without superuser, BYPASSRLS, "
        "CREATEROLE). Unset: memchat creates memchat_app_<database>.",
    )
    admin_url: SecretStr | None = Field(
        default=None,
        description="Login for the read-only admin path. Unset: memchat_admin_<database>.",
    )
    worker_url: SecretStr | None = Field(
        default=None,
        description="Login for the job queue. Unset: memchat_worker_<database>.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Where the embedded PostgreSQL keeps its files. Unset: the user data dir.",
    )
    pool_min_size: int = Field(default=2, ge=1, le=1000)
    pool_max_size: int = Field(default=20, ge=1, le=1000)
    command_timeout: float = Field(default=30.0, gt=0, description="Seconds per SQL statement.")
    connect_timeout: float = Field(default=10.0, gt=0)


class ModelSettings(_Section):
    provider: Literal["auto", "offline", "openai"] = Field(
        default="auto",
        description="auto: openai when an API key or base URL is set, else offline.",
    )
    name: str = Field(default="gpt-4o-mini", min_length=1)
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout: float = Field(default=60.0, gt=0, description="Seconds per model request.")
    max_retries: int = Field(default=2, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    offline_token_delay_ms: float = Field(
        default=0.0, ge=0, le=5000, description="Pause between offline model deltas."
    )
    offline_latency_ms: float = Field(
        default=0.0,
        ge=0,
        le=600_000,
        description="Simulated latency of each offline model call (first delta, tool calls).",
    )

    @property
    def resolved_provider(self) -> Literal["offline", "openai"]:
        if self.provider != "auto":
            return self.provider
        return "openai" if (self.api_key or self.base_url) else "offline"


class AgentSettings(_Section):
    system_prompt: str = Field(
        default=(
            "You are memchat, a friendly and concise assistant. "
            "Use what you know about the user when it helps."
        ),
        min_length=1,
    )


class HistorySettings(_Section):
    max_messages: int = Field(default=20, ge=0, le=10_000)


class MemorySettings(_Section):
    add_to_context: bool = True
    concurrency: int = Field(default=64, ge=1, le=10_000)
    max_attempts: int = Field(default=3, ge=1, le=100)
    drain_timeout: float = Field(default=5.0, ge=0)
    # At most the database's memchat_queue_limits.max_lease_seconds (3600), which
    # the claim enforces: a longer lease would be cut to it.
    lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    retry_delay: float = Field(
        default=1.0, ge=0, description="First retry delay in seconds; doubles each attempt."
    )


class LimitSettings(_Section):
    max_message_chars: int = Field(default=100_000, ge=1)
    max_memory_chars: int = Field(default=500, ge=1)
    max_title_chars: int = Field(default=200, ge=1)


class UISettings(_Section):
    users: list[str] = Field(
        default_factory=lambda: [
            "user_1@example.com",
            "user_2@example.com",
            "user_3@example.com",
        ]
    )

    @field_validator("users")
    @classmethod
    def _not_empty(cls, users: list[str]) -> list[str]:
        if not users:
            raise ValueError("at least one user is needed")
        return users


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        # Top-level extras are ignored because MEMCHAT_CONFIG, MEMCHAT_TEST_DSN
        # and friends share the prefix; unknown top-level keys in the file are
        # rejected by load_settings, and every section forbids unknown keys.
        extra="ignore",
        validate_default=True,
    )

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    ui: UISettings = Field(default_factory=UISettings)

    # Where the settings came from, for `memchat doctor` and error messages.
    config_file: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML data arrives through init kwargs (see load_settings) so that
        # we can report parse errors with the file name ourselves.
        return (
            _OverridesSource(settings_cls),
            env_settings,
            _OpenAIEnvSource(settings_cls),
            init_settings,
        )

    def user_data_dir(self) -> Path:
        """memchat's own files (generated credentials for an external database)."""
        return Path(platformdirs.user_data_dir(APP_NAME))

    def data_dir(self) -> Path:
        if self.database.data_dir is not None:
            return self.database.data_dir.expanduser()
        return Path(platformdirs.user_data_dir(APP_NAME)) / "pgdata"


class _OverridesSource(InitSettingsSource):
    """Explicit overrides (CLI flags), above the environment."""

    overrides: Mapping[str, Any] = {}

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, dict(_OverridesSource.overrides))


class _OpenAIEnvSource(PydanticBaseSettingsSource):
    """The OpenAI client's own variables, so existing setups just work."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        model: dict[str, str] = {}
        if key := os.environ.get("OPENAI_API_KEY"):
            model["api_key"] = key
        if base := os.environ.get("OPENAI_BASE_URL"):
            model["base_url"] = base
        return {"model": model} if model else {}


def user_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The settings file to read, or None when there is none (defaults apply)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if from_env := os.environ.get(CONFIG_ENV_VAR):
        return Path(from_env).expanduser()
    for candidate in (Path("config.toml"), user_config_path()):
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read settings file: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


def load_settings(
    config: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read settings; every problem becomes one :class:`ConfigError` line."""
    path = find_config_file(config)
    file_data = read_toml(path) if path is not None else {}
    for key in file_data:
        if key not in Settings.model_fields or key == "config_file":
            raise ConfigError(f"{path}: {_shown_key(key)}: unknown setting")
    _OverridesSource.overrides = dict(overrides or {})
    try:
        settings = Settings(**file_data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from None
    finally:
        _OverridesSource.overrides = {}
    settings.config_file = path
    return settings


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(_shown_key(part) for part in loc) or "(root)"
        origin = _origin_of(loc, path)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif "input" in error and error["type"] not in ("missing",):
            message = f"{message} (got {_short_repr(error['input'])})"
        lines.append(f"{origin}: {key}: {message}")
    return "; ".join(lines)


def _origin_of(loc: list[str], path: Path | None) -> str:
    env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(part.upper() for part in loc)
    if env_name in os.environ:
        return f"environment variable {env_name}"
    return str(path) if path is not None else "settings"


def _shown_key(key: str) -> str:
    # Keys come from the file: escaped, on one line, without printable()'s quotes.
    return printable(key, limit=40)[1:-1]


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
