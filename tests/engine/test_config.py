"""Settings: file, environment, precedence, and one clear line for every mistake."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.config import load_settings, user_config_path
from engine.errors import ConfigError


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    """Set variables for one test, restoring the environment afterwards."""
    saved = dict(os.environ)
    yield os.environ  # type: ignore[misc]
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_without_any_file(in_tmp: Path) -> None:
    settings = load_settings()
    assert settings.config_file is None
    assert settings.database.url is None
    assert settings.model.resolved_provider == "offline"
    assert settings.ui.users == ["user_1@example.com", "user_2@example.com", "user_3@example.com"]


def test_file_then_env_override(in_tmp: Path, env: dict[str, str]) -> None:
    config = in_tmp / "my.toml"
    config.write_text(
        '[database]\nurl = "postgresql://u:pw@db.example:5432/m"\npool_max_size = 5\n'
        "[memory]\nconcurrency = 3\n"
    )
    env["MEMCHAT_MEMORY__CONCURRENCY"] = "9"
    settings = load_settings(config)
    assert settings.config_file == config
    assert settings.database.pool_max_size == 5
    assert settings.memory.concurrency == 9
    assert settings.database.url is not None
    assert "pw" not in repr(settings)


def test_explicit_overrides_beat_environment(in_tmp: Path, env: dict[str, str]) -> None:
    env["MEMCHAT_UI__USERS"] = '["a", "b"]'
    assert load_settings().ui.users == ["a", "b"]
    assert load_settings(overrides={"ui": {"users": ["c"]}}).ui.users == ["c"]


def test_overrides_belong_to_their_call(in_tmp: Path) -> None:
    # Loads in several threads at once each get their own overrides, and none
    # is left behind for the next load without any.
    def load(n: int) -> int:
        return load_settings(overrides={"history": {"max_messages": n}}).history.max_messages

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(load, range(1, 200))) == list(range(1, 200))
    assert load_settings().history.max_messages == 20


def test_lookup_order(in_tmp: Path, env: dict[str, str]) -> None:
    user_file = user_config_path()
    user_file.parent.mkdir(parents=True, exist_ok=True)
    user_file.write_text("[history]\nmax_messages = 1\n")
    try:
        assert load_settings().history.max_messages == 1
        (in_tmp / "config.toml").write_text("[history]\nmax_messages = 2\n")
        assert load_settings().history.max_messages == 2
        (in_tmp / "env.toml").write_text("[history]\nmax_messages = 3\n")
        env["MEMCHAT_CONFIG"] = str(in_tmp / "env.toml")
        assert load_settings().history.max_messages == 3
        (in_tmp / "flag.toml").write_text("[history]\nmax_messages = 4\n")
        assert load_settings(in_tmp / "flag.toml").history.max_messages == 4
    finally:
        user_file.unlink()


def test_openai_variables(in_tmp: Path, env: dict[str, str]) -> None:
    env["OPENAI_API_KEY"] = "sk-test-secret"
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:9/v1"
    settings = load_settings()
    assert settings.model.resolved_provider == "openai"
    assert settings.model.base_url == "http://127.0.0.1:9/v1"
    assert settings.model.api_key is not None
    assert settings.model.api_key.get_secret_value() == "sk-test-secret"
    assert "sk-test-secret" not in repr(settings)
    env["MEMCHAT_MODEL__BASE_URL"] = "http://127.0.0.1:10/v1"
    assert load_settings().model.base_url == "http://127.0.0.1:10/v1"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[memory\n", "invalid TOML"),
        ("[memory]\nconcurrency = 'many'\n", "memory.concurrency: Input should be a valid integer"),
        ("[memory]\nconcurency = 2\n", "memory.concurency: unknown setting"),
        ("[nonsense]\nx = 1\n", "nonsense: unknown setting"),
        ("[model]\nprovider = 'gpt'\n", "model.provider"),
        ("[database]\npool_max_size = 0\n", "database.pool_max_size"),
        ("[ui]\nusers = []\n", "ui.users"),
    ],
)
def test_bad_file_gives_one_line_naming_file_and_key(
    in_tmp: Path, content: str, expected: str
) -> None:
    config = in_tmp / "bad.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = str(info.value)
    assert str(config) in message
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_bad_environment_names_the_variable(in_tmp: Path, env: dict[str, str]) -> None:
    env["MEMCHAT_MEMORY__MAX_ATTEMPTS"] = "lots"
    with pytest.raises(ConfigError, match="environment variable MEMCHAT_MEMORY__MAX_ATTEMPTS"):
        load_settings()


@pytest.mark.parametrize("problem", ["missing", "directory", "binary", "unreadable"])
def test_unusable_file(in_tmp: Path, problem: str) -> None:
    path = in_tmp / "c.toml"
    if problem == "directory":
        path.mkdir()
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif problem == "unreadable":
        path.write_text("")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: use a path through a file
            path = in_tmp / "c.toml" / "nested.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_example_file_lists_every_setting_with_its_default(in_tmp: Path) -> None:
    import re
    import tomllib

    from engine.config import Settings

    example = Path(__file__).parents[2] / "config.example.toml"
    uncommented = re.sub(r"(?m)^# (\w+ = .*)$", r"\1", example.read_text())
    data = tomllib.loads(uncommented)
    defaults = Settings().model_dump(mode="json", exclude={"config_file"})
    # The example shows a placeholder where the default is "unset".
    placeholders = {
        ("database", "url"),
        ("database", "app_url"),
        ("database", "admin_url"),
        ("database", "worker_url"),
        ("database", "data_dir"),
        ("model", "api_key"),
        ("model", "base_url"),
        ("model", "temperature"),
        ("memory", "model"),
        ("memory", "base_url"),
        ("memory", "api_key"),
        ("memory", "timeout"),
        ("memory", "embeddings_model"),
        ("memory", "embeddings_base_url"),
        ("memory", "embeddings_api_key"),
        ("ui", "theme"),
    }
    assert set(data) == set(defaults)
    for section, values in defaults.items():
        assert set(data[section]) == set(values), section
        for key, value in values.items():
            if (section, key) not in placeholders:
                assert data[section][key] == value, f"{section}.{key}"
    (in_tmp / "ex.toml").write_text(uncommented.replace('api_key = "sk-..."', ""))
    assert load_settings(in_tmp / "ex.toml").model.api_key is None


def test_memchat_config_prints_real_toml_that_loads_back(tmp_path: Path) -> None:
    """`memchat config` looked like TOML but was not (`url = None`, Python reprs)."""
    import subprocess
    import sys
    import tomllib

    source = tmp_path / "mine.toml"
    source.write_text(
        "[agent]\n"
        'system_prompt = "Say \\"hi\\"\\n\\tthen \\\\ go \\u00e9 \\u0001 \\u007f"\n'
        "[model]\n"
        'api_key = "sk-very-secret"\n'
        "temperature = 0.5\n"
        "[memory]\n"
        "add_to_context = false\n"
        "[ui]\n"
        'users = ["a@example.com", "b \\"quoted\\"@example.com"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMCHAT_", "OPENAI_"))} | {
        "MEMCHAT_DATABASE__URL": "postgresql://me:hunter2@db.example:5432/m"
    }
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--config", str(source), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret" not in result.stdout and "hunter2" not in result.stdout
    assert "None" not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert "url" not in printed["database"] and "api_key" not in printed["model"]
    assert "resolved_provider" not in printed["model"]

    again = tmp_path / "again.toml"
    again.write_text(result.stdout)
    os.environ.pop("MEMCHAT_CONFIG", None)
    reloaded = load_settings(again)
    original = load_settings(source)
    for section in ("agent", "history", "memory", "limits", "ui"):
        assert getattr(reloaded, section) == getattr(original, section), section
    assert reloaded.model.temperature == 0.5
    assert reloaded.model.model_dump(exclude={"api_key"}) == original.model.model_dump(
        exclude={"api_key"}
    )
    assert reloaded.database.url is None and reloaded.data_dir() == original.data_dir()


def test_theme_is_saved_only_in_the_users_own_settings_file(
    in_tmp: Path, env: dict[str, str]
) -> None:
    from engine.config import save_theme, theme_file

    env.pop("MEMCHAT_CONFIG", None)
    env["XDG_CONFIG_HOME"] = str(in_tmp / "xdg")
    mine = user_config_path()
    # No settings file at all: the user's file may be created.
    assert theme_file(load_settings()) == mine
    save_theme(mine, "nord")
    assert load_settings().ui.theme == "nord"
    assert oct(mine.stat().st_mode & 0o777) == "0o600"
    # The user's file in use: updated in place, everything else kept as written.
    mine.write_text('# mine\n[model]\nname = "x" # keep\n\n[ui]\nusers = ["a"]\ntheme = "old"\n')
    assert theme_file(load_settings()) == mine
    save_theme(mine, 'gruvbox "q"')
    text = mine.read_text()
    assert text.startswith('# mine\n[model]\nname = "x" # keep\n') and "old" not in text
    loaded = load_settings()
    assert loaded.ui.theme == 'gruvbox "q"' and loaded.ui.users == ["a"]
    # Never an implicit ./config.toml, nor a file given explicitly.
    (in_tmp / "config.toml").write_text("")
    assert theme_file(load_settings()) is None
    assert theme_file(load_settings(in_tmp / "config.toml")) is None
    # A [ui] table this edit cannot change safely is left alone.
    odd = in_tmp / "odd.toml"
    odd.write_text('ui.theme = "x"\n')
    with pytest.raises(ValueError):
        save_theme(odd, "nord")
    assert odd.read_text() == 'ui.theme = "x"\n'
