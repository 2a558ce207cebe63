"""The `memchat` command, run as a user would: a subprocess, real database, real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine.scenarios import SEED_SCRIPT, LoadResult, problem_line

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
    chat, *extraction = fake.requests
    assert chat["stream"] is True
    # Then the turn's memory job, at the same endpoint: tools, or JSON where the
    # endpoint ignores tools (how it finds out is the memory pipeline's business).
    assert extraction and not any(r.get("stream") for r in extraction)
    assert all("tools" in r or "response_format" in r for r in extraction)


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
    for command in ("chat", "sessions", "history", "users", "jobs", "config"):
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


# -- memchat jobs and token usage ----------------------------------------------------


async def _insert(dsn: str, user_id: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Rows of one user, written in that user's scope (so also as a non-superuser)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('memchat.user_id', $1, true)", user_id)
            await conn.execute(
                "INSERT INTO users (user_id, display_name) VALUES ($1, $1) ON CONFLICT DO NOTHING",
                user_id,
            )
            for sql, params in statements:
                await conn.execute(sql, *params)
    finally:
        await conn.close()


JOB_SQL = (
    "INSERT INTO memory_jobs (user_id, status, attempts, last_error, note, extraction, "
    "prompt_tokens, completion_tokens, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
    "CASE WHEN $2 IN ('done', 'failed') THEN clock_timestamp() END)"
)
HOSTILE_ERROR = "model said \x1b[2J[bold]no[/bold]\nsecond line"


def _jobs(dsn: str) -> None:
    asyncio.run(
        _insert(
            dsn,
            "alice",
            (
                JOB_SQL,
                (
                    "alice",
                    "done",
                    1,
                    None,
                    "1 change refused: memory.max_per_user",
                    "tools",
                    812,
                    64,
                ),
            ),
            (JOB_SQL, ("alice", "failed", 3, HOSTILE_ERROR, None, "json", None, None)),
        )
    )
    asyncio.run(_insert(dsn, "bob", (JOB_SQL, ("bob", "pending", 0, None, None, None, None, None))))


def test_jobs_lists_newest_first_with_errors_and_notes_shown_literally(
    memchat: Run, database_dsn: str
) -> None:
    _jobs(database_dsn)
    result = memchat("jobs")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "JOB", "USER", "STATUS", "TRIES", "MODE", "TOKENS", "IN/OUT",
        "CREATED", "FINISHED", "ERROR", "/", "NOTE",
    ]  # fmt: skip
    assert [row.split()[1:3] for row in rows] == [
        ["bob", "pending"],
        ["alice", "failed"],
        ["alice", "done"],
    ]
    assert rows[1].split()[3:5] == ["3", "json"] and rows[2].split()[3:5] == ["1", "tools"]
    failed, done = rows[1], rows[2]
    assert "error: model said \\x1b[2J[bold]no[/bold]\\nsecond line" in failed
    assert "\x1b" not in result.stdout
    assert "812/64" in done and "note: 1 change refused: memory.max_per_user" in done

    only_failed = memchat("jobs", "--failed", "--json")
    body = json.loads(only_failed.stdout)
    assert [(j["user_id"], j["status"], j["attempts"]) for j in body] == [("alice", "failed", 3)]
    assert body[0]["last_error"] == HOSTILE_ERROR and body[0]["extraction"] == "json"
    assert body[0]["prompt_tokens"] is None and body[0]["finished_at"]

    alice = json.loads(memchat("jobs", "--user", "alice", "--limit", "1", "--json").stdout)
    assert [(j["status"], j["note"]) for j in alice] == [("failed", None)]
    assert memchat("jobs", "--user", "bob", "--failed").stdout == "no failed memory jobs for bob\n"


def test_jobs_on_an_empty_database(memchat: Run) -> None:
    result = memchat("jobs")
    assert (result.returncode, result.stdout) == (0, "no memory jobs\n")
    assert json.loads(memchat("jobs", "--json").stdout) == []


def test_jobs_does_not_start_memory_workers(memchat: Run, database_dsn: str) -> None:
    asyncio.run(
        _insert(database_dsn, "bob", (JOB_SQL, ("bob", "pending", 0, None, None, None, None, None)))
    )
    assert memchat("jobs", "--json").returncode == 0
    # A worker would have claimed the pending job; a read-only view must leave it be.
    body = json.loads(memchat("jobs", "--json").stdout)
    assert [(j["status"], j["attempts"], j["worker"]) for j in body] == [("pending", 0, None)]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["jobs", "--user", "nobody@example.com"], 3, "no user 'nobody@example.com'"),
        (["jobs", "--user", "bad id"], 2, "invalid user id"),
        (["jobs", "--limit", "0"], 2, "--limit must be at least 1"),
        (["jobs", "--limit", "x"], 2, "invalid int value"),
    ],
)
def test_jobs_mistakes_are_one_line(memchat: Run, args: list[str], code: int, message: str) -> None:
    result = memchat(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_users_shows_tokens_only_where_usage_was_reported(memchat: Run, database_dsn: str) -> None:
    assert memchat("chat", "--user", "carol", "hi").returncode == 0
    plain = memchat("users")
    tokens_reported = "TOKENS" in plain.stdout.splitlines()[0]
    _jobs(database_dsn)
    table = memchat("users").stdout.splitlines()
    assert table[0].split()[-2:] == ["TOKENS", "IN/OUT"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["alice"].rstrip().endswith("812/64")
    assert not rows["bob"].rstrip().endswith("/0"), "unknown usage is shown as nothing, not 0"
    body = {u["user_id"]: u for u in json.loads(memchat("users", "--json").stdout)}
    assert body["alice"]["tokens"] == {"prompt": 812, "completion": 64}
    assert body["bob"]["tokens"] is None
    assert (body["carol"]["tokens"] is not None) == tokens_reported


def test_history_json_carries_token_usage(memchat: Run, fake: FakeOpenAI) -> None:
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-x"}
    chat = json.loads(memchat("chat", "--user", "alice", "--json", "hello", env=env).stdout)
    history = memchat("history", "--user", "alice", "--session", chat["session_id"], "--json")
    user_message, reply = json.loads(history.stdout)["messages"]
    # The fake server reports usage for the streamed reply; a user message has none.
    assert (user_message["prompt_tokens"], user_message["completion_tokens"]) == (None, None)
    assert reply["prompt_tokens"] > 0 and reply["completion_tokens"] > 0


# -- scenarios report what failed --------------------------------------------------


def _endpoint(chat: FakeOpenAI, memory: FakeOpenAI | None = None) -> dict[str, str]:
    env = {
        "OPENAI_BASE_URL": chat.base_url,
        "OPENAI_API_KEY": "sk-cli-secret",
        "MEMCHAT_MODEL__MAX_RETRIES": "0",
        "MEMCHAT_MEMORY__MAX_ATTEMPTS": "1",
    }
    if memory is not None:
        env |= {"MEMCHAT_MEMORY__BASE_URL": memory.base_url, "MEMCHAT_MEMORY__API_KEY": "sk-mem"}
    return env


def _said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """memchat's own lines on stderr (not log records, which -v would add anyway)."""
    return [line for line in result.stderr.splitlines() if line.startswith("memchat: ")]


