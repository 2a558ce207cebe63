"""Scenario: the same load in one memchat process and in two, on one PostgreSQL.

``engine.load_processes`` runs it both ways: N users x 2 sessions x 3 turns
against the fake model over HTTP, each process a ``memchat scenario load
--part`` with its own memory workers, one audit across all of them. Both
sides go through the same machinery (one part, or two), so the ratio is about
the second process only. The clock starts once every part has made its
users' sessions and stops when the last part's users have no open job.

Each process gets the job concurrency of the concurrency scenario
(``max(64, users)``), so that job slots limit neither side: what is measured is
whether a second core helps. On a 2-core machine shared with PostgreSQL and the
model server, the ceiling of ``speedup`` is well below 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from bench.concurrency import QUICK_TIMING, SESSIONS, TIMING, TURNS, sequential_model_time
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
from engine.load_processes import ProcessesLoad, run_load_processes
from engine.runtime import open_runtime

PROCESSES = (1, 2)


def child_env(dsn: str, model: Mapping[str, Any], concurrency: int) -> dict[str, str]:
    """The parts' settings: defaults plus these, like the bench's own (no file, no MEMCHAT_*)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MEMCHAT_", "OPENAI_"))},
        "MEMCHAT_CONFIG": os.devnull,
        "MEMCHAT_DATABASE__URL": dsn,
        "MEMCHAT_MEMORY__CONCURRENCY": str(concurrency),
        **{f"MEMCHAT_MODEL__{key.upper()}": str(value) for key, value in model.items()},
    }


async def _measure(
    server: BenchServer, users: int, processes: int, timing: ModelTiming
) -> tuple[ProcessesLoad, CpuReading, float]:
    dsn = await server.fresh_database()
    concurrency = max(64, users)
    with FakeModelProcess(timing) as fake:
        model = timing.model_settings(fake.base_url)
        settings = bench_settings(dsn, model=model, memory={"concurrency": concurrency})
        # The parent only audits (and times the idle model for the ideal).
        async with open_runtime(settings, run_workers=False) as runtime:
            stream_s, call_s = await sequential_model_time(runtime.model)
            meter = CpuMeter(await PostgresCpu.of(dsn), fake.pid)
            readings: list[CpuReading] = []
            run = await run_load_processes(
                runtime,
                users,
                SESSIONS,
                TURNS,
                processes,
                memchat=[sys.executable, "-m", "engine.cli"],
                env=child_env(dsn, model, concurrency),
                on_clock=lambda _: readings.append(meter.read()),
            )
    if not run.result.jobs_idle:
        raise RuntimeError("memory jobs still open when the load processes were done")
    ideal = SESSIONS * TURNS * stream_s + call_s
    return run, used(readings), ideal


async def measure(server: BenchServer, users: int, timing: ModelTiming) -> Point:
    figures: dict[str, Any] = {}
    problems = {"leaks": 0, "lost": 0, "duplicates": 0, "failed_turns": 0}
    runs = 0
    for n in PROCESSES:
        run, cpu, ideal = await _measure(server, users, n, timing)
        result = run.result
        runs = result.runs
        figures[f"wall_s_{n}p"] = round(result.wall_s, 3)
        figures[f"runs_per_s_{n}p"] = round(result.runs / result.wall_s, 1)
        figures[f"wall_over_ideal_{n}p"] = round(result.wall_s / ideal, 2)
        figures[f"turn_p95_ms_{n}p"] = ms(percentile(result.turn_latencies, 95))
        # memchat's CPU: the parts' (the parent does nothing while the clock runs).
        figures[f"memchat_cpu_ms_per_run_{n}p"] = round(sum(run.cpu_s) / runs * 1000, 2)
        if cpu.postgres_s is not None:
            figures[f"postgres_cpu_ms_per_run_{n}p"] = round(cpu.postgres_s / runs * 1000, 2)
        for name in problems:
            problems[name] += getattr(result, name)
    figures["speedup"] = round(figures["wall_s_1p"] / figures["wall_s_2p"], 2)
    figures |= problems
    return Point(
        scenario="processes",
        point=f"{users} users, 1 vs 2 processes",
        params={
            "users": users,
            "sessions": SESSIONS,
            "turns": TURNS,
            "runs": runs,
            "latency_ms": timing.latency_ms,
            "token_delay_ms": timing.token_delay_ms,
            "reply_tokens": timing.reply_tokens,
            "memory_concurrency_per_process": max(64, users),
            "cores": os.cpu_count(),
        },
        figures=figures,
        targets={name: ("<=", 0) for name in problems},
    )


async def run(server: BenchServer, *, quick: bool, users: list[int] | None = None) -> list[Point]:
    sizes = users or ([10] if quick else [200])
    timing = QUICK_TIMING if quick else TIMING
    return [await measure(server, n, timing) for n in sizes]
