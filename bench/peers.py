"""Scenario: the agent framework this project started from, beside memchat, in one run.

The framework's cookbook workload (``agno``: one ``Agent`` with ``PostgresDb``
and ``update_memory_on_run=True``, users in ``asyncio.gather``, each user's
turns in order, each reply streamed) and memchat's own load, with the same
messages (``engine.scenarios.load_message``), on the same fake model process
(the concurrency scenario's latency settings) and the same PostgreSQL server
(each in its own database). memchat runs with its default settings: the
comparison is with memchat as shipped.

Both run in this process, one after the other, so "CPU per run" is this
process's CPU either way. agno's run ends when its memory update has been
made (it waits for its memory task), memchat's load when every memory job is
done: both are measured until every memory is written.

agno is optional (``pip install -e '.[peers]'``); without it the scenario says
so in one line and measures nothing.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import time
from typing import Any

import asyncpg

from bench.concurrency import QUICK_TIMING, SESSIONS, TIMING, TURNS
from bench.harness import (
    BenchServer,
    CpuMeter,
    CpuReading,
    FakeModelProcess,
    ModelTiming,
    Point,
    PostgresCpu,
    bench_settings,
    ms,
    percentile,
    used,
)
from bench.load import JOBS_WITHIN_S
from engine.db import with_database
from engine.runtime import open_runtime
from engine.scenarios import audit_load, load_message, load_user_ids
from engine.scenarios import run_load as run_scenario_load

PEER_DATABASE = "memchat_bench_peers"
REQUIRED = ("agno", "sqlalchemy", "psycopg", "greenlet")
TARGET_WALL_RATIO = 15.0
"""Issue 15: memchat with default settings at least 15x faster than the framework (200 users)."""


def missing() -> list[str]:
    """The optional packages this scenario needs that cannot be imported."""
    absent = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


async def _fresh_peer_database(server: BenchServer) -> str:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {PEER_DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {PEER_DATABASE}")
    finally:
        await conn.close()
    return with_database(server.dsn, PEER_DATABASE)


async def _drop_peer_database(server: BenchServer) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {PEER_DATABASE} WITH (FORCE)")
    finally:
        await conn.close()


def sqlalchemy_url(dsn: str) -> str:
    """The same server and login for SQLAlchemy's psycopg driver (socket dirs included)."""
    scheme, rest = dsn.split("://", 1)
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL DSN: {scheme}://")
    return f"postgresql+psycopg://{rest}"


async def _peer_user(agent: Any, i: int, latencies: list[float]) -> int:
    """One user's turns in order, each reply streamed to its end; the failed ones counted."""
    user_id = f"load_{i}@example.com"
    failed = 0
    for session in range(SESSIONS):
        session_id = f"peer-{i}-{session + 1}"
        for turn in range(TURNS):
            began = time.perf_counter()
            status = None
            async for event in agent.arun(
                load_message(i, session, turn), user_id=user_id, session_id=session_id, stream=True
            ):
                status = getattr(event, "event", status)
            latencies.append(time.perf_counter() - began)
            failed += status == "RunError"
    return failed


async def _memory_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ai.agno_memories"))
    finally:
        await conn.close()


async def run_peer(
    dsn: str, base_url: str, users: int, meter: CpuMeter
) -> tuple[CpuReading, list[float], int, int]:
    """The cookbook workload on agno; (CPU used, turn latencies, failed turns, memories)."""
    from agno.agent import Agent
    from agno.db.postgres import PostgresDb
    from agno.models.openai import OpenAIChat

    db = PostgresDb(db_url=sqlalchemy_url(dsn))
    agent = Agent(
        model=OpenAIChat(id="fake", base_url=base_url, api_key="bench"),
        db=db,
        update_memory_on_run=True,
        telemetry=False,
    )
    # Its tables are made on first use: once here, outside the clock (memchat's
    # migrations are outside it too), by a user of its own.
    async for _ in agent.arun("Hello.", user_id="warm-up", session_id="warm-up", stream=True):
        pass
    await asyncio.to_thread(db.clear_memories)
    latencies: list[float] = []
    with meter.measure() as readings:
        failed = await asyncio.gather(*(_peer_user(agent, n + 1, latencies) for n in range(users)))
    memories = await _memory_count(dsn)
    db.close()
    return used(readings), latencies, sum(failed), memories


