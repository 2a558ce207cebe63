"""Coalesced extraction: one model call for a user's queued turns, provenance per turn.

Real PostgreSQL (a fresh database per test), the real ``openai`` client over
HTTP to bench/fake_openai.py (which answers an extraction request with one
``add_memory`` per turn, naming the turn), and, for the crash case, a real
``memchat worker`` process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI
from engine.config import Settings
from engine.models import OfflineChatModel
from engine.queue import JobQueue
from engine.runtime import Runtime, open_runtime
from tests.conftest import make_settings

pytestmark = pytest.mark.db

USERS = 60
TURNS = 4


def _settings(tmp_path: Path, dsn: str, fake: FakeOpenAI | None, **memory: Any) -> Settings:
    model: dict[str, Any] = {"provider": "offline"}
    if fake is not None:
        model = {"provider": "openai", "base_url": fake.base_url, "api_key": "t", "name": "fake"}
    return make_settings(
        tmp_path,
        database={"url": dsn, "pool_max_size": 20},
        model=model,
        memory={
            "extraction": "tools",
            "retry_delay": 0.01,
            "lease_seconds": 30,
            "drain_timeout": 10,
            **memory,
        },
    )


def _extraction_requests(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [
        body
        for body in fake.requests
        if any(t["function"]["name"] == "add_memory" for t in body.get("tools") or ())
    ]


async def _queue_turns(rt: Runtime, users: list[str], said: Any) -> None:
    """Each user's turns, in order, with no worker running: all their jobs wait."""

    async def talk(n: int, user_id: str) -> None:
        async with rt.store.scope(user_id) as s:
            sid = (await s.create_session("coalesce")).session_id
        for turn in range(TURNS):
            await rt.agent.run(user_id, sid, said(n, turn))

    await asyncio.gather(*(talk(n, u) for n, u in enumerate(users)))


