"""`memchat chat` learns from its own turn, and only from its own user's queue.

Real processes on a real database: another user's queued job must stay
queued (it may be meant for another model configuration), the turn's own job
settles before the command exits, and a job that cannot settle in time is
named in one stderr line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI, canned_json, canned_sse, canned_text
from engine.agent import TurnCompleted
from engine.queue import JobQueue
from engine.runtime import open_runtime
from tests.conftest import Run, make_settings

pytestmark = [pytest.mark.db, pytest.mark.slow]


_REPLY = canned_sse(
    [
        {"choices": [{"index": 0, "delta": {"content": "Noted."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
)


async def _queue_a_job(tmp_path: Path, dsn: str, user: str, text: str) -> int:
    settings = make_settings(tmp_path, database={"url": dsn})
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope(user) as s:
            await s.ensure_user()
            sid = (await s.create_session()).session_id
        end = await rt.agent.run(user, sid, text)
        assert isinstance(end, TurnCompleted)
        async with rt.store.scope(user) as s:
            job = await JobQueue.job_for_reply(s, end.reply.message_id)
    assert job is not None
    return job.job_id


async def test_chat_runs_its_own_job_and_leaves_other_users_queued(
    memchat: Run, tmp_path: Path, database_dsn: str
) -> None:
    bobs_job = await _queue_a_job(tmp_path, database_dsn, "bob", "My name is Bob.")
    alices_older = await _queue_a_job(tmp_path, database_dsn, "alice", "I like tea.")

    result = memchat("chat", "--user", "alice", "--json", "My name is Alice.")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["memory_job"]["status"] == "done"
    assert out["memory_job"]["extraction"] == "tools"

    jobs = json.loads(memchat("jobs", "--json").stdout)
    status = {job["job_id"]: (job["user_id"], job["status"]) for job in jobs}
    assert status[bobs_job] == ("bob", "pending"), "another user's job is never taken"
    assert status[alices_older] == ("alice", "done"), "its own user's older job goes first"
    memories = memchat("memories", "--user", "alice", "--json").stdout
    assert "Name is Alice" in memories and "Likes tea" in memories


def test_a_job_left_queued_is_said_in_one_line(memchat: Run, fake: FakeOpenAI) -> None:
    env = {
        "MEMCHAT_MODEL__BASE_URL": fake.base_url,
        "MEMCHAT_MODEL__MAX_RETRIES": "0",
        "MEMCHAT_MEMORY__EXTRACTION": "tools",
        "MEMCHAT_MEMORY__DRAIN_TIMEOUT": "0",
        "MEMCHAT_MEMORY__RETRY_DELAY": "60",
    }
    fake.queue_response(_REPLY, canned_text("upstream busy", 503))  # then a retry, a minute on
    result = memchat("chat", "--user", "alice", "I like tea.", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memchat: memory: job ")
    assert "is still pending after 0s (memory.drain_timeout)" in lines[0]
    assert "`memchat worker` or the next memchat run will finish it" in lines[0]


def test_a_failed_job_is_said_in_one_line(memchat: Run, fake: FakeOpenAI) -> None:
    env = {
        "MEMCHAT_MODEL__BASE_URL": fake.base_url,
        "MEMCHAT_MODEL__MAX_RETRIES": "0",
        "MEMCHAT_MEMORY__EXTRACTION": "tools",
    }
    fake.queue_response(
        _REPLY,
        canned_json({"error": {"message": "The model `small` does not exist"}}, 404),
    )
    result = memchat("chat", "--user", "alice", "I like tea.", env=env)
    assert result.returncode == 0, "the turn itself worked"
    assert result.stdout == "Noted.\n"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memchat: memory: job ")
    assert "failed:" in lines[0] and "does not exist" in lines[0]
    assert lines[0].endswith("(see `memchat jobs --failed`)")
