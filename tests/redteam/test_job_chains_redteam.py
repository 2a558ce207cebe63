"""Red team of this session's job path: the job written by the reply's statement,
settle-and-claim-next chains and the gathering delay (memory.coalesce_wait_ms).

60 users send turns back to back (so each user's jobs chain) while the real
HTTP fake server (bench/fake_openai.py) answers 20 % of requests with 500 or
429, and every fifth user regenerates the last reply while their chain runs.
Then: no job lost, none run twice, none for the wrong user, none stranded,
and the admin's audit (engine/admin.py run_checks) is clean. Real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI, Fault
from engine.admin import CHECK_FAILED_JOBS, CHECK_RLS, AdminReader
from engine.agent import TurnCompleted, TurnEnd, TurnFailed, TurnStarted
from engine.audit import INVARIANT_CHECKS
from engine.models.prompt_blocks import parse_extraction_turns
from engine.runtime import Runtime, open_runtime
from tests.conftest import make_settings

pytestmark = [pytest.mark.db, pytest.mark.slow]

USERS, TURNS = 60, 3
_KEY = re.compile(r"rt(\d+)x(\d+)")


def _text(user: int, turn: int) -> str:
    return f"I am rt{user}x{turn} and I keep a parrot named P{user}."


def _keys(body: dict[str, Any]) -> set[tuple[int, int]]:
    """The turns an extraction request covers (its turn blocks' user messages: not
    the memories it shows, which may quote an earlier turn)."""
    found: set[tuple[int, int]] = set()
    for message in body.get("messages") or []:
        if message.get("role") != "user":
            continue
        for turn in parse_extraction_turns(str(message.get("content"))):
            for user, number in _KEY.findall(turn.user_message):
                found.add((int(user), int(number)))
    return found


async def _drain(stream: Any) -> TurnEnd | None:
    end = None
    async for event in stream:
        if isinstance(event, TurnCompleted | TurnFailed):
            end = event
    return end


async def test_chained_jobs_under_faults_and_regenerate_are_each_run_once_for_their_user(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 20},
        model={
            "provider": "openai",
            "base_url": fake.base_url,
            "api_key": None,
            "max_retries": 0,
            "timeout": 5.0,
        },
        memory={
            "max_attempts": 8,
            "retry_delay": 0.01,
            "concurrency": 4,
            "drain_timeout": 10,
            "coalesce_wait_ms": 2000,
        },
    )
    # Each extraction request and whether the server failed it.
    extractions: list[tuple[set[tuple[int, int]], bool]] = []
    record = fake._record

    def recording(body: dict[str, Any]) -> Any:
        number, fault, queued = record(body)
        if body.get("tools"):
            extractions.append((_keys(body), fault is not None))
        return number, fault, queued

    monkeypatch.setattr(fake, "_record", recording)
    fake.fault_rate(0.2, kinds=("500", "429"))
    regenerated = {i for i in range(USERS) if i % 5 == 0}
    ends: dict[str, TurnEnd | None] = {}

    async def converse(rt: Runtime, i: int) -> None:
        user_id = f"rt{i}@example.com"
        async with rt.store.scope(user_id) as s:
            sid = str((await s.create_session()).session_id)
        for t in range(TURNS):
            ends[_text(i, t)] = await _drain(rt.agent.stream(user_id, sid, _text(i, t)))
        if i in regenerated:
            # While the chain of this user's jobs runs (they were just queued).
            await _drain(rt.agent.regenerate(user_id, sid))

    async with open_runtime(settings) as rt:
        await asyncio.wait_for(
            asyncio.gather(*(converse(rt, i) for i in range(USERS))), timeout=240
        )
        assert await rt.dispatcher.wait_idle(within=120)
        fake.fault_rate(0.0)
        async with rt.db.admin() as conn:
            jobs = await conn.fetch(
                "SELECT j.job_id, j.user_id, j.status, j.attempts, j.note, m.content, "
                "m.user_id AS message_user FROM memory_jobs j "
                "JOIN messages m ON m.message_id = j.user_message_id"
            )
            messages = await conn.fetch("SELECT user_id, content FROM messages WHERE role = 'user'")
        checks = [c for c in INVARIANT_CHECKS if c not in (CHECK_RLS, CHECK_FAILED_JOBS)]
        audit = await AdminReader(rt.db).run_checks(*checks)

    # None stranded (pending or running) and none failed for good.
    assert Counter(r["status"] for r in jobs) == Counter({"done": len(jobs)}), Counter(
        r["status"] for r in jobs
    )
    # Each job for the user whose turn it is.
    assert all(r["user_id"] == r["message_user"] for r in jobs)
    # None lost: every completed turn of a user who never regenerated has
    # exactly one job (a failed reply has none: nothing to learn from).
    per_turn = Counter(r["content"] for r in jobs)
    assert len(messages) == USERS * TURNS
    completed = 0
    for m in messages:
        key = _KEY.search(m["content"])
        assert key is not None
        if int(key.group(1)) not in regenerated:
            expected = 1 if isinstance(ends[m["content"]], TurnCompleted) else 0
            completed += expected
            assert per_turn[m["content"]] == expected, (m["content"], ends[m["content"]])
    assert completed > USERS  # the faults left most turns completed: the check had work
    # No extraction mixes two users' turns.
    # (The probe of tool support at start covers no turn.)
    assert sum(bool(keys) for keys, _ in extractions) >= USERS // 2
    mixed = [keys for keys, _ in extractions if len({u for u, _ in keys}) > 1]
    assert mixed == []
    # None run twice: a turn of a user who never regenerated is in at most one
    # extraction the server answered.
    answered = Counter(k for keys, failed in extractions if not failed for k in keys)
    twice = {k: n for k, n in answered.items() if n > 1 and k[0] not in regenerated}
    assert twice == {}
    # The admin's audit (memchat doctor / admin) is clean.
    assert audit.ok, [str(f) for c in audit.failed for f in c.findings]


@contextlib.asynccontextmanager
async def _ann_behind_a_hung_turn(
    tmp_path: Path,
    database_dsn: str,
    fake: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    wait_ms: int,
) -> AsyncIterator[tuple[Runtime, asyncio.Task[None]]]:
    """Ann's first turn stored, then her second (newer) one, which hangs (the endpoint
    says nothing); then the first one's reply, whose job then waits for the second.
    Yields the runtime (memory.concurrency 1) and the hanging turn's task."""
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": None, "timeout": 60},
        memory={"concurrency": 1, "coalesce_wait_ms": wait_ms},
    )
    record = fake._record
    hung = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hang_the_marked_turn(body: dict[str, Any]) -> Any:
        number, fault, queued = record(body)
        if not body.get("tools") and "HANGS" in str(body.get("messages")):
            loop.call_soon_threadsafe(hung.set)
            return number, Fault("timeout"), queued
        return number, fault, queued

    monkeypatch.setattr(fake, "_record", hang_the_marked_turn)
    async with open_runtime(settings) as rt:
        async with rt.store.scope("ann") as s:
            first_sid = str((await s.create_session()).session_id)
            other_sid = str((await s.create_session()).session_id)
        first = rt.agent.stream("ann", first_sid, "I keep a parrot named Polly.")
        assert isinstance(await anext(first), TurnStarted)
        second = rt.agent.stream("ann", other_sid, "HANGS: I also keep a cat.")

        async def run_second() -> None:
            async for _ in second:
                pass

        hanging = asyncio.create_task(run_second())
        await asyncio.wait_for(hung.wait(), timeout=30)
        assert isinstance(await _drain(first), TurnCompleted)  # Ann's job: gathering
        try:
            yield rt, hanging
        finally:
            hanging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hanging


