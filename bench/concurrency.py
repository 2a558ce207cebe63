"""Scenario 1, concurrency efficiency: how close N users get to the ideal.

N users x 2 sessions x 3 turns against the fake model over HTTP (200 ms to
the first token, 2 ms a token, 32 tokens, by default), until every memory job
is done. The ideal is the longest user's sequential model time: 6 streamed
replies plus the one memory call that trails the last of them, each timed on
the idle server in the same run. The CPU floor is what the three processes
(memchat, PostgreSQL, the model) used, divided by the cores, or memchat's own
CPU time if that is more (one Python process runs on one core): no scheduler
can finish sooner, so ``wall / floor`` near 1 means the machine, not waiting,
is what is left.
"""

from __future__ import annotations

import os
import statistics
import time

from bench.harness import (
    BenchServer,
    CpuMeter,
    FakeModelProcess,
    ModelTiming,
    PeakRss,
    Point,
    PostgresCpu,
    bench_settings,
    ms,
    percentile,
    used,
)
from bench.load import counting_memory_calls, run_load
from engine.memory import MEMORY_TOOLS
from engine.models.base import ChatMessage, ChatModel, StreamEnd
from engine.runtime import open_runtime

SESSIONS = 2
TURNS = 3
TIMING = ModelTiming(latency_ms=200, token_delay_ms=2, reply_tokens=32)
QUICK_TIMING = ModelTiming(latency_ms=20, token_delay_ms=1, reply_tokens=8)
TARGETS = {200: 1.3, 1000: 2.0}


async def sequential_model_time(model: ChatModel, samples: int = 5) -> tuple[float, float]:
    """Median seconds of one streamed reply and of one memory call, on an idle server."""
    prompt = [ChatMessage("system", "You are helpful."), ChatMessage("user", "I like tea.")]
    streams: list[float] = []
    calls: list[float] = []
    for _ in range(samples):
        began = time.perf_counter()
        async for event in model.stream(prompt):
            if isinstance(event, StreamEnd):
                break
        streams.append(time.perf_counter() - began)
        began = time.perf_counter()
        await model.call_tools(prompt, MEMORY_TOOLS)
        calls.append(time.perf_counter() - began)
    return statistics.median(streams), statistics.median(calls)


async def measure(server: BenchServer, users: int, timing: ModelTiming) -> Point:
    dsn = await server.fresh_database()
    with FakeModelProcess(timing) as fake:
        # memchat as shipped: default memory and database settings (issue 15).
        settings = bench_settings(dsn, model=timing.model_settings(fake.base_url))
        async with open_runtime(settings) as runtime:
            stream_s, call_s = await sequential_model_time(runtime.model)
            meter = CpuMeter(await PostgresCpu.of(dsn), fake.pid)
            async with PeakRss() as rss:
                with meter.measure() as readings, counting_memory_calls(runtime) as calls:
                    run = await run_load(runtime, users, SESSIONS, TURNS)
            cpu = used(readings)
    ideal = SESSIONS * TURNS * stream_s + call_s
    total_cpu = cpu.memchat_s + (cpu.postgres_s or 0) + (cpu.model_s or 0)
    cores = _cores()
    # memchat is one Python process, one core: its own CPU time is a floor too.
    floor = max(ideal, total_cpu / cores, cpu.memchat_s)
    targets = {"wall_over_ideal": ("<=", TARGETS[users])} if users in TARGETS else {}
    return Point(
        scenario="concurrency",
        point=f"{users} users",
        params={
            "users": users,
            "sessions": SESSIONS,
            "turns": TURNS,
            "runs": run.runs,
            "latency_ms": timing.latency_ms,
            "token_delay_ms": timing.token_delay_ms,
            "reply_tokens": timing.reply_tokens,
            "settings": "defaults",
            "memory_concurrency": settings.memory.concurrency,
            "coalesce_turns": settings.memory.coalesce_turns,
            "coalesce_wait_ms": settings.memory.coalesce_wait_ms,
            "pool_max_size": settings.database.pool_max_size,
        },
        figures={
            "wall_s": round(run.wall_s, 3),
            "ideal_s": round(ideal, 3),
            "wall_over_ideal": round(run.wall_s / ideal, 2),
            "cpu_floor_s": round(floor, 3),
            "wall_over_cpu_floor": round(run.wall_s / floor, 2),
            "runs_per_s": round(run.runs / run.wall_s, 1),
            "turn_p50_ms": ms(percentile(run.turn_latencies, 50)),
            "turn_p95_ms": ms(percentile(run.turn_latencies, 95)),
            "idle_stream_ms": ms(stream_s),
            "idle_memory_call_ms": ms(call_s),
            "memory_calls_per_turn": round(calls.count / run.runs, 2),
            "memchat_cpu_ms_per_run": round(cpu.memchat_s / run.runs * 1000, 2),
            "postgres_cpu_ms_per_run": _per_run(cpu.postgres_s, run.runs),
            "model_cpu_ms_per_run": _per_run(cpu.model_s, run.runs),
            "peak_rss_mb": rss.peak_mb,
            "failed_turns": run.failed_turns,
            "leaks": run.leaks,
            "lost": run.lost,
            "duplicates": run.duplicates,
        },
        targets={
            **targets,
            **({"memory_calls_per_turn": ("<=", 0.5)} if users >= 200 else {}),
            "leaks": ("<=", 0),
            "lost": ("<=", 0),
            "duplicates": ("<=", 0),
        },
    )


def _per_run(seconds: float | None, runs: int) -> float | None:
    return None if seconds is None else round(seconds / runs * 1000, 2)


def _cores() -> int:
    return os.cpu_count() or 1


async def run(server: BenchServer, *, quick: bool, users: list[int] | None = None) -> list[Point]:
    sizes = users or ([3, 10] if quick else [10, 200, 1000])
    timing = QUICK_TIMING if quick else TIMING
    return [await measure(server, n, timing) for n in sizes]
