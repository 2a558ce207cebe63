"""The workload: N users at once, each with S sessions of T turns, in order.

Users run concurrently (``asyncio.gather``), each user's turns one after the
other, like people typing; the run ends when every memory job is done. Each
turn's start and end times are kept, and the audit (through the read-only
admin path) counts leaks, lost jobs and duplicates.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from engine.agent import TurnCompleted
from engine.runtime import Runtime
from engine.scenarios import audit_load, load_message, load_user_id

JOBS_WITHIN_S = 600.0


@dataclass(slots=True)
class LoadRun:
    users: int
    sessions: int
    turns: int
    wall_s: float = 0.0
    turns_done_s: float = 0.0
    """When the last turn ended (before waiting for memory jobs)."""
    turn_latencies: list[float] = field(default_factory=list)
    completed_at: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Per user, when each completed turn ended (perf_counter), in order."""
    failed_turns: int = 0
    audit: dict[str, int] = field(default_factory=dict)

    @property
    def runs(self) -> int:
        return self.users * self.sessions * self.turns


def user_ids(users: int, offset: int = 0) -> list[str]:
    return [load_user_id(i) for i in range(offset + 1, offset + users + 1)]


async def create_sessions(runtime: Runtime, ids: list[str], sessions: int) -> dict[str, list[str]]:
    """Each user's sessions, made before the clock starts."""
    made: dict[str, list[str]] = {}

    async def make(user_id: str) -> None:
        async with runtime.store.scope(user_id) as s:
            made[user_id] = [
                str((await s.create_session(f"bench session {n + 1}")).session_id)
                for n in range(sessions)
            ]

    await asyncio.gather(*(make(u) for u in ids))
    return made


async def run_load(
    runtime: Runtime,
    users: int,
    sessions: int,
    turns: int,
    *,
    offset: int = 0,
    audit: bool = True,
    session_ids: dict[str, list[str]] | None = None,
) -> LoadRun:
    ids = user_ids(users, offset)
    session_ids = session_ids or await create_sessions(runtime, ids, sessions)
    run = LoadRun(users, sessions, turns)

    async def user(index: int, user_id: str) -> None:
        for session, sid in enumerate(session_ids[user_id][:sessions]):
            for turn in range(turns):
                began = time.perf_counter()
                end = await runtime.agent.run(user_id, sid, load_message(index, session, turn))
                ended = time.perf_counter()
                run.turn_latencies.append(ended - began)
                if isinstance(end, TurnCompleted):
                    run.completed_at[user_id].append(ended)
                else:
                    run.failed_turns += 1

    started = time.perf_counter()
    await asyncio.gather(*(user(offset + n + 1, uid) for n, uid in enumerate(ids)))
    run.turns_done_s = time.perf_counter() - started
    if not await runtime.workers.wait_idle(ids, within=JOBS_WITHIN_S):
        raise RuntimeError(f"memory jobs still open after {JOBS_WITHIN_S:g}s")
    run.wall_s = time.perf_counter() - started
    if audit:
        run.audit = await audit_load(runtime, ids)
    return run
