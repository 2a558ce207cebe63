"""The benchmarks' workload: ``engine.scenarios.run_load`` on sessions made ahead.

N users at once, each with S sessions of T turns in order, until every
memory job is done. The sessions are made before the clock starts, so the
figures are about turns and jobs only; a run whose jobs do not finish is an
error, not a figure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from engine.runtime import Runtime
from engine.scenarios import LoadResult, create_load_sessions, load_user_ids
from engine.scenarios import run_load as run_scenario_load

JOBS_WITHIN_S = 600.0


async def run_load(
    runtime: Runtime,
    users: int,
    sessions: int,
    turns: int,
    *,
    offset: int = 0,
    audit: bool = True,
    session_ids: dict[str, list[str]] | None = None,
) -> LoadResult:
    if session_ids is None:
        session_ids = await create_load_sessions(runtime, load_user_ids(users, offset), sessions)
    result = await run_scenario_load(
        runtime,
        users,
        sessions,
        turns,
        wait_within=JOBS_WITHIN_S,
        offset=offset,
        session_ids=session_ids,
        audit=audit,
    )
    if not result.jobs_idle:
        raise RuntimeError(f"memory jobs still open after {JOBS_WITHIN_S:g}s")
    return result


class ModelCalls:
    """How many extraction calls this process's memory manager made."""

    count = 0


@contextlib.contextmanager
def counting_memory_calls(runtime: Runtime) -> Iterator[ModelCalls]:
    """Count ``MemoryManager.plan`` (one model call each) while the block runs."""
    manager = runtime.dispatcher.manager
    original = manager.plan
    calls = ModelCalls()

    async def plan(*args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        return await original(*args, **kwargs)

    setattr(manager, "plan", plan)  # noqa: B010 (an instance attribute over the method)
    try:
        yield calls
    finally:
        delattr(manager, "plan")
