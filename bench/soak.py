"""Scenario 4, soak: 20,000 runs at zero model latency, over HTTP.

The same 250 users and sessions run batches of 1,000 runs (4 turns each)
back to back; after each batch (memory jobs done, a garbage collection) the
process's RSS, the pool's size and PostgreSQL's count of connections to the
bench database are read. A leak shows as RSS still climbing after the first
2,000 runs, or connections that are not given back.
"""

from __future__ import annotations

import gc

import asyncpg

from bench.cost import ZERO
from bench.harness import (
    BENCH_DATABASE,
    BenchServer,
    FakeModelProcess,
    Point,
    bench_settings,
    rss_mb,
)
from bench.load import run_load
from engine.runtime import open_runtime
from engine.scenarios import create_load_sessions, load_user_ids

BATCH_USERS = 250
BATCH_TURNS = 4


async def _connections(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            BENCH_DATABASE,
        )
    finally:
        await conn.close()
    return int(count)


async def run(server: BenchServer, *, quick: bool, runs: int | None = None) -> list[Point]:
    users, turns = (25, 4) if quick else (BATCH_USERS, BATCH_TURNS)
    batch = users * turns
    total = runs or (4 * batch if quick else 20_000)
    batches = max(3, total // batch)
    dsn = await server.fresh_database()
    samples: list[dict[str, float]] = []
    failed = lost = 0
    wall = 0.0
    with FakeModelProcess(ZERO) as fake:
        settings = bench_settings(dsn, model=ZERO.model_settings(fake.base_url))
        async with open_runtime(settings) as runtime:
            sessions = await create_load_sessions(runtime, load_user_ids(users), 1)
            for number in range(1, batches + 1):
                result = await run_load(
                    runtime, users, 1, turns, session_ids=sessions, audit=number == batches
                )
                failed += result.failed_turns
                wall += result.wall_s
                gc.collect()
                samples.append(
                    {
                        "runs": number * batch,
                        "rss_mb": rss_mb(),
                        "pool": runtime.db.pool.get_size(),
                        "connections": await _connections(server.dsn),
                    }
                )
            lost = result.lost
    early = samples[1] if len(samples) > 1 else samples[0]  # after the first 2 batches
    last = samples[-1]
    growth = (last["rss_mb"] - early["rss_mb"]) / early["rss_mb"] * 100
    return [
        Point(
            scenario="soak",
            point=f"{batches * batch} runs",
            params={"runs": batches * batch, "batch_runs": batch, "users": users, "model": "http"},
            figures={
                f"rss_after_{int(early['runs'])}_mb": early["rss_mb"],
                f"rss_after_{int(last['runs'])}_mb": last["rss_mb"],
                "rss_growth_pct": round(growth, 1),
                "rss_by_batch_mb": [s["rss_mb"] for s in samples],
                "pool_size_first_last": [samples[0]["pool"], last["pool"]],
                "pg_connections_first_last": [samples[0]["connections"], last["connections"]],
                "connection_growth": last["connections"] - samples[0]["connections"],
                "pool_growth": last["pool"] - samples[0]["pool"],
                "runs_per_s": round(batches * batch / wall, 1),
                "failed_turns": failed,
                "lost": lost,
            },
            targets={
                "rss_growth_pct": ("<=", 10),
                "connection_growth": ("<=", 0),
                "pool_growth": ("<=", 0),
                "lost": ("<=", 0),
            },
        )
    ]
