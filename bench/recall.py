"""Memory at scale: a user with 10,000 memories costs what a user with 50 does.

The database is filled in bulk (one INSERT ... SELECT generate_series, as the
owner: the bench is loading, not measuring, here) with ``BIG_USERS`` users of
10,000 memories each, plus one user with ``SMALL`` (50). Memories are short
statements over a vocabulary of ``VOCABULARY`` made-up words and a few
common ones ("the", "likes"), so that turns share words with some memories
and common words with all of them.

Two points:

* prompt and turn: rounds of turns of the small user, then of a big one,
  through the real agent with the offline model at zero latency (no memory
  workers: the turn alone). Figures: characters of the prompt's memory block,
  memchat and PostgreSQL CPU per turn, each for both users, and their ratios;
* retrieval: ``engine.recall.relevant_memories`` alone, inside an open
  scope, for random big users and random turns: p50 / p95 / p99 latency, and
  the CPU a call costs PostgreSQL and memchat (what a shared machine's other
  load does not inflate, unlike the latency);
* vector retrieval (where the server has pgvector): bench/recall_vectors.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import asyncpg

from bench.harness import (
    BenchServer,
    CpuMeter,
    Point,
    PostgresCpu,
    bench_settings,
    percentile,
    used,
)
from bench.recall_vectors import vector_point
from engine.agent import TurnCompleted
from engine.models import ChatMessage, OfflineChatModel, StreamEvent
from engine.models.prompt_blocks import parse_context_memories
from engine.recall import relevant_memories
from engine.runtime import Runtime, open_runtime

VOCABULARY = 5000
SMALL = 50
BIG_USERS = 100
"""Users of 10,000 memories: 1 M rows."""
SMALL_USER = "recall-small"
TARGET_RATIO = 1.10
TARGET_P95_MS = 5.0

_USERS = """
INSERT INTO users (user_id, display_name)
SELECT 'recall-' || u, 'recall-' || u FROM generate_series(0, $1 - 1) AS u
UNION ALL SELECT $2, $2
"""
# A user's i-th memory is i seconds old; words spread over the vocabulary.
_MEMORIES = """
INSERT INTO memories (user_id, content, updated_at, created_at)
SELECT user_id,
       format('Likes the w%s and w%s near w%s (%s)', (i * 7919 + u * 104729) % $3,
              (i * 6007 + u) % $3, (i * 31 + u * 17) % $3, i),
       now() - i * interval '1 second', now() - i * interval '1 second'
FROM unnest($1::text[]) WITH ORDINALITY AS who(user_id, u), generate_series(1, $2) AS i
"""


def _turn(rng: random.Random) -> str:
    words = " and ".join(f"w{rng.randrange(VOCABULARY)}" for _ in range(3))
    return f"What do you think about the {words} today?"


async def _fill(dsn: str, big_users: int, per_user: int) -> float:
    """Seconds to load the users and their memories (GIN index kept up to date)."""
    began = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_USERS, big_users, SMALL_USER)
        # A bulk load: index entries gathered in GIN's pending list and merged
        # by VACUUM at the end, many times faster than one row at a time; then
        # the index is as the migration left it (no pending list: searches
        # never walk one).
        await conn.execute("ALTER INDEX memories_search SET (fastupdate = on)")
        await conn.execute(_MEMORIES, _big_users(big_users), per_user, VOCABULARY)
        await conn.execute(_MEMORIES, [SMALL_USER], SMALL, VOCABULARY)
        await conn.execute("VACUUM ANALYZE memories")
        await conn.execute("ALTER INDEX memories_search SET (fastupdate = off)")
    finally:
        await conn.close()
    return time.perf_counter() - began


def _big_users(count: int) -> list[str]:
    return [f"recall-{u}" for u in range(count)]


class _MeasuringModel(OfflineChatModel):
    """The offline model at zero latency, noting what each prompt's memory block holds."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[tuple[int, int]] = []
        """(memories, characters of their text) per prompt."""

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[StreamEvent, None]:
        shown = parse_context_memories(messages[0].content)
        self.shown.append((len(shown), sum(len(text) for text in shown)))
        return super().stream(messages)


@dataclass(slots=True)
class _Cost:
    turns: int = 0
    memchat_s: float = 0.0
    postgres_s: float = 0.0
    memories: int = 0
    memory_chars: int = 0

    def per_turn_ms(self, seconds: float) -> float:
        return round(seconds / max(self.turns, 1) * 1000, 3)


async def _turns(
    runtime: Runtime, model: _MeasuringModel, meter: CpuMeter, user_id: str, texts: list[str]
) -> _Cost:
    async with runtime.store.scope(user_id) as s:
        session = (await s.create_session()).session_id
    model.shown.clear()
    start = meter.read()
    for text in texts:
        end = await runtime.agent.run(user_id, session, text)
        if not isinstance(end, TurnCompleted):
            raise RuntimeError(f"a recall bench turn failed: {end}")
    stop = meter.read()
    return _Cost(
        turns=len(texts),
        memchat_s=stop.memchat_s - start.memchat_s,
        postgres_s=(stop.postgres_s or 0.0) - (start.postgres_s or 0.0),
        memories=max(n for n, _ in model.shown),
        memory_chars=round(sum(c for _, c in model.shown) / len(model.shown)),
    )


