"""Statements per turn and per memory job, pinned (issue 15, item 5).

Exact counts are deterministic where timings are not, so a change that adds a
round trip to a turn fails here. Real PostgreSQL, the real ``openai`` client
over HTTP to bench/fake_openai.py (one ``add_memory`` per turn), and a query
logger on the pools (as ``python -m bench cost`` counts).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from asyncpg.connection import LoggedQuery

from bench.fake_openai import FakeOpenAI
from engine.agent import Agent
from engine.config import Settings
from engine.models import OfflineChatModel
from engine.runtime import Runtime, memory_job_with_reply, open_runtime
from tests.conftest import make_settings

pytestmark = pytest.mark.db

# asyncpg's own queries on a new connection (a type's codec, once per connection):
# not memchat's, and they depend on which pooled connection a statement lands on.
_DRIVER = ("typeinfo_tree", "current_setting('jit')", "set_config('jit'")


def _settings(tmp_path: Path, dsn: str, fake: FakeOpenAI, **memory: Any) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": dsn},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": "sk-test-4f9a1c2e7b"},
        memory={"extraction": "tools", "retry_delay": 0.01, **memory},
    )


class _Counter:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, query: LoggedQuery) -> None:
        if not any(mark in query.query for mark in _DRIVER):
            self.queries.append(" ".join(query.query.split())[:60])

    def take(self) -> list[str]:
        taken, self.queries = self.queries, []
        return taken


async def _session(rt: Runtime, user_id: str) -> uuid.UUID:
    async with rt.store.scope(user_id) as s:
        return (await s.create_session("count")).session_id


async def test_a_turn_and_its_memory_job_take_a_fixed_number_of_statements(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake)
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _session(rt, "ada")
        counter = _Counter()
        await rt.db.add_query_logger(counter)

        await rt.agent.run("ada", sid, "I live in Lisbon.")
        turn = counter.take()
        # begin, message + history, memories, commit; begin, reply + its job, commit
        assert len(turn) == 7, turn

        assert await rt.dispatcher.run_once()
        job = counter.take()
        # claim; begin, turns, memories, commit; begin, one add (with its count), settle, commit
        assert len(job) == 9, job

        # Two turns waiting: one run, one more statement (the second fact's add).
        await rt.agent.run("ada", sid, "I have a cat called Miso.")
        await rt.agent.run("ada", sid, "I play the cello.")
        assert len(counter.take()) == 14
        assert await rt.dispatcher.run_once()
        assert len(counter.take()) == 10
        assert not await rt.dispatcher.run_once()  # the second turn's job was taken along

        async with rt.store.scope("ada") as s:
            assert len(await s.list_memories()) == 3


async def test_a_job_queued_during_a_run_is_claimed_by_its_settle_and_read_in_its_transaction(
    tmp_path: Path, database_dsn: str
) -> None:
    # A slow extraction (the fake's first token after 0.4 s) and a quick reply
    # (the offline model): the next turn is stored while the first job's model
    # call runs, so settling the first job claims the second in the same
    # statement, and reads its turn before COMMIT.
    with FakeOpenAI(first_token_latency=0.4) as fake:
        settings = _settings(tmp_path, database_dsn, fake, coalesce_wait_ms=0)
        async with open_runtime(settings, run_workers=False) as rt:
            quick = Agent(rt.store, OfflineChatModel(), settings, with_reply=memory_job_with_reply)
            sid = await _session(rt, "bo")
            await quick.run("bo", sid, "I live in Oslo.")
            counter = _Counter()
            await rt.db.add_query_logger(counter)
            rt.dispatcher.start()
            # The dispatcher asks the model about the first turn: now write the second.
            assert await asyncio.to_thread(fake.wait_for_requests, 1, 10)
            await quick.run("bo", sid, "I have two dogs.")
            assert await rt.dispatcher.wait_idle(within=20)
            queries = counter.take()
            begins = [q for q in queries if q.startswith("BEGIN")]
            async with rt.store.scope("bo") as s:
                jobs = await rt.dispatcher.queue.list_jobs(s)
                memories = await s.list_memories()
    assert [j.status for j in jobs] == ["done", "done"]
    assert not any("coalesced" in (j.note or "") for j in jobs)  # two runs, not one
    assert len(memories) == 2
    # Scopes: the second turn's two, the first job's read and apply, and the
    # second job's apply only: its read rode on the first job's apply.
    assert len(begins) == 5, "\n".join(queries)


async def test_adds_counted_in_their_own_statement_stop_at_max_per_user(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    # No count before the adds: each add counts in its statement, so the cap holds.
    settings = _settings(tmp_path, database_dsn, fake, max_per_user=2)
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _session(rt, "cy")
        async with rt.store.scope("cy") as s:
            assert await s.add_memory("Cy was here first.") is not None
        await rt.agent.run("cy", sid, "I live in Porto.")
        await rt.agent.run("cy", sid, "I sail on weekends.")
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("cy") as s:
            memories = await s.list_memories()
            jobs = await rt.dispatcher.queue.list_jobs(s)
    assert len(memories) == 2
    assert "refused 1 new memory: the user has memory.max_per_user (2)" in (jobs[-1].note or "")
