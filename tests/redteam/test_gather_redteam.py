"""Red team of engine/jobs.py ``_gather`` (a job waiting for its user's next turn
gives its memory.concurrency slot back and resumes ahead of new claims): the
limit holds and every job finishes.

All real: PostgreSQL (a fresh database per test), the engine's runtime, the real
`openai` client over HTTP to bench/fake_openai.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import TurnCompleted, TurnEnd, TurnFailed
from engine.jobs import MemoryDispatcher
from engine.runtime import open_runtime
from tests.conftest import make_settings

pytestmark = pytest.mark.db

USERS = 50


async def _drain(stream: Any) -> TurnEnd | None:
    end = None
    async for event in stream:
        if isinstance(event, TurnCompleted | TurnFailed):
            end = event
    return end


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 2])
async def test_gathering_jobs_never_exceed_memory_concurrency(
    tmp_path: Path,
    database_dsn: str,
    fake: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
) -> None:
    """Attack: memory.concurrency = 1 or 2, 50 users sending turns back to back, so
    many jobs wait in _gather for a later turn (slot given back) and resume.
    Held if no more than that many memory (tools) requests are ever in flight at the fake
    server, and every job finishes (wait_idle), with no deadlock."""
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 20},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": None},
        memory={"concurrency": concurrency, "coalesce_wait_ms": 300, "drain_timeout": 10},
    )
    lock = threading.Lock()  # the fake serves on its own thread
    in_flight = 0
    peak = 0
    memory_requests = 0
    answer = fake._answer_chat

    async def counting(number: int, body: dict[str, Any], *rest: Any) -> bool:
        nonlocal in_flight, peak, memory_requests
        if not body.get("tools"):
            return await answer(number, body, *rest)
        with lock:
            in_flight += 1
            memory_requests += 1
            peak = max(peak, in_flight)
        try:
            # Latency at the network edge, so that overlapping requests overlap.
            await asyncio.sleep(0.02)
            return await answer(number, body, *rest)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(fake, "_answer_chat", counting)
    # How often a job found a later turn of its user under way (so _gather waited).
    waited = 0
    gathers = MemoryDispatcher._gathers

    def counting_gathers(self: MemoryDispatcher, job: Any) -> bool:
        nonlocal waited
        found = gathers(self, job)
        waited += found
        return found

    monkeypatch.setattr(MemoryDispatcher, "_gathers", counting_gathers)

    async def converse(i: int) -> None:
        user_id = f"g{i}@example.com"
        async with rt.store.scope(user_id) as s:
            sid = str((await s.create_session()).session_id)
        for t in range(3):
            end = await _drain(rt.agent.stream(user_id, sid, f"I am g{i} turn {t}, I like tea."))
            assert isinstance(end, TurnCompleted)

    async with open_runtime(settings) as rt:
        await asyncio.wait_for(asyncio.gather(*(converse(i) for i in range(USERS))), 240)
        assert await rt.dispatcher.wait_idle(within=180), "jobs left unfinished"
        async with rt.db.admin() as conn:
            states = await conn.fetch(
                "SELECT status, count(*) AS n FROM memory_jobs GROUP BY status"
            )
    assert memory_requests > 0 and waited > 0, (memory_requests, waited)
    assert peak <= concurrency, f"{peak} memory requests in flight at once"
    assert {r["status"] for r in states} <= {"done"}, states
