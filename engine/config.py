"""Settings: a TOML file, overridden by ``MEMCHAT_*`` variables, plus ``OPENAI_*``.

Precedence, highest first: explicit overrides passed to :func:`load_settings`,
``MEMCHAT_SECTION__KEY`` environment variables, ``OPENAI_API_KEY`` /
``OPENAI_BASE_URL``, the TOML file, built-in defaults.

The file is the first that exists of: ``--config PATH``, ``$MEMCHAT_CONFIG``,
``./config.toml``, ``<user config dir>/memchat/config.toml``. A path given
explicitly (flag or variable) must exist; the implicit ones are optional.

Trust (docs/security.md, "Hostile working directories"): a file found
implicitly may not redirect the model endpoint or the database
(:data:`REDIRECTING_KEYS`) unless it is the user config dir's file, owned by
this user (or root) and not group/world writable. ``./config.toml`` is never
trusted for those keys: it comes with whatever directory one is in (a cloned
repository), and its ``model.base_url`` would receive the user's own
``OPENAI_API_KEY``, chats and memories. Such a file is refused with one line
saying how to trust it: name it with ``--config``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from engine.errors import ConfigError
from engine.redact import redact_url, remember_secrets
from engine.validation import printable

ENV_PREFIX = "MEMCHAT_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV_VAR = "MEMCHAT_CONFIG"
APP_NAME = "memchat"
# The init kwarg that carries load_settings()'s overrides to the sources; not a
# valid settings key (a file's unknown top-level keys are refused before).
OVERRIDES_KWARG = "memchat overrides"


_NUMBERS = (int, float, int | None, float | None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # pydantic's lax mode reads true as 1 and false as 0: `coalesce_wait_ms =
    # true` would start with a 1 ms wait instead of telling the user the value
    # is not a number (red team, this session).
    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in _NUMBERS:
            raise ValueError("must be a number, not true or false")
        return value


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
    timeout: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds a request may wait for an answer; a streamed reply fails after this "
            "long without new reply text (reasoning alone does not count)."
        ),
    )
    max_retries: int = Field(default=2, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int = Field(
        default=2048, ge=1, le=1_000_000, description="Most tokens a chat reply may have."
    )
    context_tokens: int = Field(
        # gpt-4o-mini's window; local servers are often far smaller: set theirs.
        default=128_000,
        ge=256,
        le=10_000_000,
        description=(
            "The model's context window: system prompt, memories, history and the reply "
            "(max_tokens) are fitted into it, oldest history dropped first."
        ),
    )
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


def memory_model_settings(model: ModelSettings, memory: MemorySettings) -> ModelSettings:
    """The settings of the model that extracts memories: the chat model's, with the
    ``[memory]`` overrides. The chat key goes only to the chat endpoint: a memory
    endpoint of its own gets ``memory.api_key`` or none."""
    own_endpoint = memory.base_url is not None and memory.base_url != model.base_url
    provider = model.provider
    if own_endpoint and provider != "offline":
        provider = "openai"
    return model.model_copy(
        update={
            "provider": provider,
            "name": memory.model or model.name,
            "base_url": memory.base_url if own_endpoint else model.base_url,
            "api_key": memory.api_key if own_endpoint else (memory.api_key or model.api_key),
            "max_tokens": memory.max_tokens,
            "timeout": memory.timeout or model.timeout,
        }
    )


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
    context_limit: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description=(
            "Most memories in a chat or extraction prompt: those most relevant to the turn "
            "(full-text search), the newest filling the rest (engine/recall.py)."
        ),
    )
    extraction: Literal["auto", "tools", "json"] = Field(
        default="auto",
        description=(
            "How the model is asked for memory changes: tools (function calls), json (one "
            "JSON object), or auto: tools, switching to json for an endpoint that refuses "
            "or ignores them."
        ),
    )
    model: str | None = Field(
        default=None, min_length=1, description="Model for extraction. Unset: model.name."
    )
    base_url: str | None = Field(
        default=None, description="Endpoint for extraction. Unset: model.base_url."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Key for memory.base_url. Unset: model.api_key (when base_url is unset too).",
    )
    max_tokens: int = Field(
        default=512, ge=16, le=1_000_000, description="Most tokens an extraction answer may have."
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds per extraction request. Unset: model.timeout."
    )
    max_calls_per_job: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="Changes applied from one answer; the rest are refused.",
    )
    max_per_user: int = Field(
        default=1000, ge=1, le=1_000_000, description="Memories a user may have; more adds refused."
    )
    pause_while_streaming: bool = Field(
        default=False,
        description=(
            "Hold extraction requests while a chat reply streams in this process: for "
            "single-slot local servers (llama.cpp), so replies never wait behind memory jobs."
        ),
    )
    concurrency: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description=(
            "Most memory jobs one process runs at once (each job holds a connection only "
            "briefly); an endpoint's 429s halve it for a while."
        ),
    )
    coalesce_turns: int = Field(
        default=8,
        ge=1,
        le=100,
        description=(
            "Most turns of one user one extraction call covers: a job takes the user's "
            "later queued turns along (1: one call per turn)."
        ),
    )
    coalesce_wait_ms: int = Field(
        default=300,
        ge=0,
        le=10_000,
        description=(
            "A memory job whose user has a turn under way in this process waits up to this "
            "long for that turn's reply, so that one extraction call covers both "
            "(0: never waits)."
        ),
    )
    optimize_threshold: int = Field(
        default=200,
        ge=0,
        le=1_000_000,
        description=(
            "A user whose memories pass this many gets them consolidated in the background "
            "(`memchat memory optimize`) by the memory workers; 0: never."
        ),
    )
    embeddings_model: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Embeddings model (OpenAI-compatible /v1/embeddings): memories get vectors "
            "(pgvector) and prompts rank them by similarity too. Unset: full text only."
        ),
    )
    embeddings_base_url: str | None = Field(
        default=None, description="Endpoint for embeddings. Unset: the memory endpoint."
    )
    embeddings_api_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key for memory.embeddings_base_url. Unset: the memory endpoint's key "
            "(when embeddings_base_url is unset too)."
        ),
    )
    embeddings_timeout: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description=(
            "Seconds a turn waits for its text's vector; slower or failing, the turn uses "
            "full text (and so do the turns of the next 30 s)."
        ),
    )
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
    max_reply_chars: int = Field(
        default=50_000, ge=1, description="A longer model reply is cut there and marked."
    )
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

    theme: str | None = Field(
        default=None,
        min_length=1,
        description="The app's colour theme (ctrl+p: Change theme saves it). Unset: Textual's.",
    )

    @field_validator("users")
    @classmethod
    def _not_empty(cls, users: list[str]) -> list[str]:
        if not users:
            raise ValueError("at least one user is needed")
        return users


class ServeSettings(_Section):
    """`memchat serve` (engine/web): one app process per browser tab."""

    max_sessions: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="Concurrent app processes (browser tabs); one more gets a refusal page.",
    )
    tabs_per_link: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Tabs one link may hold at once: one link can never take every tab.",
    )
    pool_max_size: int = Field(
        default=3, ge=1, le=100, description="Database connections per tab (plus one LISTEN)."
    )
    shutdown_timeout: float = Field(
        default=5.0, gt=0, le=600, description="Seconds to stop the tabs and the worker."
    )


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
    serve: ServeSettings = Field(default_factory=ServeSettings)

    # Where the settings came from, for `memchat doctor` and error messages.
    config_file: Path | None = Field(default=None, exclude=True)
    config_how: str | None = Field(default=None, exclude=True)

    def source_line(self) -> str:
        """The settings file in use, for start lines: which file, and how it was found."""
        if self.config_file is None:
            return "settings: no file (defaults and environment)"
        return f"settings: {self.config_file} ({self.config_how or 'given'})"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Everything per call arrives through this call's init kwargs (see
        # load_settings): the TOML data, read by us so that parse errors name the
        # file, and under OVERRIDES_KWARG the explicit overrides, split off here
        # into a layer of their own above the environment. No state outside the
        # call, so loads may run concurrently or nest.
        assert isinstance(init_settings, InitSettingsSource)
        file_data = dict(init_settings.init_kwargs)
        overrides = file_data.pop(OVERRIDES_KWARG, None) or {}
        return (
            InitSettingsSource(settings_cls, dict(overrides)),
            env_settings,
            _OpenAIEnvSource(settings_cls),
            InitSettingsSource(settings_cls, file_data),
        )

    def user_data_dir(self) -> Path:
        """memchat's own files (generated credentials for an external database)."""
        return Path(platformdirs.user_data_dir(APP_NAME))

    def data_dir(self) -> Path:
        if self.database.data_dir is not None:
            return self.database.data_dir.expanduser()
        return Path(platformdirs.user_data_dir(APP_NAME)) / "pgdata"


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


