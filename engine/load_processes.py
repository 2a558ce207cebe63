"""``memchat scenario load --processes N``: one load spread over N OS processes.

Each process is a ``memchat scenario load --part`` of its own (the same
settings file, environment and options as the parent, so with the embedded
database each reaches the same server: the same data dir, its socket and its
credentials file, held by a shared ``flock``), running its share of the users
with its own memory workers; optional ``memchat worker`` processes take jobs
from the same queue. The parent runs no turn and no job: it starts them,
opens the clock once all are ready, and when all are done runs one audit over
every user of the load (the same audit a one-process load runs).

The parts speak JSON lines on their stdout and read one word per line on
their stdin, so that starting, measuring and stopping wait for events, never
for time:

    part -> parent   {"ready": true}            users reset, sessions made
    parent -> part   go                          the clock starts
    part -> parent   {"done": {...}}            turns run, its users' jobs settled
    parent -> part   stop                        drain and exit (EOF means the same)

A part keeps taking jobs (any user's) until it is told to stop, so a part that
finishes first helps the others. A part's stderr is the parent's: its
one-line errors reach the user as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from engine.errors import MemchatError
from engine.runtime import Runtime
from engine.scenarios import (
    LoadResult,
    audit_into,
    create_load_sessions,
    load_user_ids,
    reset_users,
    run_load,
)

READY_WITHIN_S = 120.0
"""How long a part may take to open its runtime, reset its users and make their sessions."""
STOP_WITHIN_S = 60.0
"""How long a part or worker may take to drain and exit once told to stop."""


class LoadProcessError(MemchatError):
    """A part of a multi-process load failed, or broke the protocol."""


@dataclass(frozen=True, slots=True)
class Share:
    """One process's users: ``load_{offset+1}`` .. ``load_{offset+users}``."""

    offset: int
    users: int


def shares(users: int, processes: int) -> list[Share]:
    """The users split into ``processes`` contiguous runs, sizes differing by one at most."""
    if processes < 1 or users < processes:
        raise ValueError("every process needs at least one user")
    base, extra = divmod(users, processes)
    result: list[Share] = []
    offset = 0
    for k in range(processes):
        size = base + (1 if k < extra else 0)
        result.append(Share(offset, size))
        offset += size
    return result


@dataclass(slots=True)
class ProcessesLoad:
    """A multi-process load: the merged result, audited once, and each process's cost."""

    result: LoadResult
    processes: int
    workers: int
    cpu_s: list[float] = field(default_factory=list)
    """CPU seconds of each part then each worker, from the start of the clock to
    the last part's done (psutil: user + system, read from the kernel)."""

    def as_json(self) -> dict[str, object]:
        return {
            **self.result.as_json(),
            "processes": self.processes,
            "workers": self.workers,
            "cpu_s_per_process": [round(s, 3) for s in self.cpu_s],
        }


# -- the parent ------------------------------------------------------------------


