"""Scenario 3, memory freshness: how soon a subscriber sees what a turn taught.

Under the 200-user concurrency workload, a subscriber (the event hub, as the
app's sidebars use it) records when each memory change arrives. Each user's
jobs run in order and each turn of this workload yields one memory, so a
user's k-th "add" belongs to their k-th completed turn; the figure is the
time from the turn's end to that event. The memory call itself takes the
model's time (timed alone on the idle server), so the target is that plus
300 ms.

The NOTIFY hop alone: another process (``python -m bench.notify_writer``)
adds memories one by one; the time from just before each COMMIT there to
the event here. Both processes read CLOCK_MONOTONIC, which Linux shares
system-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections import defaultdict

from bench.concurrency import TIMING, sequential_model_time
from bench.harness import (
    REPO,
    BenchServer,
    FakeModelProcess,
    ModelTiming,
    Point,
    WorkerProcess,
    bench_settings,
    ms,
    percentile,
)
from bench.load import counting_memory_calls, run_load
from engine.events import MemoryChanged
from engine.runtime import Runtime, open_runtime

QUICK_TIMING = ModelTiming(latency_ms=20, token_delay_ms=1, reply_tokens=8)
HOP_USER = "notify_hop@example.com"


class _Arrivals:
    """When each user's memory additions reached the subscriber."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.count = 0
        self.expected: int | None = None
        self.all_in = asyncio.Event()

    def add(self, user_id: str) -> None:
        self.times[user_id].append(time.perf_counter())
        self.count += 1
        if self.expected is not None and self.count >= self.expected:
            self.all_in.set()

    def expect(self, count: int) -> None:
        self.expected = count
        if self.count >= count:
            self.all_in.set()


async def _collect(runtime: Runtime, arrivals: _Arrivals, ready: asyncio.Event) -> None:
    async with runtime.events.subscribe(None, queue_size=1_000_000) as subscription:
        ready.set()
        async for event in subscription:
            if isinstance(event, MemoryChanged) and event.op == "add":
                arrivals.add(event.user_id)


async def under_load(
    server: BenchServer, users: int, timing: ModelTiming, *, worker_process: bool = False
) -> Point:
    dsn = await server.fresh_database()
    with contextlib.ExitStack() as processes:
        fake = processes.enter_context(FakeModelProcess(timing))
        model = timing.model_settings(fake.base_url)
        # memchat as shipped: default memory settings (concurrency, coalescing).
        settings = bench_settings(dsn, model=model)
        if worker_process:
            processes.enter_context(WorkerProcess(dsn, model, settings.memory.concurrency))
        async with open_runtime(settings, run_workers=not worker_process) as runtime:
            _, call_s = await sequential_model_time(runtime.model)
            arrivals = _Arrivals()
            ready = asyncio.Event()
            collector = asyncio.create_task(_collect(runtime, arrivals, ready))
            await ready.wait()
            try:
                with counting_memory_calls(runtime) as calls:
                    load = await run_load(runtime, users, 2, 3)
                # The last events may still be on their way from the server.
                arrivals.expect(sum(len(times) for times in load.completed_at.values()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrivals.all_in.wait(), 10)
            finally:
                collector.cancel()
    delays: list[float] = []
    unmatched = 0
    for user_id, completed in load.completed_at.items():
        seen = arrivals.times.get(user_id, [])
        unmatched += abs(len(completed) - len(seen))
        delays += [arrived - done for done, arrived in zip(completed, seen, strict=False)]
    limit_ms = ms(call_s) + 300
    where = ", memory jobs in a worker process" if worker_process else ""
    return Point(
        scenario="freshness",
        point=f"turn -> memory visible, {users} users{where}",
        params={
            "users": users,
            "memory_jobs": "worker process" if worker_process else "in process",
            "runs": load.runs,
            "latency_ms": timing.latency_ms,
            "token_delay_ms": timing.token_delay_ms,
            "reply_tokens": timing.reply_tokens,
        },
        figures={
            "memory_call_alone_ms": ms(call_s),
            "visible_p50_ms": ms(percentile(delays, 50)),
            "visible_p95_ms": ms(percentile(delays, 95)),
            "visible_max_ms": ms(max(delays)) if delays else None,
            "events": len(delays),
            "unmatched": unmatched,
            # Counted in this process: None when a worker process made the calls.
            "memory_calls_per_turn": None if worker_process else round(calls.count / load.runs, 2),
        },
        targets={"visible_p95_ms": ("<=", limit_ms), "unmatched": ("<=", 0)},
    )


async def notify_hop(server: BenchServer, changes: int) -> Point:
    dsn = await server.fresh_database()
    settings = bench_settings(dsn, model={"provider": "offline"})
    arrived: dict[uuid.UUID, float] = {}
    async with open_runtime(settings, run_workers=False) as runtime:
        async with runtime.store.scope(HOP_USER) as s:
            await s.delete_user()
            await s.create_session("notify hop")  # creates the user
        async with runtime.events.subscribe(HOP_USER) as subscription:
            writer = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.notify_writer",
                dsn,
                HOP_USER,
                str(changes),
                cwd=REPO,
                stdout=subprocess.PIPE,
            )
            while len(arrived) < changes:
                try:
                    event = await asyncio.wait_for(subscription.__anext__(), 30)
                except TimeoutError:
                    break
                if isinstance(event, MemoryChanged) and event.memory_id is not None:
                    arrived[event.memory_id] = time.monotonic()
            output, _ = await writer.communicate()
    hops: list[float] = []
    for line in output.decode().splitlines():
        sent = json.loads(line)
        at = arrived.get(uuid.UUID(sent["memory_id"]))
        if at is not None:
            hops.append(at - sent["before_commit"])
    return Point(
        scenario="freshness",
        point="NOTIFY hop across processes",
        params={"changes": changes},
        figures={
            "hop_p50_ms": ms(percentile(hops, 50)),
            "hop_p95_ms": ms(percentile(hops, 95)),
            "hop_max_ms": ms(max(hops)) if hops else None,
            "received": len(hops),
            "missing": changes - len(hops),
        },
        targets={"hop_p95_ms": ("<=", 50), "missing": ("<=", 0)},
    )


async def run(server: BenchServer, *, quick: bool) -> list[Point]:
    if quick:
        return [await under_load(server, 5, QUICK_TIMING), await notify_hop(server, 20)]
    # 20 users: the same path when memchat's core is not saturated, for contrast.
    return [
        await under_load(server, 200, TIMING),
        await under_load(server, 200, TIMING, worker_process=True),
        await under_load(server, 20, TIMING),
        await notify_hop(server, 500),
    ]