# Settings that decide where chats, memories and the API key go, or which
# database (and so which server and its configuration) runs.
REDIRECTING_KEYS: tuple[tuple[str, str], ...] = (
    ("model", "base_url"),
    # Extraction requests carry every turn: another endpoint for them is a redirect too.
    ("memory", "base_url"),
    # So do embeddings requests (the turn's text, every memory).
    ("memory", "embeddings_base_url"),
    ("database", "url"),
    ("database", "app_url"),
    ("database", "admin_url"),
    ("database", "worker_url"),
    ("database", "data_dir"),
)


@dataclass(frozen=True, slots=True)
class ConfigSource:
    path: Path
    how: Literal["--config", "MEMCHAT_CONFIG", "current directory", "user config dir"]

    @property
    def explicit(self) -> bool:
        return self.how in ("--config", "MEMCHAT_CONFIG")


def user_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def locate_config_file(explicit: str | os.PathLike[str] | None = None) -> ConfigSource | None:
    """The settings file to read and how it was found, or None (defaults apply)."""
    if explicit is not None:
        return ConfigSource(Path(explicit).expanduser(), "--config")
    if from_env := os.environ.get(CONFIG_ENV_VAR):
        return ConfigSource(Path(from_env).expanduser(), "MEMCHAT_CONFIG")
    user_file = user_config_path()
    here = Path("config.toml")
    if here.is_file():
        if _same_file(here, user_file):
            return ConfigSource(user_file, "user config dir")
        return ConfigSource(here, "current directory")
    if user_file.is_file():
        return ConfigSource(user_file, "user config dir")
    return None


