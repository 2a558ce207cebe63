"""The `memchat` command, run as a user would: a subprocess, real database, real HTTP."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.db, pytest.mark.slow]

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_chat_offline_then_sessions_and_history(memchat: Run) -> None:
    first = memchat("chat", "--user", "alice@example.com", "My name is Alice.")
    assert first.returncode == 0, first.stderr
    assert "Alice" in first.stdout
    again = memchat("chat", "--user", "alice@example.com", "--json", "hello again")
    result = json.loads(again.stdout)
    assert result["status"] == "complete" and result["user_id"] == "alice@example.com"

    sessions = json.loads(memchat("sessions", "--user", "alice@example.com", "--json").stdout)
    assert len(sessions) == 1, "without --session the latest session continues"
    assert sessions[0]["session_id"] == result["session_id"]
    assert sessions[0]["messages"] == 4
    assert sessions[0]["title"] == "My name is Alice."

    new = json.loads(
        memchat("chat", "--user", "alice@example.com", "--new-session", "--json", "hi").stdout
    )
    assert new["session_id"] != result["session_id"]

    history = memchat("history", "--user", "alice@example.com", "--session", result["session_id"])
    assert history.returncode == 0
    assert "My name is Alice." in history.stdout and "hello again" in history.stdout
    table = memchat("sessions", "--user", "alice@example.com")
    assert table.stdout.splitlines()[0].split() == ["SESSION", "UPDATED", "MESSAGES", "TITLE"]


def test_chat_reads_stdin(memchat: Run) -> None:
    result = memchat("chat", "--user", "bob", "--json", "-", stdin="from a pipe\n")
    assert json.loads(result.stdout)["reply"]


def test_chat_against_an_openai_compatible_server(memchat: Run, fake: FakeOpenAI) -> None:
    result = memchat(
        "chat",
        "--user",
        "alice",
        "hello server",
        env={"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-cli-secret"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Echo: hello server"
    chat, extraction = fake.requests
    assert chat["stream"] is True
    assert {t["function"]["name"] for t in extraction["tools"]} >= {"add_memory"}


def test_model_failure_exits_1_and_keeps_the_message(memchat: Run, fake: FakeOpenAI) -> None:
    fake.fail_next("500", count=10)
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-cli-secret",
        "MEMCHAT_MODEL__MAX_RETRIES": "0",
    }
    result = memchat("chat", "--user", "alice", "--json", "hello", env=env)
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["status"] == "failed" and body["error"]
    assert "sk-cli-secret" not in result.stdout + result.stderr
    history = json.loads(
        memchat("history", "--user", "alice", "--session", body["session_id"], "--json").stdout
    )
    assert history["messages"][0]["content"] == "hello"


def test_control_sequences_are_printed_escaped(memchat: Run) -> None:
    result = memchat("chat", "--user", "alice", "\x1b[2J\x1b]0;pwned\x07 [bold]hi[/bold]")
    assert result.returncode == 0
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout and "[bold]hi[/bold]" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["chat", "--user", "bad id", "hi"], 2, "invalid user id"),
        (["chat", "--user", "alice", ""], 2, "message is empty"),
        (["chat", "--user", "alice", "--session", "nope", "hi"], 2, "invalid session id"),
        (
            ["chat", "--user", "alice", "--session", "00000000-0000-0000-0000-000000000000", "x"],
            3,
            "no session",
        ),
        (["history", "--user", "alice", "--session", "x"], 2, "invalid session id"),
        (["history", "--user", "a", "--session", "x", "--limit", "0"], 2, "--limit"),
        (["chat", "--user", "alice"], 2, "required"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_mistakes_are_one_line_with_an_exit_code(
    memchat: Run, args: list[str], code: int, message: str
) -> None:
    result = memchat(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[memory\n", "invalid TOML"),
        ("[memory]\nconcurency = 1\n", "memory.concurency: unknown setting"),
        ("[memory]\nconcurrency = 'x'\n", "memory.concurrency"),
    ],
)
def test_broken_settings_file(memchat: Run, tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    result = memchat("--config", str(bad), "users")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_key_for_the_real_openai_endpoint_fails_at_start(memchat: Run) -> None:
    result = memchat("chat", "--user", "alice", "hi", env={"MEMCHAT_MODEL__PROVIDER": "openai"})
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr


def test_help_documents_exit_codes_and_every_command(memchat: Run) -> None:
    result = memchat("--help")
    for command in ("chat", "sessions", "history", "users", "config"):
        assert command in result.stdout
    assert "exit codes" in memchat("chat", "--help").stdout


def test_config_redacts_secrets(memchat: Run) -> None:
    env = {
        "OPENAI_API_KEY": "sk-very-secret",
        "MEMCHAT_DATABASE__URL": "postgresql://me:hunter2@db.example:5432/m",
    }
    result = memchat("config", "--json", env=env)
    assert result.returncode == 0
    assert "sk-very-secret" not in result.stdout and "hunter2" not in result.stdout
    data = json.loads(result.stdout)["settings"]
    assert data["database"]["url"] == "postgresql://me:***@db.example:5432/m"


def test_unreachable_database_is_one_line_exit_4(memchat: Run) -> None:
    result = memchat(
        "users",
        env={
            "MEMCHAT_DATABASE__URL": "postgresql://me:hunter2@127.0.0.1:1/none",
            "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2",
        },
    )
    assert result.returncode == 4
    assert "cannot connect" in result.stderr and "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
