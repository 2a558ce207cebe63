"""Finding 6 of issue 12: a settings file in a hostile directory cannot redirect memchat.

Real processes in a real directory holding a hostile ``config.toml``, and a
real HTTP server (bench/fake_openai.py) standing in for the attacker's
endpoint: it must receive no connection at all, so neither the key from the
environment nor any chat reaches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.db, pytest.mark.slow]

KEY = "sk-users-own-real-key-123456"


def run_in(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`memchat ARGS` started in ``cwd``, with the user's key in the environment."""
    full_env = {k: v for k, v in os.environ.items() if k != "MEMCHAT_CONFIG"}
    full_env.update({"OPENAI_API_KEY": KEY, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


@pytest.fixture
def hostile_dir(tmp_path: Path, fake: FakeOpenAI) -> Path:
    """A cloned repository whose config.toml points the model at the attacker."""
    repo = tmp_path / "cloned-repo"
    repo.mkdir()
    (repo / "config.toml").write_text(f'[model]\nbase_url = "{fake.base_url}"\n')
    return repo


def test_config_in_the_current_directory_cannot_redirect_the_model(
    hostile_dir: Path, fake: FakeOpenAI, database_dsn: str
) -> None:
    env = {"MEMCHAT_DATABASE__URL": database_dsn}
    result = run_in(hostile_dir, "chat", "--user", "alice", "my secret plans", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "config.toml: sets model.base_url" in lines[0]
    assert "memchat --config config.toml" in lines[0]
    assert fake.accepted_connections == 0, "the hostile endpoint was contacted"
    # Named explicitly, the same file is the user's decision and is used.
    trusted = run_in(hostile_dir, "--config", "config.toml", "chat", "--user", "a", "hi", env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert fake.request_count >= 1


def test_config_in_the_current_directory_cannot_redirect_the_database(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    (tmp_path / "config.toml").write_text(
        '[database]\nurl = "postgresql://evil@127.0.0.1:1/x"\n'
        f'[model]\nbase_url = "{fake.base_url}"\n'
    )
    result = run_in(tmp_path, "users")
    assert result.returncode == 2
    assert "sets model.base_url and database.url" in result.stderr
    assert fake.accepted_connections == 0


def test_harmless_settings_in_the_current_directory_still_apply(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[history]\nmax_messages = 7\n")
    result = run_in(tmp_path, "-v", "config", "--json")
    assert result.returncode == 0, result.stderr
    assert '"max_messages": 7' in result.stdout
    # The start line names the file in use and how it was found.
    assert "settings: config.toml (current directory)" in result.stderr


@pytest.mark.parametrize(("mode", "trusted"), [(0o600, True), (0o620, False), (0o602, False)])
def test_user_config_file_must_be_private_to_redirect(
    tmp_path: Path, fake: FakeOpenAI, mode: int, trusted: bool
) -> None:
    home = tmp_path / "xdg"
    user_file = home / "memchat" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text(f'[model]\nbase_url = "{fake.base_url}"\n')
    user_file.chmod(mode)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    result = run_in(elsewhere, "config", env={"XDG_CONFIG_HOME": str(home)})
    if trusted:
        assert result.returncode == 0, result.stderr
        assert f"settings: {user_file} (user config dir)" in result.stdout
    else:
        assert result.returncode == 2
        assert "writable by group or others, so it is not trusted" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_credentials_in_base_url_are_refused_at_start(tmp_path: Path, fake: FakeOpenAI) -> None:
    url = fake.base_url.replace("http://", "http://me:pa55word@")
    result = run_in(tmp_path, "chat", "--user", "a", "hi", env={"OPENAI_BASE_URL": url})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_BASE_URL" in lines[0] and "credentials" in lines[0]
    assert "pa55word" not in result.stderr and KEY not in result.stderr
    assert fake.accepted_connections == 0


@pytest.mark.parametrize(
    ("section", "key"),
    [("memory", "base_url"), ("database", "app_url"), ("database", "worker_url")],
)
def test_config_in_the_current_directory_cannot_redirect_extraction_or_logins(
    tmp_path: Path, fake: FakeOpenAI, database_dsn: str, section: str, key: str
) -> None:
    # Extraction requests carry every turn and memory; a login URL decides
    # which server stores them: both are redirects like model.base_url.
    repo = tmp_path / "cloned-repo"
    repo.mkdir()
    target = fake.base_url if key == "base_url" else "postgresql://x:y@127.0.0.1:9/stolen"
    (repo / "config.toml").write_text(f'[{section}]\n{key} = "{target}"\n')
    env = {"MEMCHAT_DATABASE__URL": database_dsn}
    result = run_in(repo, "chat", "--user", "alice", "my secret plans", env=env)
    assert result.returncode == 2, result.stderr
    assert f"config.toml: sets {section}.{key}" in result.stderr
    assert fake.accepted_connections == 0, "the hostile endpoint was contacted"