async def test_fifty_users_queued_turns_fewer_calls_every_fact_its_own_turn(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    users = [f"c{n}@example.com" for n in range(USERS)]

    def said(n: int, turn: int) -> str:
        return f"User{n} fact {turn}: I like colour {n * 10 + turn}."

    settings = _settings(tmp_path, database_dsn, fake)
    async with open_runtime(settings, run_workers=False) as rt:
        await _queue_turns(rt, users, said)
        before = len(_extraction_requests(fake))
        assert before == 0
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(users, within=120)
        calls = _extraction_requests(fake)
        async with rt.db.admin() as conn:
            jobs = await conn.fetch(
                "SELECT job_id, user_id, user_message_id, status, note, worker "
                "FROM memory_jobs ORDER BY job_id"
            )
            events = await conn.fetch(
                "SELECT e.user_id, e.op, e.after, e.job_id, e.source_message_id, "
                "       msg.content AS said, msg.user_id AS said_by, msg.session_id, "
                "       mem.source_session_id "
                "  FROM memory_events e JOIN messages msg ON msg.message_id = e.source_message_id"
                "  JOIN memories mem ON mem.memory_id = e.memory_id"
            )

    turns = USERS * TURNS
    # Every user's four turns were queued before any worker ran: one call each.
    assert len(calls) == USERS < turns
    assert all("<turn id=" in body["messages"][-1]["content"] for body in calls)
    assert [j["status"] for j in jobs] == ["done"] * turns
    # Every fact of every turn, once, recorded with its own turn's message and job.
    assert len(events) == turns and {e["op"] for e in events} == {"add"}
    job_of_message = {j["user_message_id"]: j["job_id"] for j in jobs}
    for event in events:
        assert event["after"] == event["said"], "the memory came from the turn it names"
        assert event["said_by"] == event["user_id"], "no user's turn in another's memories"
        assert event["job_id"] == job_of_message[event["source_message_id"]]
        assert event["source_session_id"] == event["session_id"]
    stored = {(e["user_id"], e["after"]) for e in events}
    assert stored == {(u, said(n, t)) for n, u in enumerate(users) for t in range(TURNS)}
    # The jobs taken along are settled, each naming the job that ran it.
    by_id = {j["job_id"]: j for j in jobs}
    coalesced = [j for j in jobs if (j["note"] or "").startswith("coalesced into job ")]
    assert len(coalesced) == turns - USERS
    for job in coalesced:
        head = by_id[int(job["note"].removeprefix("coalesced into job ").split(";")[0])]
        assert head["user_id"] == job["user_id"] and head["job_id"] < job["job_id"]
        assert head["worker"] == job["worker"]


async def _final_memories(tmp_path: Path, dsn: str, coalesce: int) -> tuple[dict[str, Any], int]:
    """Run the same conversation on the offline model; each user's memories, and
    how many job runs asked the model."""
    users = [f"o{n}@example.com" for n in range(USERS)]
    talk = [
        "My name is Mark{n} and I like chess.",
        "I live in Porto and I love green tea.",
        "Actually, call me Marcus{n}. I'm going to Japan next spring.",
        "Please forget that I like chess. I work at a bakery.",
    ]

    def said(n: int, turn: int) -> str:
        return talk[turn].format(n=n)

    home = tmp_path / f"coalesce{coalesce}"
    home.mkdir()
    settings = _settings(home, dsn, None, coalesce_turns=coalesce)
    async with open_runtime(settings, run_workers=False) as rt:
        await _queue_turns(rt, users, said)
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(users, within=120)
        memories: dict[str, Any] = {}
        for user in users:
            async with rt.store.scope(user) as s:
                memories[user] = sorted(m.content for m in await s.list_memories())
        async with rt.db.admin() as conn:
            runs = await conn.fetchval(
                "SELECT count(*) FROM memory_jobs WHERE user_id = ANY($1) AND status = 'done' "
                "AND (note IS NULL OR note NOT LIKE 'coalesced into job %')",
                users,
            )
    return memories, runs


async def test_coalesced_run_stores_what_one_call_per_turn_stores(
    tmp_path: Path, database_dsn: str
) -> None:
    """The offline model (deterministic): updates and forgets across the queued turns
    end where one call per turn ends, with a quarter of the calls."""
    per_turn, per_turn_runs = await _final_memories(tmp_path, database_dsn, 1)
    async with open_runtime(_settings(tmp_path, database_dsn, None)) as rt:
        for user in per_turn:
            async with rt.store.scope(user) as s:
                await s.delete_user()
    coalesced, coalesced_runs = await _final_memories(tmp_path, database_dsn, 8)
    assert per_turn_runs == USERS * TURNS and coalesced_runs == USERS
    assert coalesced == per_turn
    one = coalesced["o3@example.com"]
    assert one == [
        "Is going to Japan next spring",
        "Lives in Porto",
        "Loves green tea",
        "Name is Marcus3",
        "Works at a bakery",
    ], one


def _worker(dsn: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker"],
        env={**os.environ, "MEMCHAT_DATABASE__URL": dsn, "MEMCHAT_CONFIG": os.devnull, **env},
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
async def test_worker_killed_mid_coalesced_job_each_turn_applied_once(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, None)
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope("alice") as s:
            sid = (await s.create_session("crash")).session_id
        for text in ("My name is Alice.", "I like tea.", "I live in Lisbon."):
            await rt.agent.run("alice", sid, text)
        fake.first_token_latency = 60.0  # the killed worker's extraction never returns
        proc = _worker(
            database_dsn,
            {
                "OPENAI_BASE_URL": fake.base_url,
                "MEMCHAT_MODEL__PROVIDER": "openai",
                "MEMCHAT_MODEL__API_KEY": "t",
                "MEMCHAT_MEMORY__EXTRACTION": "tools",
                "MEMCHAT_MEMORY__LEASE_SECONDS": "1",
            },
        )
        try:
            assert await asyncio.to_thread(fake.wait_for_requests, 1, 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        async with rt.store.scope("alice") as s:
            held = await JobQueue.list_jobs(s)
        assert [j.status for j in held] == ["running"] * 3, "the head took both later turns"
        assert len({j.worker for j in held}) == 1
        # This process (offline model) takes over once the dead worker's leases expire.
        rt.dispatcher.manager.model = OfflineChatModel()
        rt.dispatcher._last_requeue = -1e9
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(["alice"], within=60)
        async with rt.store.scope("alice") as s:
            jobs = sorted(await JobQueue.list_jobs(s), key=lambda j: j.job_id)
            events = await s.memory_events()
    assert [j.status for j in jobs] == ["done"] * 3
    # The head ran twice; a job carried along counts one attempt however often.
    assert [j.attempts for j in jobs] == [2, 1, 1]
    head = jobs[0].job_id
    assert all((j.note or "").startswith(f"coalesced into job {head}") for j in jobs[1:])
    learnt = sorted(e.after or "" for e in events)
    assert learnt == ["Likes tea", "Lives in Lisbon", "Name is Alice"]
    assert sorted(e.job_id or 0 for e in events) == [j.job_id for j in jobs], "each turn once"


async def test_endpoint_429s_halve_concurrency_and_successes_give_it_back(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    users = [f"r{n}@example.com" for n in range(USERS)]
    settings = _settings(tmp_path, database_dsn, fake, concurrency=16)
    settings.model.max_retries = 0  # the 429 reaches the dispatcher at once
    async with open_runtime(settings, run_workers=False) as rt:
        await _queue_turns(rt, users, lambda n, turn: f"User{n} likes tea {turn}.")
        fake.fail_next("429", count=4, retry_after=0.01)
        with caplog.at_level("WARNING", logger="engine.jobs"):
            rt.dispatcher.start()
            assert await rt.dispatcher.wait_idle(users, within=120)
        async with rt.db.admin() as conn:
            statuses = await conn.fetch("SELECT status, count(*) AS n FROM memory_jobs GROUP BY 1")
    lowered = [r.getMessage() for r in caplog.records if "rate limited" in r.getMessage()]
    assert lowered and "job(s) at once now, not 16" in lowered[0], lowered
    assert {r["status"]: r["n"] for r in statuses} == {"done": USERS * TURNS}, "none lost"
    assert rt.dispatcher.concurrency == 16, "successes gave the slots back"


async def _gathered_calls(tmp_path: Path, dsn: str, wait_ms: int) -> tuple[int, int]:
    """Sixty users each say two things in a row, workers running: the model calls
    their memory jobs made, and the memories stored."""
    users = [f"g{n}@example.com" for n in range(USERS)]
    # Replies take 0.3 s: a user's first job starts while their second turn streams.
    with FakeOpenAI(first_token_latency=0.3) as fake:
        settings = _settings(tmp_path, dsn, fake, coalesce_wait_ms=wait_ms)
        async with open_runtime(settings) as rt:

            async def talk(n: int, user_id: str) -> None:
                async with rt.store.scope(user_id) as s:
                    sid = (await s.create_session("gather")).session_id
                await rt.agent.run(user_id, sid, f"User{n} lives in town {n}.")
                await rt.agent.run(user_id, sid, f"User{n} keeps {n} bees.")

            await asyncio.gather(*(talk(n, u) for n, u in enumerate(users)))
            assert await rt.dispatcher.wait_idle(users, within=120)
            async with rt.db.admin() as conn:
                stored = await conn.fetchval("SELECT count(*) FROM memories")
        return len(_extraction_requests(fake)), stored


async def test_a_job_waits_for_its_users_turn_under_way_and_takes_it_along(
    tmp_path: Path, database_dsn: str, empty_database_dsn: str
) -> None:
    # memory.coalesce_wait_ms: a run whose user has a later turn streaming waits
    # (bounded) for it, so one call covers both; 0 runs at once.
    for name in ("wait", "nowait"):
        (tmp_path / name).mkdir()
    gathered, kept = await _gathered_calls(tmp_path / "wait", database_dsn, 5000)
    assert kept == 2 * USERS  # no fact lost either way
    assert gathered == USERS, "one call per user: the first job took the second turn along"
    at_once, kept = await _gathered_calls(tmp_path / "nowait", empty_database_dsn, 0)
    assert kept == 2 * USERS
    assert at_once > gathered