def test_problem_lines() -> None:
    assert problem_line(0, 8, 0, 0) is None
    assert problem_line(7, 8, 1, 2) == (
        "7 of 8 turns failed; 1 memory job failed; 2 memory jobs still pending or running"
    )
    load = LoadResult(users=2, runs=4, jobs_idle=True)
    assert load.ok and load.problem() is None
    load.failed_jobs, load.lost, load.leaks = 1, 3, 1
    assert load.problem() == (
        "1 memory job failed; 1 memory names another user; 2 replies have no memory job"
    )
    assert not LoadResult(users=1, runs=1, jobs_idle=False).ok


def test_seed_offline_succeeds_with_nothing_to_report(memchat: Run) -> None:
    result = memchat("scenario", "seed", "--json")
    assert result.returncode == 0, result.stderr
    assert _said(result) == []
    body = json.loads(result.stdout)
    assert body["ok"] is True and body["runs"] == 8
    assert (body["failed_turns"], body["unsettled_jobs"]) == ([], [])
    assert "Name is Mark Gonzales" in body["users"]["seed-1@example.com"]


def test_seed_with_failing_replies_lists_them_and_exits_1(memchat: Run, fake: FakeOpenAI) -> None:
    fake.fail_next("500", count=1000)
    result = memchat("scenario", "seed", "--json", env=_endpoint(fake))
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["ok"] is False
    failed = body["failed_turns"]
    assert len(failed) == 8
    assert {(t["user_id"], t["session"], t["text"]) for t in failed} == {
        (user, session, text) for user, turns in SEED_SCRIPT.items() for session, text in turns
    }
    assert all(t["error"] for t in failed)
    assert body["unsettled_jobs"] == [], "a failed turn has no memory job"
    assert _said(result) == ["memchat: error: seed: 8 of 8 turns failed"]
    assert "sk-cli-secret" not in result.stdout + result.stderr

    text = memchat("scenario", "seed", env=_endpoint(fake))
    assert text.returncode == 1
    assert "\nFailed turns:\n" in text.stdout
    assert "  seed-2@example.com user_2_session_1: 'Hi my name is John Doe.': " in text.stdout
    assert _said(text) == ["memchat: error: seed: 8 of 8 turns failed"]


