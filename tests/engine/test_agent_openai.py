"""Turns through the real openai client against the fake server, over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import Agent, TurnCompleted, TurnDelta, TurnFailed
from engine.config import ModelSettings, Settings
from engine.models import OpenAIChatModel
from engine.store import Store

pytestmark = pytest.mark.db


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[OpenAIChatModel]:
    settings = ModelSettings(
        provider="openai", base_url=fake.base_url, api_key="sk-test-1234", timeout=2.0
    )
    settings.max_retries = 1
    m = OpenAIChatModel(settings)
    yield m
    await m.aclose()


async def _session(store: Store, user_id: str) -> str:
    async with store.scope(user_id) as s:
        return str((await s.create_session()).session_id)


async def _stored(store: Store, user_id: str, sid: str) -> list[tuple[str, str, str]]:
    async with store.scope(user_id) as s:
        return [(m.role, m.status, m.content) for m in await s.last_messages(sid, 100)]


async def test_streamed_turn_over_http(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    events = [e async for e in agent.stream("alice", sid, "hello over http")]
    deltas = "".join(e.text for e in events if isinstance(e, TurnDelta))
    end = events[-1]
    assert isinstance(end, TurnCompleted)
    assert end.reply.content == deltas == "Echo: hello over http"
    assert end.usage is not None and end.usage.completion_tokens > 0
    assert await _stored(store, "alice", sid) == [
        ("user", "complete", "hello over http"),
        ("assistant", "complete", "Echo: hello over http"),
    ]
    assert fake.requests[-1]["stream"] is True


async def test_prompt_carries_system_memories_and_bounded_history(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    settings.history.max_messages = 3
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    async with store.scope("alice") as s:
        await s.add_memory("Likes chess")
    for i in range(3):
        await agent.run("alice", sid, f"message {i}")
    messages = fake.requests[-1]["messages"]
    assert messages[0]["role"] == "system"
    assert "- Likes chess" in messages[0]["content"]
    # Three earlier messages, then this turn's.
    assert [m["content"] for m in messages[1:]] == [
        "Echo: message 0",
        "message 1",
        "Echo: message 1",
        "message 2",
    ]


@pytest.mark.parametrize(
    ("fault", "error_type"),
    [("429", "rate"), ("500", "server"), ("malformed", "malformed"), ("timeout", "timed out")],
)
async def test_model_errors_fail_the_turn_and_keep_the_message(
    store: Store,
    settings: Settings,
    model: OpenAIChatModel,
    fake: FakeOpenAI,
    fault: str,
    error_type: str,
) -> None:
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    # max_retries=1: the client tries twice and both fail (a malformed body
    # is not retried).
    attempts = 1 if fault == "malformed" else 2
    fake.fail_next(fault, count=attempts, retry_after=0.001)  # type: ignore[arg-type]
    end = await agent.run("alice", sid, "are you there?")
    assert isinstance(end, TurnFailed)
    assert error_type in end.error.lower()
    assert "sk-test-1234" not in end.error
    stored = await _stored(store, "alice", sid)
    assert stored[0] == ("user", "complete", "are you there?")
    assert stored[1][:2] == ("assistant", "failed")
    assert fake.request_count == attempts
    # The next turn works and sees the user's earlier message.
    assert isinstance(await agent.run("alice", sid, "again"), TurnCompleted)


async def test_retried_fault_is_invisible(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    fake.fail_next("429", retry_after=0.001)
    end = await agent.run("alice", sid, "hello")
    assert isinstance(end, TurnCompleted) and end.reply.content == "Echo: hello"


async def test_cut_stream_fails_with_partial_text_kept(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    fake.fail_next("cut", after=3)
    end = await agent.run("alice", sid, "one two three four five six seven")
    assert isinstance(end, TurnFailed)
    partial = end.reply.content
    assert partial and "Echo: one two three four five six seven".startswith(partial)
    assert partial != "Echo: one two three four five six seven"
    assert (await _stored(store, "alice", sid))[1] == ("assistant", "failed", partial)


async def test_cancel_mid_stream_is_seen_by_next_turn(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    fake.token_delay = 0.05
    agent = Agent(store, model, settings)
    sid = await _session(store, "alice")
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for event in agent.stream("alice", sid, "a b c d e f g h i j k l m n o p"):
            if isinstance(event, TurnDelta):
                first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await _stored(store, "alice", sid)
    assert stored[1][:2] == ("assistant", "cancelled")
    partial = stored[1][2]
    assert partial and partial != "Echo: a b c d e f g h i j k l m n o p"
    fake.token_delay = 0.0
    end = await agent.run("alice", sid, "next")
    assert isinstance(end, TurnCompleted)
    history = [m["content"] for m in fake.requests[-1]["messages"][1:]]
    assert history == ["a b c d e f g h i j k l m n o p", partial, "next"]


async def test_two_hundred_users_three_turns_each_on_one_agent(
    store: Store, settings: Settings, fake: FakeOpenAI
) -> None:
    fake.first_token_latency = 0.05
    model_settings = ModelSettings(
        provider="openai", base_url=fake.base_url, api_key="x", timeout=30.0
    )
    model = OpenAIChatModel(model_settings)
    agent = Agent(store, model, settings)
    users = [f"user{i:03d}@example.com" for i in range(200)]
    turns = 3

    async def converse(user_id: str) -> tuple[str, list[str]]:
        sid = await _session(store, user_id)
        replies = []
        for t in range(turns):
            end = await agent.run(user_id, sid, f"I am {user_id}, turn {t}")
            assert isinstance(end, TurnCompleted), end
            assert end.reply.user_id == user_id and str(end.reply.session_id) == sid
            replies.append(end.reply.content)
        return sid, replies

    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(converse(u) for u in users))
    finally:
        await model.aclose()
    wall = time.perf_counter() - started
    for user_id, (sid, replies) in zip(users, results, strict=True):
        assert replies == [f"Echo: I am {user_id}, turn {t}" for t in range(turns)]
        stored = await _stored(store, user_id, sid)
        assert len(stored) == 2 * turns
        assert all(user_id in content for _, _, content in stored)
    async with store.db.admin() as conn:
        total = await conn.fetchval("SELECT count(*) FROM messages")
        distinct = await conn.fetchval(
            "SELECT count(DISTINCT (session_id, role, content)) FROM messages"
        )
    assert total == distinct == len(users) * turns * 2
    ideal = turns * fake.first_token_latency
    print(
        f"\n200 users x {turns} turns: wall {wall:.2f}s, ideal {ideal:.2f}s, "
        f"overhead per turn {(wall - ideal) / turns * 1000:.0f} ms"
    )


async def test_regenerating_carries_at_most_context_limit_memories(
    store: Store, settings: Settings, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    # Issue 15, item 3: never the whole list, on a regenerated reply either.
    settings.memory.context_limit = 3
    agent = Agent(store, model, settings)
    sid = await _session(store, "rena")
    async with store.scope("rena") as s:
        for n in range(12):
            assert await s.add_memory(f"Rena owns plant number {n}.") is not None
    await agent.run("rena", sid, "Which plants do I own?")
    first = _memory_lines(fake.requests[-1])
    events = [e async for e in agent.regenerate("rena", sid)]
    assert isinstance(events[-1], TurnCompleted)
    again = _memory_lines(fake.requests[-1])
    assert fake.requests[-1]["messages"][-1]["content"] == "Which plants do I own?"
    assert 0 < len(again) <= 3, again
    assert len(first) == len(again)


def _memory_lines(request: dict[str, object]) -> list[str]:
    messages = request["messages"]
    assert isinstance(messages, list)
    system = str(messages[0]["content"])
    return [line for line in system.splitlines() if line.startswith("- Rena owns plant")]
