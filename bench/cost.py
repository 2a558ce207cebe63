"""Scenario 2, cost per run: CPU and SQL statements, with the model taking no time.

The concurrency workload (N users x 2 sessions x 3 turns, every memory job
done) at zero model latency, once with the offline model and once over HTTP
to the fake server. A "run" is one turn plus its memory job. CPU is the
kernel's count for this process (memchat, including the few statements the
load driver's waiting costs), for PostgreSQL (postmaster and every backend)
and for the fake model's process. Statements are counted in a second,
smaller pass with a query logger on the pool, so that counting costs nothing
in the first; its users' sessions are made before the logger is added, as
the clock starts after them in the timed pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bench.harness import (
    BenchServer,
    CpuMeter,
    FakeModelProcess,
    ModelTiming,
    Point,
    PostgresCpu,
    bench_settings,
    used,
)
from bench.load import run_load
from engine.runtime import Runtime, open_runtime
from engine.scenarios import create_load_sessions, load_user_ids

SESSIONS = 2
TURNS = 3
ZERO = ModelTiming(latency_ms=0, token_delay_ms=0, reply_tokens=32)
TARGET_MS = {"offline": 2.0, "http": 4.0}


@contextlib.asynccontextmanager
async def _runtime(dsn: str, kind: str) -> AsyncIterator[tuple[Runtime, int | None]]:
    if kind == "offline":
        model: dict[str, Any] = {
            "provider": "offline",
            "offline_latency_ms": 0,
            "offline_token_delay_ms": 0,
        }
        async with open_runtime(bench_settings(dsn, model=model)) as runtime:
            yield runtime, None
        return
    with FakeModelProcess(ZERO) as fake:
        settings = bench_settings(dsn, model=ZERO.model_settings(fake.base_url))
        async with open_runtime(settings) as runtime:
            yield runtime, fake.pid


async def measure(server: BenchServer, kind: str, users: int, count_users: int) -> Point:
    dsn = await server.fresh_database()
    async with _runtime(dsn, kind) as (runtime, model_pid):
        # Warm up: first statements prepare and plan, first requests connect.
        await run_load(runtime, max(5, users // 10), SESSIONS, TURNS, offset=users, audit=False)
        meter = CpuMeter(await PostgresCpu.of(dsn), model_pid)
        with meter.measure() as readings:
            run = await run_load(runtime, users, SESSIONS, TURNS)
        cpu = used(readings)
        statements = 0

        def count(_: object) -> None:
            nonlocal statements
            statements += 1

        ids = load_user_ids(count_users, offset=2 * users)
        sessions = await create_load_sessions(runtime, ids, SESSIONS)
        await runtime.db.add_query_logger(count)
        counted = await run_load(
            runtime,
            count_users,
            SESSIONS,
            TURNS,
            offset=2 * users,
            audit=False,
            session_ids=sessions,
        )
    runs = run.runs
    per_run = {
        "memchat_cpu_ms_per_run": round(cpu.memchat_s / runs * 1000, 2),
        "postgres_cpu_ms_per_run": (
            round(cpu.postgres_s / runs * 1000, 2) if cpu.postgres_s is not None else None
        ),
    }
    if cpu.model_s is not None:
        per_run["model_server_cpu_ms_per_run"] = round(cpu.model_s / runs * 1000, 2)
    return Point(
        scenario="cost",
        point=f"{kind} model",
        params={"model": kind, "users": users, "sessions": SESSIONS, "turns": TURNS, "runs": runs},
        figures={
            **per_run,
            "sql_statements_per_run": round(statements / counted.runs, 1),
            "runs_per_s": round(runs / run.wall_s, 1),
            "wall_s": round(run.wall_s, 2),
            "failed_turns": run.failed_turns,
            "lost": run.lost,
        },
        targets={"memchat_cpu_ms_per_run": ("<=", TARGET_MS[kind]), "lost": ("<=", 0)},
    )


async def run(server: BenchServer, *, quick: bool) -> list[Point]:
    users, count_users = (10, 5) if quick else (200, 50)
    return [await measure(server, kind, users, count_users) for kind in ("offline", "http")]