class _Part:
    def __init__(self, share: Share, proc: asyncio.subprocess.Process) -> None:
        self.share = share
        self.proc = proc
        self.meter = psutil.Process(proc.pid)

    async def expect(self, key: str, within: float | None) -> Any:
        """The next protocol line's ``key``; a part that exits or says anything else fails."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise LoadProcessError(
                f"load process {self.proc.pid} sent no {key!r} within {within:g}s"
            ) from None
        if not line:
            code = await self.proc.wait()
            raise LoadProcessError(
                f"load process {self.proc.pid} (users {self.share.offset + 1}.."
                f"{self.share.offset + self.share.users}) exited with {code} before {key!r}"
            )
        try:
            message = json.loads(line)
            return message[key]
        except (ValueError, KeyError, TypeError):
            raise LoadProcessError(
                f"load process {self.proc.pid} said {line[:80]!r}, expected {key!r}"
            ) from None

    def tell(self, word: str) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write(word.encode() + b"\n")


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def run_load_processes(
    runtime: Runtime,
    users: int,
    sessions: int,
    turns: int,
    processes: int,
    *,
    memchat: Sequence[str],
    load_options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workers: int = 0,
    wait_within: float = 600.0,
    on_clock: Callable[[str], None] | None = None,
) -> ProcessesLoad:
    """Run the load in ``processes`` parts (and ``workers`` ``memchat worker``s), audit once.

    ``memchat`` is the command that runs memchat with the parent's settings
    (``[python, -m, engine.cli, --config, PATH]``); ``load_options`` are the
    ``scenario load`` options that are settings (``--latency-ms``). ``runtime``
    is the parent's, used for the audit only (open it without workers).
    ``on_clock("start")`` and ``on_clock("stop")`` are called as the clock starts
    and stops (the bench reads its CPU meters there).
    """
    plan = shares(users, processes)
    parts: list[_Part] = []
    helpers: list[asyncio.subprocess.Process] = []
    try:
        for share in plan:
            proc = await asyncio.create_subprocess_exec(
                *memchat,
                "scenario",
                "load",
                "--part",
                "--offset",
                str(share.offset),
                "--users",
                str(share.users),
                "--sessions",
                str(sessions),
                "--turns",
                str(turns),
                "--wait-within",
                str(wait_within),
                *load_options,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=dict(env) if env is not None else None,
            )
            parts.append(_Part(share, proc))
        for _ in range(workers):
            helpers.append(
                await asyncio.create_subprocess_exec(
                    *memchat,
                    "worker",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    env=dict(env) if env is not None else None,
                )
            )
        await asyncio.gather(*(p.expect("ready", READY_WITHIN_S) for p in parts))
        meters = [p.meter for p in parts] + [psutil.Process(w.pid) for w in helpers]
        cpu_before = [cpu_seconds(m) for m in meters]
        if on_clock is not None:
            on_clock("start")
        started = time.perf_counter()
        for part in parts:
            part.tell("go")
        reports = await asyncio.gather(*(p.expect("done", wait_within + 60) for p in parts))
        wall = time.perf_counter() - started
        if on_clock is not None:
            on_clock("stop")
        cpu = [cpu_seconds(m) - before for m, before in zip(meters, cpu_before, strict=True)]
        await _stop(parts, helpers)
    finally:
        await _kill([p.proc for p in parts] + helpers)
    result = _merge(users, sessions, turns, wall, reports)
    await audit_into(result, runtime, load_user_ids(users))
    return ProcessesLoad(result, processes, workers, cpu)


def _merge(
    users: int, sessions: int, turns: int, wall: float, reports: Sequence[Mapping[str, Any]]
) -> LoadResult:
    result = LoadResult(users=users, runs=users * sessions * turns, wall_s=wall)
    result.jobs_idle = all(bool(r["jobs_idle"]) for r in reports)
    for report in reports:
        result.failed_turns += int(report["failed_turns"])
        result.turn_errors.update(
            Counter({str(k): int(v) for k, v in report["turn_errors"].items()})
        )
        result.turn_latencies += [float(s) for s in report["turn_latencies"]]
    return result


async def _stop(parts: list[_Part], helpers: list[asyncio.subprocess.Process]) -> None:
    """Tell every part to stop and every worker to drain; each must exit cleanly."""
    for part in parts:
        part.tell("stop")
        assert part.proc.stdin is not None
        part.proc.stdin.close()
    for worker in helpers:
        worker.send_signal(signal.SIGTERM)
    procs = [p.proc for p in parts] + helpers
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_WITHIN_S)
    failed = [(p.pid, code) for p, code in zip(procs, codes, strict=True) if code != 0]
    if failed:
        pid, code = failed[0]
        raise LoadProcessError(f"load process {pid} exited with {code} when told to stop")


async def _kill(procs: list[asyncio.subprocess.Process]) -> None:
    """Whatever still runs after a failure: killed, so no part outlives the command."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# -- a part ----------------------------------------------------------------------


async def _read_word() -> str:
    # The protocol's stdin is a pipe that sends a word now and then: a thread
    # blocked on it costs nothing and needs no loop-specific pipe reader.
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


def _say(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run_part(
    runtime: Runtime, share: Share, sessions: int, turns: int, *, wait_within: float
) -> int:
    """One process's share of a load, spoken over the protocol above. Returns an exit code."""
    ids = load_user_ids(share.users, share.offset)
    await reset_users(runtime.store, ids)
    session_ids = await create_load_sessions(runtime, ids, sessions)
    _say({"ready": True})
    word = await _read_word()
    if word != "go":
        return 0 if word in ("", "stop") else 2  # the parent gave up before the start
    result = await run_load(
        runtime,
        share.users,
        sessions,
        turns,
        wait_within=wait_within,
        offset=share.offset,
        session_ids=session_ids,
        audit=False,
    )
    _say(
        {
            "done": {
                "failed_turns": result.failed_turns,
                "turn_errors": dict(result.turn_errors),
                "turn_latencies": [round(s, 4) for s in result.turn_latencies],
                "jobs_idle": result.jobs_idle,
            }
        }
    )
    # Other parts' users may still have jobs: keep taking them until told to stop.
    while (word := await _read_word()) not in ("", "stop"):
        pass
    return 0