async def measure(server: BenchServer, users: int, timing: ModelTiming) -> Point:
    runs = users * SESSIONS * TURNS
    dsn = await server.fresh_database()
    peer_dsn = await _fresh_peer_database(server)
    try:
        with FakeModelProcess(timing) as fake:
            model = timing.model_settings(fake.base_url)
            settings = bench_settings(dsn, model=model)  # memchat as shipped
            async with open_runtime(settings) as runtime:
                meter = CpuMeter(await PostgresCpu.of(dsn), fake.pid)
                # As the framework does: sessions made as the users go, the
                # audit after the clock.
                with meter.measure() as readings:
                    mine = await run_scenario_load(
                        runtime, users, SESSIONS, TURNS, wait_within=JOBS_WITHIN_S, audit=False
                    )
                audit = await audit_load(runtime, load_user_ids(users))
            if not mine.jobs_idle:
                raise RuntimeError(f"memory jobs still open after {JOBS_WITHIN_S:g}s")
            memchat = used(readings)
            peer, peer_latencies, peer_failed, peer_memories = await run_peer(
                peer_dsn, fake.base_url, users, CpuMeter(await PostgresCpu.of(peer_dsn), fake.pid)
            )
    finally:
        await _drop_peer_database(server)

    def per_run(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds / runs * 1000, 2)

    figures: dict[str, Any] = {
        "memchat_wall_s": round(mine.wall_s, 3),
        "peer_wall_s": round(peer.wall_s, 3),
        "wall_ratio": round(peer.wall_s / mine.wall_s, 1),
        "memchat_runs_per_s": round(runs / mine.wall_s, 1),
        "peer_runs_per_s": round(runs / peer.wall_s, 1),
        "memchat_cpu_ms_per_run": per_run(memchat.memchat_s),
        "peer_cpu_ms_per_run": per_run(peer.memchat_s),
        "cpu_per_run_ratio": round(peer.memchat_s / memchat.memchat_s, 1),
        "memchat_postgres_cpu_ms_per_run": per_run(memchat.postgres_s),
        "peer_postgres_cpu_ms_per_run": per_run(peer.postgres_s),
        "memchat_turn_p95_ms": ms(percentile(mine.turn_latencies, 95)),
        "peer_turn_p95_ms": ms(percentile(peer_latencies, 95)),
        "memchat_failed_turns": mine.failed_turns,
        "peer_failed_turns": peer_failed,
        "peer_memories": peer_memories,
        "leaks": audit["leaks"],
        "lost": audit["lost"],
        "duplicates": audit["duplicates"],
    }
    targets: dict[str, tuple[str, float]] = {
        "leaks": ("<=", 0),
        "lost": ("<=", 0),
        "duplicates": ("<=", 0),
    }
    if users == 200:
        targets["wall_ratio"] = (">=", TARGET_WALL_RATIO)
    return Point(
        scenario="peers",
        point=f"{users} users, memchat vs agno",
        params={
            "users": users,
            "sessions": SESSIONS,
            "turns": TURNS,
            "runs": runs,
            "latency_ms": timing.latency_ms,
            "token_delay_ms": timing.token_delay_ms,
            "reply_tokens": timing.reply_tokens,
            "memchat_settings": "defaults",
            "memory_concurrency": settings.memory.concurrency,
            "peer": f"agno {_version('agno')}, PostgresDb, update_memory_on_run=True",
        },
        figures=figures,
        targets=targets,
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


async def run(server: BenchServer, *, quick: bool, users: list[int] | None = None) -> list[Point]:
    absent = missing()
    if absent:
        print(
            f"peers: skipped: {', '.join(absent)} not installed "
            "(pip install -e '.[peers]' installs the framework it compares with)",
            file=sys.stderr,
            flush=True,
        )
        return []
    # The framework logs each run's warnings and its telemetry notice at INFO
    # and WARNING; the bench's output is its table.
    os.environ.setdefault("AGNO_TELEMETRY", "false")
    logging.getLogger("agno").setLevel(logging.ERROR)
    sizes = users or ([3] if quick else [200])
    timing = QUICK_TIMING if quick else TIMING
    return [await measure(server, n, timing) for n in sizes]