def theme_file(settings: Settings) -> Path | None:
    """Where the app may save the theme picked in it, or None (it may not).

    Only the user's own settings file: when it is the file in use, or when no
    settings file is in use and it does not exist yet. Never a file given with
    --config or MEMCHAT_CONFIG, nor an implicit ./config.toml (the app would be
    writing into whatever directory it was started from).
    """
    user_file = user_config_path()
    if settings.config_file is None:
        return None if user_file.exists() else user_file
    if settings.config_how == "user config dir" and _same_file(settings.config_file, user_file):
        return user_file
    return None


def save_theme(path: Path, theme: str) -> None:
    """Set ``[ui] theme`` in the settings file at ``path``, keeping the rest of it as written.

    Raises OSError when the file cannot be read or written, ValueError when it
    holds TOML this edit cannot change safely (the file is left as it was).
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    line = f"theme = {_toml_string(theme)}"
    lines = text.splitlines()
    header = next((i for i, x in enumerate(lines) if x.strip() == "[ui]"), None)
    if header is None:
        new = text + ("\n" if text and not text.endswith("\n") else "") + f"\n[ui]\n{line}\n"
    else:
        end = next(
            (i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")),
            len(lines),
        )
        at = next(
            (i for i in range(header + 1, end) if lines[i].split("=")[0].strip() == "theme"),
            None,
        )
        if at is None:
            lines.insert(header + 1, line)
        else:
            lines[at] = line
        new = "\n".join(lines) + "\n"
    try:
        data = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    if data.get("ui", {}).get("theme") != theme or (
        text and {k: v for k, v in data.items() if k != "ui"} != _without_ui(tomllib.loads(text))
    ):
        raise ValueError(f"{path}: cannot set ui.theme in it safely")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(new)
    os.replace(temporary, path)


def _without_ui(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "ui"}


def _toml_string(text: str) -> str:
    escaped = "".join(
        {'"': '\\"', "\\": "\\\\"}.get(c, c)
        if ord(c) >= 0x20 and c != "\x7f"
        else f"\\u{ord(c):04X}"
        for c in text
    )
    return f'"{escaped}"'


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The settings file to read, or None when there is none (defaults apply)."""
    source = locate_config_file(explicit)
    return source.path if source is not None else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def check_trusted(source: ConfigSource, data: Mapping[str, Any]) -> None:
    """Refuse an implicitly found file that redirects the model or the database."""
    if source.explicit:
        return
    redirects = [
        f"{section}.{key}"
        for section, key in REDIRECTING_KEYS
        if isinstance(data.get(section), dict) and key in data[section]
    ]
    if not redirects:
        return
    what = " and ".join(redirects)
    trust = f"if you trust it, name it: memchat --config {source.path} (or MEMCHAT_CONFIG)"
    if source.how == "current directory":
        raise ConfigError(
            f"{source.path}: sets {what}, and a settings file found in the current directory "
            f"may not redirect the model or the database; {trust}"
        )
    problem = _ownership_problem(source.path)
    if problem is not None:
        raise ConfigError(
            f"{source.path}: sets {what} but is {problem}, so it is not trusted; "
            f"fix it (chown, chmod go-w) or {trust}"
        )