async def test_a_hung_stream_holds_its_users_job_only_for_the_bounded_wait(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that never ends (the endpoint says nothing) holds its user's earlier
    job for coalesce_wait_ms, not for ever: the job ends while the turn still hangs."""
    async with _ann_behind_a_hung_turn(tmp_path, database_dsn, fake, monkeypatch, 1500) as (
        rt,
        hanging,
    ):
        assert await rt.dispatcher.wait_idle(["ann"], within=20)
        assert not hanging.done()  # the job ended; the turn still hangs
        async with rt.db.admin() as conn:
            statuses = await conn.fetch("SELECT status FROM memory_jobs WHERE user_id = 'ann'")
        assert [r["status"] for r in statuses] == ["done"]


async def test_another_users_job_is_not_held_behind_a_gathering_job(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G1: Ann's job waits for her hung turn; with one slot, Bob's job still runs."""
    async with _ann_behind_a_hung_turn(tmp_path, database_dsn, fake, monkeypatch, 5000) as (
        rt,
        _hanging,
    ):
        async with rt.store.scope("bob") as s:
            bob_sid = str((await s.create_session()).session_id)
        assert isinstance(
            await _drain(rt.agent.stream("bob", bob_sid, "I like tea.")), TurnCompleted
        )
        assert await rt.dispatcher.wait_idle(["bob"], within=30)
        async with rt.db.admin() as conn:
            ann = await conn.fetchval("SELECT status FROM memory_jobs WHERE user_id = 'ann'")
        # Bob's job ran while Ann's still waited for her hung turn.
        assert ann == "running"