def test_seed_with_failing_memory_jobs_lists_them_and_exits_1(
    memchat: Run, fake: FakeOpenAI
) -> None:
    with FakeOpenAI() as memory:
        memory.fail_next("500", count=1000)
        result = memchat("scenario", "seed", "--json", env=_endpoint(fake, memory))
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)
    assert body["failed_turns"] == []
    jobs = body["unsettled_jobs"]
    assert len(jobs) == 8 and {j["status"] for j in jobs} == {"failed"}
    assert all(j["error"] and j["attempts"] == 1 for j in jobs)
    assert _said(result) == ["memchat: error: seed: 8 memory jobs failed"]
    # The same jobs as the admin view lists.
    listed = json.loads(memchat("jobs", "--failed", "--json").stdout)
    assert sorted(j["job_id"] for j in listed) == sorted(j["job_id"] for j in jobs)
    assert {j["job_id"]: j["last_error"] for j in listed} == {j["job_id"]: j["error"] for j in jobs}


def test_load_reports_failed_turns_and_jobs_and_exits_1(memchat: Run, fake: FakeOpenAI) -> None:
    args = ("scenario", "load", "--users", "2", "--sessions", "1", "--turns", "2")
    clean = memchat(*args)
    assert clean.returncode == 0, clean.stderr
    body = json.loads(clean.stdout)
    assert (body["failed_turns"], body["failed_jobs"], body["open_jobs"]) == (0, 0, 0)
    assert (body["turn_errors"], body["job_errors"]) == ({}, {})

    fake.fail_next("500", count=1000)
    failing = memchat(*args, env=_endpoint(fake))
    assert failing.returncode == 1
    body = json.loads(failing.stdout)
    assert body["failed_turns"] == 4 and sum(body["turn_errors"].values()) == 4
    assert _said(failing) == ["memchat: error: load: 4 of 4 turns failed"]

    fake.reset()
    with FakeOpenAI() as memory:
        memory.fail_next("500", count=1000)
        jobs_failing = memchat(*args, env=_endpoint(fake, memory))
    assert jobs_failing.returncode == 1
    body = json.loads(jobs_failing.stdout)
    assert (body["failed_turns"], body["failed_jobs"]) == (0, 4)
    assert sum(body["job_errors"].values()) == 4
    assert _said(jobs_failing) == ["memchat: error: load: 4 memory jobs failed"]


def _interrupted_chat(database_dsn: str, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    import os
    import sys

    config = tmp_path / "none.toml"
    config.touch()
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "chat", "--user", "ctrlc@example.com", *args],
        env={
            **os.environ,
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_CONFIG": str(config),
            "MEMCHAT_MODEL__OFFLINE_TOKEN_DELAY_MS": "200",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _wait_for_message(dsn: str, text: str, within: float = 60.0) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(within):
            query = "SELECT count(*) FROM messages WHERE role = 'user' AND content = $1"
            while True:
                if await conn.fetchval(query, text):
                    return
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


def test_json_chat_interrupted_prints_the_cancelled_reply(
    database_dsn: str, tmp_path: Path
) -> None:
    """Ctrl-C during a `memchat chat --json` stream printed nothing at all."""
    import signal

    text = "Tell me a long story, slowly."
    proc = _interrupted_chat(database_dsn, tmp_path, "--json", text)
    try:
        # --json streams nothing to stdout: the turn has started (the model is
        # streaming, one token per 200 ms) once the user's message is stored.
        asyncio.run(_wait_for_message(database_dsn, text))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert isinstance(result["user_message_id"], int)
    assert isinstance(result["reply_message_id"], int)
    assert b"interrupted" in err and b"Traceback" not in err

    async def stored() -> asyncpg.Record:
        conn = await asyncpg.connect(database_dsn)
        try:
            return await conn.fetchrow(
                "SELECT status, content FROM messages WHERE message_id = $1",
                result["reply_message_id"],
            )
        finally:
            await conn.close()

    row = asyncio.run(stored())
    assert row["status"] == "cancelled" and row["content"] == result["reply"]


def test_plain_chat_interrupted_after_the_first_token_exits_130(
    database_dsn: str, tmp_path: Path
) -> None:
    import signal

    proc = _interrupted_chat(database_dsn, tmp_path, "Tell me another story.")
    try:
        assert proc.stdout is not None
        first = proc.stdout.read1(4096)  # the first streamed token
        assert first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert (first + out).strip()