def _ownership_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if info.st_uid not in (os.getuid(), 0):
        return f"owned by uid {info.st_uid}, not you"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others"
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
    source = locate_config_file(config)
    path = source.path if source is not None else None
    file_data = read_toml(path) if path is not None else {}
    if source is not None:
        check_trusted(source, file_data)
    for key in file_data:
        if key not in Settings.model_fields or key in ("config_file", "config_how"):
            raise ConfigError(f"{path}: {_shown_key(key)}: unknown setting")
    init: dict[str, Any] = {**file_data, OVERRIDES_KWARG: dict(overrides or {})}
    try:
        settings = Settings(**init)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from None
    settings.config_file = path
    settings.config_how = source.how if source is not None else None
    # From here on, this process scrubs these values from all it shows and logs.
    remember_secrets(settings)
    _refuse_credentials_in_base_url(settings, path)
    return settings


def _refuse_credentials_in_base_url(settings: Settings, path: Path | None) -> None:
    # The OpenAI client sends the API key as a Bearer token and ignores a
    # URL's user:password@, so every request would fail (as "malformed
    # response"): better one line at start than a failure per turn.
    base_url = settings.model.base_url
    if not base_url:
        return
    rest = base_url.split("://", 1)[-1]
    if "@" not in rest.split("/", 1)[0] and "@" not in rest.split("?", 1)[0]:
        return
    for origin in ("MEMCHAT_MODEL__BASE_URL", "OPENAI_BASE_URL"):
        if os.environ.get(origin):
            where = f"environment variable {origin}"
            break
    else:
        where = str(path) if path is not None else "settings"
    raise ConfigError(
        f"{where}: model.base_url {redact_url(base_url, keep_user=False)} carries credentials "
        "(user:password@), which are not sent; remove them and put the key in "
        "OPENAI_API_KEY or model.api_key"
    )


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
    # Field names are lower case: a key in any other case can only be the file's.
    if env_name in os.environ and all(part == part.lower() for part in loc):
        return f"environment variable {env_name}"
    return str(path) if path is not None else "settings"


def _shown_key(key: str) -> str:
    # Keys come from the file: escaped, on one line, without printable()'s quotes.
    return printable(key, limit=40)[1:-1]


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