def _ratio(big: float, small: float) -> float | None:
    return round(big / small, 3) if small > 0 else None


async def run(server: BenchServer, *, quick: bool) -> list[Point]:
    big_users, per_user, rounds, turns, samples = (
        (3, 500, 2, 10, 100) if quick else (BIG_USERS, 10_000, 4, 50, 2000)
    )
    dsn = await server.fresh_database()
    model = _MeasuringModel()
    settings = bench_settings(dsn, model={"provider": "offline"})
    async with open_runtime(settings, run_workers=False, model=model) as runtime:
        load_s = await _fill(dsn, big_users, per_user)
        rng = random.Random(15)
        meter = CpuMeter(await PostgresCpu.of(dsn), None)
        big_user = _big_users(big_users)[0]
        # Warm up both users (plans, caches), then alternate them, round by round,
        # so that what else runs on the machine falls on both alike.
        await _turns(runtime, model, meter, SMALL_USER, [_turn(rng) for _ in range(5)])
        await _turns(runtime, model, meter, big_user, [_turn(rng) for _ in range(5)])
        small, big = _Cost(), _Cost()
        for _ in range(rounds):
            for user, total in ((SMALL_USER, small), (big_user, big)):
                cost = await _turns(runtime, model, meter, user, [_turn(rng) for _ in range(turns)])
                total.turns += cost.turns
                total.memchat_s += cost.memchat_s
                total.postgres_s += cost.postgres_s
                total.memories = max(total.memories, cost.memories)
                total.memory_chars = max(total.memory_chars, cost.memory_chars)
        with meter.measure() as readings:
            latencies, leaks = await _retrieval(runtime, _big_users(big_users), samples, rng)
        cpu = used(readings)
        rows = await _row_count(dsn)
        vectors = await vector_point(runtime, dsn, big_user, per_user, samples // 10, rng)
    limit = settings.memory.context_limit
    calls = samples + samples // 10
    turn_point = Point(
        scenario="recall",
        point=f"prompt and turn, {per_user:,} memories vs {SMALL}",
        params={"big_memories": per_user, "small_memories": SMALL, "turns_each": small.turns},
        figures={
            "memories_in_prompt_big": big.memories,
            "memories_in_prompt_small": small.memories,
            "memory_block_chars_big": big.memory_chars,
            "memory_block_chars_small": small.memory_chars,
            "prompt_ratio": _ratio(big.memory_chars, small.memory_chars),
            "memchat_cpu_ms_per_turn_big": big.per_turn_ms(big.memchat_s),
            "memchat_cpu_ms_per_turn_small": small.per_turn_ms(small.memchat_s),
            "memchat_cpu_ratio": _ratio(big.memchat_s, small.memchat_s),
            "postgres_cpu_ms_per_turn_big": big.per_turn_ms(big.postgres_s),
            "postgres_cpu_ms_per_turn_small": small.per_turn_ms(small.postgres_s),
            "postgres_cpu_ratio": _ratio(big.postgres_s, small.postgres_s),
        },
        targets={
            "memories_in_prompt_big": ("<=", limit),
            "prompt_ratio": ("<=", TARGET_RATIO),
            "memchat_cpu_ratio": ("<=", TARGET_RATIO),
        },
    )
    retrieval_point = Point(
        scenario="recall",
        point="memory retrieval",
        params={
            "memories_per_user": per_user,
            "rows_in_database": rows,
            "limit": limit,
            "samples": samples,
        },
        figures={
            "load_s": round(load_s, 1),
            "retrieval_p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "retrieval_p95_ms": round(percentile(latencies, 95) * 1000, 2),
            "retrieval_p99_ms": round(percentile(latencies, 99) * 1000, 2),
            # CPU is what the machine's other load does not inflate: a call's own cost.
            "postgres_cpu_ms_per_retrieval": round((cpu.postgres_s or 0.0) / calls * 1000, 2),
            "memchat_cpu_ms_per_retrieval": round(cpu.memchat_s / calls * 1000, 2),
            "leaks": leaks,
        },
        targets={"retrieval_p95_ms": ("<=", TARGET_P95_MS), "leaks": ("<=", 0)},
    )
    return [turn_point, retrieval_point, *([vectors] if vectors else [])]


async def _retrieval(
    runtime: Runtime, users: list[str], samples: int, rng: random.Random
) -> tuple[list[float], int]:
    """Seconds per relevant_memories call, inside an already open scope, and how
    many memories came back that were not the user's (must be none)."""
    latencies: list[float] = []
    leaks = 0
    limit = runtime.settings.memory.context_limit
    for index in range(samples + samples // 10):
        user = rng.choice(users)
        async with runtime.store.scope(user) as s:
            text = _turn(rng)
            began = time.perf_counter()
            picked = await relevant_memories(s, text, limit)
            took = time.perf_counter() - began
        if len(picked) != limit:
            raise RuntimeError(f"recall returned {len(picked)} memories, not {limit}")
        leaks += sum(1 for memory in picked if memory.user_id != user)
        if index >= samples // 10:  # the first tenth warms up
            latencies.append(took)
    return latencies, leaks


async def _row_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM memories"))
    finally:
        await conn.close()
