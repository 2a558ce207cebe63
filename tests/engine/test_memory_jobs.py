"""The background memory pipeline: jobs, the manager's tools, isolation, durability."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import TurnCompleted
from engine.config import Settings
from engine.events import JobChanged
from engine.jobs import job_counts
from engine.models import OfflineChatModel, OpenAIChatModel
from engine.queue import JOB_CHANNEL, JobQueue
from engine.runtime import Runtime, open_runtime
from engine.scenarios import run_load, run_seed
from tests.conftest import make_settings

pytestmark = pytest.mark.db


@pytest.fixture
def fast_settings(tmp_path: Path, database_dsn: str) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 20},
        memory={"retry_delay": 0.01, "lease_seconds": 30, "drain_timeout": 10},
    )


@pytest.fixture
async def runtime(fast_settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(fast_settings) as rt:
        yield rt


async def _session(rt: Runtime, user_id: str, title: str | None = None) -> str:
    async with rt.store.scope(user_id) as s:
        return str((await s.create_session(title)).session_id)


async def _memories(rt: Runtime, user_id: str) -> list[str]:
    async with rt.store.scope(user_id) as s:
        return sorted(m.content for m in await s.list_memories())


async def test_seed_scenario_offline(runtime: Runtime) -> None:
    result = await run_seed(runtime)
    assert result.runs == 8 and result.failed_turns == 0
    mark, john, jane = (result.memories[f"seed-{i}@example.com"] for i in (1, 2, 3))
    assert "Name is Mark Gonzales" in mark
    assert any("anime" in m for m in mark) and any("manga" in m for m in mark)
    assert any("movies tonight" in m for m in mark)
    assert "Name is John Doe" in john and any("hike" in m for m in john)
    assert "Name is Jane Smith" in jane and any("gym" in m for m in jane)
    everything = {"Mark": mark, "John": john, "Jane": jane}
    for owner, memories in everything.items():
        for other in set(everything) - {owner}:
            assert not any(other in m for m in memories), (owner, other, memories)
    # Repeatable: the scenario resets its own users.
    again = await run_seed(runtime)
    assert again.memories == result.memories


async def test_turn_does_not_wait_for_extraction(runtime: Runtime, fake: FakeOpenAI) -> None:
    fake.first_token_latency = 0.0
    # A slow extraction model; the turn itself uses the offline model.
    slow = OpenAIChatModel(
        runtime.settings.model.model_copy(
            update={"provider": "openai", "base_url": fake.base_url, "api_key": None}
        )
    )
    runtime.dispatcher.manager.model = slow
    fake.first_token_latency = 5.0
    try:
        sid = await _session(runtime, "alice")
        end = await asyncio.wait_for(runtime.agent.run("alice", sid, "My name is Alice."), 4)
        assert isinstance(end, TurnCompleted)
        async with runtime.store.scope("alice") as s:
            jobs = await JobQueue.list_jobs(s)
        assert [j.status for j in jobs] in (["pending"], ["running"])
    finally:
        await runtime.dispatcher.stop(0)
        await slow.aclose()


async def test_two_hundred_users_concurrently_no_leaks_losses_or_duplicates(
    runtime: Runtime,
) -> None:
    result = await run_load(runtime, users=200, sessions=2, turns=3)
    assert result.runs == 1200 and result.failed_turns == 0
    assert (result.leaks, result.lost, result.duplicates, result.failed_jobs) == (0, 0, 0, 0)
    assert result.memories >= 400
    counts = await job_counts(runtime.db)
    assert (counts.open, counts.failed, counts.done) == (0, 0, 1200)


async def test_same_fact_in_two_sessions_at_once_is_one_memory(runtime: Runtime) -> None:
    one, two = await _session(runtime, "alice"), await _session(runtime, "alice")
    ends = await asyncio.gather(
        runtime.agent.run("alice", one, "I like chess."),
        runtime.agent.run("alice", two, "I like chess."),
    )
    assert all(isinstance(e, TurnCompleted) for e in ends)
    assert await runtime.dispatcher.wait_idle(["alice"], within=30)
    assert await _memories(runtime, "alice") == ["Likes chess"]
    async with runtime.store.scope("alice") as s:
        assert [j.status for j in await JobQueue.list_jobs(s)] == ["done", "done"]
        assert [e.op for e in await s.memory_events()] == ["add"]


async def test_tool_calls_over_http_are_applied_and_foreign_ids_rejected(
    fast_settings: Settings, fake: FakeOpenAI
) -> None:
    async with open_runtime(
        fast_settings.model_copy(
            update={
                "model": fast_settings.model.model_copy(
                    update={"provider": "openai", "base_url": fake.base_url}
                )
            }
        ),
        run_workers=False,
    ) as rt:
        async with rt.store.scope("bob") as s:
            await s.ensure_user()
            bobs = await s.add_memory("Name is Bob")
            assert bobs is not None
        async with rt.store.scope("alice") as s:
            await s.ensure_user()
            await s.add_memory("Likes tea")
        sid = await _session(rt, "alice")
        await rt.agent.run("alice", sid, "I switched to coffee.")
        fake.queue_tool_calls(
            [
                {"name": "update_memory", "arguments": {"id": "m1", "memory": "Likes coffee"}},
                {"name": "add_memory", "arguments": {"memory": "Drinks espresso"}},
                {"name": "update_memory", "arguments": {"id": "m7", "memory": "Name is Eve"}},
                {"name": "delete_memory", "arguments": {"id": str(bobs.memory_id)}},
                {"name": "update_memory", "arguments": {"id": str(bobs.memory_id), "memory": "x"}},
                {"name": "launch_rockets", "arguments": {}},
            ]
        )
        assert await rt.dispatcher.run_once()
        assert await _memories(rt, "alice") == ["Drinks espresso", "Likes coffee"]
        assert await _memories(rt, "bob") == ["Name is Bob"]
        async with rt.store.scope("alice") as s:
            job = (await JobQueue.list_jobs(s))[0]
            events = await s.memory_events()
        assert job.status == "done"
        assert [(e.op, e.job_id, e.actor) for e in events[-2:]] == [
            ("update", job.job_id, "job"),
            ("add", job.job_id, "job"),
        ]
        request = fake.requests[-1]
        assert {t["function"]["name"] for t in request["tools"]} == {
            "add_memory",
            "update_memory",
            "delete_memory",
        }
        prompt = request["messages"][-1]["content"]
        assert "[m1] Likes tea" in prompt and "I switched to coffee." in prompt
        assert str(bobs.memory_id) not in prompt


@pytest.mark.parametrize("fault", ["500", "timeout"])
async def test_failing_extraction_is_retried_then_failed(
    fast_settings: Settings, fake: FakeOpenAI, fault: str
) -> None:
    fast_settings.memory.max_attempts = 2
    model = fast_settings.model.model_copy(
        update={"provider": "openai", "base_url": fake.base_url, "max_retries": 0, "timeout": 1}
    )
    async with open_runtime(
        fast_settings.model_copy(update={"model": model}), run_workers=False
    ) as rt:
        sid = await _session(rt, "alice")
        end = await rt.agent.run("alice", sid, "My name is Alice.")
        assert isinstance(end, TurnCompleted), "the turn itself is not affected"
        fake.fail_next(fault, count=2)  # type: ignore[arg-type]
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("alice") as s:
            job = (await JobQueue.list_jobs(s))[0]
        assert (job.status, job.attempts) == ("pending", 1) and job.last_error
        # Backoff: the retry becomes claimable after retry_delay.
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(["alice"], within=30)
        async with rt.store.scope("alice") as s:
            job = (await JobQueue.list_jobs(s))[0]
            assert await s.list_memories() == []
        assert (job.status, job.attempts) == ("failed", 2)
        assert job.last_error and ("timed out" in job.last_error or "server" in job.last_error)


async def test_failed_job_can_be_retried_through_the_users_scope_only(
    fast_settings: Settings, fake: FakeOpenAI
) -> None:
    """Bug 16: a failed job stayed failed for good; retrying requeues the newest one."""
    fast_settings.memory.max_attempts = 1
    model = fast_settings.model.model_copy(
        update={"provider": "openai", "base_url": fake.base_url, "max_retries": 0, "timeout": 1}
    )
    async with open_runtime(
        fast_settings.model_copy(update={"model": model}), run_workers=False
    ) as rt:
        sid = await _session(rt, "alice")
        assert isinstance(await rt.agent.run("alice", sid, "My name is Alice."), TurnCompleted)
        fake.fail_next("500", count=1)
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("alice") as s:
            assert (await JobQueue.job_state(s))[0] == "failed"
        async with rt.store.scope("bob") as s:
            assert await JobQueue.retry_failed_job(s) is None, "another user's job is not theirs"
        async with rt.store.scope("alice") as s:
            job = await JobQueue.retry_failed_job(s)
        assert job is not None and (job.status, job.attempts) == ("pending", 0)
        async with rt.store.scope("alice") as s:
            assert await JobQueue.retry_failed_job(s) is None, "only a failed job is retried"
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("alice") as s:
            again = (await JobQueue.list_jobs(s))[0]
            assert (await JobQueue.job_state(s))[0] == "idle"
        assert again.job_id == job.job_id and again.status == "done"
        assert again.note and "succeeded after" in again.note


def _worker(dsn: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker"],
        env={
            **os.environ,
            "MEMCHAT_DATABASE__URL": dsn,
            "MEMCHAT_CONFIG": os.devnull,
            **(env or {}),
        },
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
async def test_worker_killed_mid_job_is_retried_exactly_once(
    fast_settings: Settings, database_dsn: str, fake: FakeOpenAI
) -> None:
    async with open_runtime(fast_settings, run_workers=False) as rt:
        sid = await _session(rt, "alice")
        await rt.agent.run("alice", sid, "My name is Alice and I like tea.")
        fake.first_token_latency = 60.0  # the killed worker's extraction never returns
        proc = _worker(
            database_dsn,
            {
                "OPENAI_BASE_URL": fake.base_url,
                "MEMCHAT_MEMORY__LEASE_SECONDS": "1",
            },
        )
        try:
            assert await asyncio.to_thread(fake.wait_for_requests, 1, 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        async with rt.store.scope("alice") as s:
            assert [j.status for j in await JobQueue.list_jobs(s)] == ["running"]
        # A new worker (offline model) takes over once the dead worker's lease expires.
        rt.dispatcher.settings.concurrency = 1
        rt.dispatcher._last_requeue = -1e9
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(["alice"], within=60)
        async with rt.store.scope("alice") as s:
            job = (await JobQueue.list_jobs(s))[0]
            events = await s.memory_events()
        assert (job.status, job.attempts) == ("done", 2)
        assert job.last_error is None, "a job that succeeded carries no error"
        assert "succeeded after: lease expired (worker lost)" in (job.note or "")
        assert sorted(e.after or "" for e in events) == ["Likes tea", "Name is Alice"]


@pytest.mark.slow
async def test_two_processes_share_the_queue_each_job_once_in_user_order(
    fast_settings: Settings, database_dsn: str
) -> None:
    users = [f"u{i}@example.com" for i in range(50)]
    async with open_runtime(fast_settings, run_workers=False) as rt:

        async def talk(user_id: str) -> None:
            sid = await _session(rt, user_id)
            for n in range(4):
                await rt.agent.run(user_id, sid, f"I like thing number {n} of {user_id}.")

        await asyncio.gather(*(talk(u) for u in users))
        assert (await job_counts(rt.db)).pending == 200
        # Extraction takes 50 ms a job in both processes, and each runs at most
        # 8 at once (of 50 users' queue heads), so neither can take the queue
        # alone before the other joins.
        rt.dispatcher.manager.model = OfflineChatModel(latency_ms=50)
        rt.dispatcher.settings.concurrency = 8
        async with rt.events.subscribe(None) as events:
            proc = _worker(
                database_dsn,
                {"MEMCHAT_MODEL__OFFLINE_LATENCY_MS": "50", "MEMCHAT_MEMORY__CONCURRENCY": "8"},
            )
            async for event in events:
                if isinstance(event, JobChanged) and event.state == "running":
                    break
        try:
            rt.dispatcher.start()
            assert await rt.dispatcher.wait_idle(within=120)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(proc.communicate)
        assert proc.returncode == 0, err
        async with rt.db.admin() as conn:
            jobs = await conn.fetch(
                "SELECT user_id, job_id, status, attempts, worker, started_at, finished_at, "
                "note FROM memory_jobs ORDER BY user_id, job_id"
            )
            events = await conn.fetch(
                "SELECT job_id, count(*) AS n FROM memory_events GROUP BY job_id"
            )
    assert len(jobs) == 200
    assert {(j["status"], j["attempts"]) for j in jobs} == {("done", 1)}
    assert {e["n"] for e in events} == {1} and len(events) == 200, "each job's effect once"
    assert len({j["worker"] for j in jobs}) == 2, "both processes did work"
    by_id = {j["job_id"]: j for j in jobs}
    for user_id in users:
        own = [j for j in jobs if j["user_id"] == user_id]
        # A job run may take the user's later queued jobs along (coalesced
        # extraction): those ran with an earlier job, in the same process.
        alone = [j for j in own if "coalesced into job" not in (j["note"] or "")]
        for earlier, later in itertools.pairwise(alone):
            assert earlier["finished_at"] <= later["started_at"], "per-user order"
        for job in own:
            if job not in alone:
                head = by_id[int(job["note"].removeprefix("coalesced into job "))]
                assert head["job_id"] < job["job_id"] and head["worker"] == job["worker"]
                assert head["started_at"] <= job["started_at"] <= head["finished_at"]


async def test_shutdown_with_jobs_pending_loses_none(
    fast_settings: Settings, fake: FakeOpenAI
) -> None:
    async with open_runtime(fast_settings, run_workers=False) as rt:
        for user in ("alice", "bob", "carol"):
            sid = await _session(rt, user)
            await rt.agent.run(user, sid, f"My name is {user.title()}.")
        # Slow extraction: stop() will find a job running and give it back.
        rt.dispatcher.manager.model = OfflineChatModel(latency_ms=10_000)
        rt.dispatcher.settings.concurrency = 1
        async with rt.events.subscribe(None) as events:
            rt.dispatcher.start()
            async for event in events:
                if isinstance(event, JobChanged) and event.state == "running":
                    break
        await rt.dispatcher.stop(drain_timeout=0)
        counts = await job_counts(rt.db)
        assert (counts.pending, counts.running, counts.done) == (3, 0, 0)
    async with open_runtime(fast_settings) as rt:
        assert await rt.dispatcher.wait_idle(within=30)
        assert (await job_counts(rt.db)).done == 3
        for user in ("alice", "bob", "carol"):
            assert await _memories(rt, user) == [f"Name is {user.title()}"]


async def test_the_job_channel_has_one_name_in_python_and_sql(runtime: Runtime) -> None:
    async with runtime.store.scope("alice") as s:
        assert await s.conn.fetchval("SELECT memchat_job_channel()") == JOB_CHANNEL
