"""`memchat doctor`: each check on its own, and the command as a user runs it."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI, canned_json, canned_sse
from engine.cli.doctor_commands import doctor_broken_settings, format_line
from engine.config import Settings
from engine.db import Database
from engine.db.migrate import available_migrations
from engine.doctor import CheckResult, diagnose, model_check, probe_checks
from engine.errors import ConfigError
from engine.extraction import EndpointModes
from engine.store import Store
from tests.conftest import make_settings

pytestmark = [pytest.mark.db]

Run = Callable[..., subprocess.CompletedProcess[str]]

UNREACHABLE_DSN = "postgresql://me:hunter2@127.0.0.1:1/none"
REFUSING_MODEL_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
ALL_CHECKS = [
    "settings",
    "database",
    "migrations",
    "isolation",
    "memory jobs",
    "login roles",
    "socket",
    "stuck jobs",
    "memory retrieval",
    "model",
    "memory extraction",
]


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


# -- the checks, called directly --------------------------------------------------


async def test_fresh_database_with_the_offline_model_is_all_ok(settings: Settings) -> None:
    results = await diagnose(settings=settings)
    assert [r.name for r in results] == ALL_CHECKS
    assert all(r.ok and r.fix is None for r in results), results
    checks = by_name(results)
    latest = max(m.version for m in available_migrations())
    assert checks["migrations"].detail == f"schema version {latest} (current)"
    assert checks["isolation"].detail.startswith("row-level security enabled and forced on 6")
    assert checks["memory jobs"].detail == "0 pending, 0 running, 0 failed"
    assert checks["model"].detail == "offline model (no network needed)"
    assert str(settings.config_file) in checks["settings"].detail


async def test_broken_settings_file_is_the_one_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory\n")
    (result,) = await diagnose(bad)
    assert not result.ok and result.name == "settings"
    assert str(bad) in result.detail and "invalid TOML" in result.detail
    assert result.fix == "fix the line named above or remove the file"


async def test_broken_environment_variable_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCHAT_MEMORY__CONCURRENCY", "many")
    (tmp_path / "ok.toml").write_text("")
    (result,) = await diagnose(tmp_path / "ok.toml")
    assert "MEMCHAT_MEMORY__CONCURRENCY" in result.detail
    assert result.fix == "fix or unset the variable named above"


async def test_failed_memory_job_is_a_problem_naming_the_user(
    settings: Settings, store: Store, database_dsn: str
) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
    # As the superuser: the runtime role may only insert jobs in a user's scope.
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(
            "INSERT INTO memory_jobs (user_id, status, last_error) "
            "VALUES ('alice', 'failed', 'boom')"
        )
    finally:
        await conn.close()
    jobs = by_name(await diagnose(settings=settings))["memory jobs"]
    assert not jobs.ok
    assert jobs.detail == "0 pending, 0 running, 1 failed (newest: alice: boom)"
    assert jobs.fix is not None
    assert "memchat jobs --failed --user alice" in jobs.fix and "(F3)" in jobs.fix


async def test_row_level_security_switched_off_is_a_problem(
    settings: Settings, db: Database, database_dsn: str
) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("ALTER TABLE memories NO FORCE ROW LEVEL SECURITY")
    finally:
        await conn.close()
    isolation = by_name(await diagnose(settings=settings))["isolation"]
    assert not isolation.ok
    assert "memories: row-level security is not forced" in isolation.detail
    assert isolation.fix and "FORCE ROW LEVEL SECURITY" in isolation.fix


async def test_reachable_model_endpoint_is_ok(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = make_settings(
        tmp_path, model={"base_url": fake.base_url, "api_key": "sk-doctor-test", "name": "m1"}
    )
    result = await model_check(settings)
    assert result.ok, result
    assert result.detail.startswith(f"m1 @ {fake.base_url.rstrip('/')} (reachable")
    assert fake.request_count == 0, "the probe is GET /models, never a (paid) chat request"


async def test_unreachable_model_endpoint_is_a_problem_with_the_fix(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, model={"base_url": REFUSING_MODEL_URL})
    result = await model_check(settings)
    assert not result.ok
    assert result.detail == f"cannot reach {REFUSING_MODEL_URL} (connection refused)"
    assert result.fix == (
        "check OPENAI_BASE_URL / model.base_url, or unset it to use the offline model"
    )


async def test_unusable_model_settings_are_a_problem(tmp_path: Path) -> None:
    # provider openai with the real endpoint and no key: chat would refuse to start.
    settings = make_settings(tmp_path, model={"provider": "openai"})
    result = await model_check(settings)
    assert not result.ok and "OPENAI_API_KEY" in result.detail


def test_problem_lines_line_up_and_carry_the_fix() -> None:
    ok = format_line(CheckResult("model", True, "offline model (no network needed)"))
    bad = format_line(CheckResult("model", False, "cannot reach x", "do y"))
    assert ok == "ok       model: offline model (no network needed)"
    assert bad == "problem  model: cannot reach x -> do y"


async def test_broken_settings_handler_reports_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(json=False)
    code = await doctor_broken_settings(args, ConfigError("/x/config.toml: invalid TOML: boom"))
    assert code == 1
    assert capsys.readouterr().out == (
        "problem  settings: /x/config.toml: invalid TOML: boom "
        "-> fix the line named above or remove the file\n"
    )


# -- the command --------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_command_all_ok(memchat: Run) -> None:
    result = memchat("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(None, 1)[0] for line in lines] == ["ok"] * len(ALL_CHECKS)
    assert [line[9:].split(":", 1)[0] for line in lines] == ALL_CHECKS
    assert result.stderr == ""


@pytest.mark.slow
def test_doctor_json_shape(memchat: Run) -> None:
    result = memchat("doctor", "--json", env={"OPENAI_BASE_URL": REFUSING_MODEL_URL})
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert set(body) == {"ok", "checks"} and body["ok"] is False
    # An unreachable model is not probed further.
    assert [c["name"] for c in body["checks"]] == ALL_CHECKS[:-1]
    for check in body["checks"]:
        assert set(check) == {"name", "ok", "detail", "fix"}
        assert (check["fix"] is None) == check["ok"]
    model = body["checks"][-1]
    assert model["ok"] is False and "connection refused" in model["detail"]


@pytest.mark.slow
def test_doctor_command_with_an_unreachable_model(memchat: Run) -> None:
    result = memchat("doctor", env={"OPENAI_BASE_URL": REFUSING_MODEL_URL})
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == (
        f"problem  model: cannot reach {REFUSING_MODEL_URL} (connection refused) "
        "-> check OPENAI_BASE_URL / model.base_url, or unset it to use the offline model"
    )


@pytest.mark.slow
def test_doctor_command_with_an_unreachable_database(memchat: Run) -> None:
    env = {"MEMCHAT_DATABASE__URL": UNREACHABLE_DSN, "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2"}
    result = memchat("doctor", env=env)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    # The checks that need the database are skipped; the model is still checked.
    assert [line[9:].split(":", 1)[0] for line in lines] == [
        "settings",
        "database",
        "model",
        "memory extraction",
    ]
    assert lines[1].startswith("problem  database: cannot connect to postgresql://me:***@")
    assert lines[1].endswith("-> is PostgreSQL running? check database.url (MEMCHAT_DATABASE__URL)")
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.slow
def test_doctor_command_with_a_broken_settings_file_has_no_traceback(
    memchat: Run, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory]\nconcurency = 1\n")
    result = memchat("--config", str(bad), "doctor")
    assert result.returncode != 0
    assert str(bad) in result.stdout + result.stderr
    assert "memory.concurency: unknown setting" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_doctor_command_reports_a_broken_settings_file_as_a_problem(
    memchat: Run, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory\n")
    result = memchat("--config", str(bad), "doctor")
    assert result.returncode == 1
    assert result.stdout.startswith(f"problem  settings: {bad}: invalid TOML")
    assert result.stdout.rstrip().endswith("-> fix the line named above or remove the file")


# -- the probe: a few real tokens ---------------------------------------------------


def _fake_model(tmp_path: Path, fake: FakeOpenAI, **memory: str) -> Settings:
    return make_settings(
        tmp_path,
        model={"base_url": fake.base_url, "api_key": "sk-doctor-test", "name": "m1"},
        memory=memory,
    )


async def test_the_probe_streams_a_reply_and_learns_the_extraction_form(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    results = by_name(await probe_checks(_fake_model(tmp_path, fake)))
    assert results["model stream"].ok and "a reply streamed" in results["model stream"].detail
    extraction = results["memory extraction"]
    assert extraction.ok
    assert extraction.detail == (
        f"tools for m1 @ {fake.base_url.rstrip('/')} "
        "(auto: the endpoint returned tool calls, forced and unforced)"
    )
    forced, unforced = fake.requests[-2:]
    assert "tool_choice" not in unforced, "extraction does not force: neither may the probe"
    probe = forced
    assert probe["tool_choice"] == {"type": "function", "function": {"name": "memchat_probe"}}
    assert probe["max_tokens"] == 64, "a few tokens, not a full reply"
    learnt = EndpointModes().get(f"m1 @ {fake.base_url.rstrip('/')}")
    assert learnt is not None and learnt.mode == "tools", "what jobs will use, learnt now"


async def test_an_endpoint_refusing_tools_is_json_under_auto_and_a_problem_under_tools(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    refusal = canned_json({"error": "llama3 does not support tools"}, status=400)
    reply = canned_sse([{"choices": [{"index": 0, "delta": {"content": "OK"}}]}])
    fake.queue_response(reply, refusal)
    extraction = by_name(await probe_checks(_fake_model(tmp_path, fake)))["memory extraction"]
    assert extraction.ok and extraction.detail.startswith("json for m1 @ ")
    assert "the endpoint refuses tools" in extraction.detail

    fake.queue_response(reply, refusal)
    settings = _fake_model(tmp_path, fake, extraction="tools")
    extraction = by_name(await probe_checks(settings))["memory extraction"]
    assert not extraction.ok
    assert extraction.detail.startswith("tools is set, but the endpoint refuses tools")
    assert extraction.fix == 'set memory.extraction = "auto" or "json"'


async def test_a_chat_model_that_streams_nothing_is_a_problem(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    fake.queue_response(
        canned_sse([{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
    )
    stream = by_name(await probe_checks(_fake_model(tmp_path, fake)))["model stream"]
    assert not stream.ok and stream.detail == "the endpoint streamed an empty reply"


def test_doctor_command_shows_the_probe_and_no_probe_skips_it(
    memchat: Run, fake: FakeOpenAI
) -> None:
    env = {"OPENAI_BASE_URL": fake.base_url, "MEMCHAT_MODEL__NAME": "m1"}
    result = memchat("doctor", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line[9:].split(":", 1)[0] for line in result.stdout.splitlines()]
    assert names[-3:] == ["model", "model stream", "memory extraction"]
    chats = fake.request_count
    assert chats == 3  # one short reply, a forced tool call and one not forced

    result = memchat("doctor", "--no-probe", env=env)
    assert result.returncode == 0
    assert "model stream" not in result.stdout and fake.request_count == chats
