"""Turns with the offline model: streaming, persistence, memories in context, cancel."""

from __future__ import annotations

import asyncio

import pytest

from engine.agent import Agent, TurnCompleted, TurnDelta, TurnStarted
from engine.config import Settings
from engine.errors import InvalidInput, NotFound
from engine.models import OfflineChatModel
from engine.store import Store

pytestmark = pytest.mark.db


async def _session(store: Store, user_id: str) -> str:
    async with store.scope(user_id) as s:
        return str((await s.create_session()).session_id)


async def test_turn_streams_and_stores_both_messages(store: Store, settings: Settings) -> None:
    agent = Agent(store, OfflineChatModel(), settings)
    sid = await _session(store, "alice")
    events = [e async for e in agent.stream("alice", sid, "My name is Alice.")]
    assert isinstance(events[0], TurnStarted)
    deltas = [e.text for e in events if isinstance(e, TurnDelta)]
    assert len(deltas) > 1
    end = events[-1]
    assert isinstance(end, TurnCompleted)
    assert end.reply.content == "".join(deltas)
    async with store.scope("alice") as s:
        stored = await s.last_messages(sid, 10)
    assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert stored[0].content == "My name is Alice."
    assert stored[1].content == end.reply.content


async def test_memories_in_context_answer_the_name(store: Store, settings: Settings) -> None:
    agent = Agent(store, OfflineChatModel(), settings)
    sid = await _session(store, "mark")
    before = await agent.run("mark", sid, "What is my name?")
    assert "don't know" in before.reply.content
    async with store.scope("mark") as s:
        await s.add_memory("Name is Mark Gonzales", ["name"])
    after = await agent.run("mark", sid, "What is my name?")
    assert "Mark Gonzales" in after.reply.content


async def test_memories_left_out_when_add_to_context_is_off(
    store: Store, settings: Settings
) -> None:
    settings.memory.add_to_context = False
    agent = Agent(store, OfflineChatModel(), settings)
    sid = await _session(store, "mark")
    async with store.scope("mark") as s:
        await s.add_memory("Name is Mark Gonzales", ["name"])
    reply = await agent.run("mark", sid, "What is my name?")
    assert "Mark" not in reply.reply.content


async def test_bad_input_stores_nothing(store: Store, settings: Settings) -> None:
    agent = Agent(store, OfflineChatModel(), settings)
    sid = await _session(store, "alice")
    for text, error in [("", "empty"), ("  \n", "empty"), ("x" * 100_001, "too long")]:
        with pytest.raises(InvalidInput, match=error):
            await agent.run("alice", sid, text)
    with pytest.raises(NotFound):
        await agent.run("alice", "00000000-0000-0000-0000-000000000000", "hi")
    with pytest.raises(NotFound):  # bob's session, seen from alice
        await agent.run("alice", await _session(store, "bob"), "hi")
    async with store.scope("alice") as s:
        assert await s.count_messages(sid) == 0


async def test_cancel_mid_stream_keeps_partial_reply_for_next_turn(
    store: Store, settings: Settings
) -> None:
    # A slow stream so that the cancel lands in the middle of it.
    agent = Agent(store, OfflineChatModel(token_delay_ms=20), settings)
    sid = await _session(store, "alice")
    got_delta = asyncio.Event()
    seen: list[str] = []

    async def consume() -> None:
        async for event in agent.stream("alice", sid, "Tell me something long please"):
            if isinstance(event, TurnDelta):
                seen.append(event.text)
                got_delta.set()

    task = asyncio.create_task(consume())
    await got_delta.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with store.scope("alice") as s:
        stored = await s.last_messages(sid, 10)
    assert [m.status for m in stored] == ["complete", "cancelled"]
    partial = stored[1].content
    assert partial and partial.startswith(seen[0])
    full = await Agent(store, OfflineChatModel(), settings).run(
        "alice", sid, "Tell me something long please"
    )
    assert partial != full.reply.content, "the cancelled reply should be a strict prefix"
    assert full.reply.content.startswith(partial)


async def test_closing_the_stream_early_counts_as_cancelled(
    store: Store, settings: Settings
) -> None:
    agent = Agent(store, OfflineChatModel(), settings)
    sid = await _session(store, "alice")
    stream = agent.stream("alice", sid, "Hello there, how are you today?")
    async for event in stream:
        if isinstance(event, TurnDelta):
            break
    await stream.aclose()
    async with store.scope("alice") as s:
        stored = await s.last_messages(sid, 10)
    assert [m.status for m in stored] == ["complete", "cancelled"]
