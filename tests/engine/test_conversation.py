"""The conversation service, regenerate in place, live message events and retry events.

Real PostgreSQL (a fresh database per test) and the real openai client over
HTTP against the fake server; a second runtime stands in for another process.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import TurnCompleted, TurnDelta, TurnEvent, TurnFailed, TurnRetrying, TurnStarted
from engine.config import Settings
from engine.conversation import Conversations
from engine.errors import InvalidInput, NotFound
from engine.events import MessageChanged, Subscription, _message_changed
from engine.queue import JobQueue
from engine.runtime import Runtime, open_runtime
from engine.store import MESSAGE_CHANNEL
from tests.conftest import make_settings

pytestmark = pytest.mark.db


def _settings(tmp_path: Path, database_dsn: str, fake: FakeOpenAI, retries: int = 0) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={
            "provider": "openai",
            "base_url": fake.base_url,
            "api_key": "sk-conversation-2b7e19f04c",
            "timeout": 5.0,
            "max_retries": retries,
        },
    )


@pytest.fixture
async def rt(tmp_path: Path, database_dsn: str, fake: FakeOpenAI) -> AsyncIterator[Runtime]:
    # No memory workers: the jobs stay pending, so the test can read them.
    async with open_runtime(_settings(tmp_path, database_dsn, fake), run_workers=False) as runtime:
        yield runtime


async def _events(stream: AsyncIterator[TurnEvent]) -> list[TurnEvent]:
    return [event async for event in stream]


async def _next_message_event(sub: Subscription, op: str) -> MessageChanged:
    async with asyncio.timeout(10):
        async for event in sub:
            if isinstance(event, MessageChanged) and event.op == op:
                return event
    raise AssertionError("subscription ended")


async def test_open_view_is_latest_or_new_and_carries_what_a_pane_shows(rt: Runtime) -> None:
    chats = Conversations.of(rt)
    first = await chats.open_view("alice@example.com")
    assert first.messages == [] and first.total == 0 and first.job.state == "idle"
    again = await chats.open_view("alice@example.com")
    assert again.session.session_id == first.session.session_id, "latest, not another new one"
    await _events(chats.send("alice@example.com", first.session.session_id, "hello"))
    async with rt.store.scope("alice@example.com") as s:
        await s.add_memory("Likes chess")
    view = await chats.open_view("alice@example.com", page=1)
    assert [m.content for m in view.messages] == ["Echo: hello"]
    assert view.total == 2
    assert [m.content for m in view.memories] == ["Likes chess"]
    older = await chats.older(
        "alice@example.com", view.session.session_id, view.messages[0].message_id
    )
    assert [m.content for m in older] == ["hello"]
    # The CLI's pick: the same rule, and --new-session makes another.
    picked = await chats.pick_session("alice@example.com")
    assert picked.session_id == first.session.session_id
    new = await chats.pick_session("alice@example.com", new=True)
    assert new.session_id != first.session.session_id


async def test_regenerate_replaces_the_reply_of_the_same_message(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    chats = Conversations.of(rt)
    user = "alice@example.com"
    sid = (await chats.open_view(user)).session.session_id
    first = await _events(chats.send(user, sid, "hello"))
    started, old_end = first[0], first[-1]
    assert isinstance(started, TurnStarted) and isinstance(old_end, TurnCompleted)
    old_reply = old_end.reply
    again = await _events(chats.regenerate(user, sid))
    assert isinstance(again[0], TurnStarted)
    assert again[0].user_message.message_id == started.user_message.message_id
    assert any(isinstance(e, TurnDelta) for e in again)
    end = again[-1]
    assert isinstance(end, TurnCompleted)
    assert end.reply.message_id != old_reply.message_id
    async with rt.store.scope(user) as s:
        stored = await s.last_messages(sid, 10)
        job_old = await JobQueue.job_for_reply(s, old_reply.message_id)
        job_new = await JobQueue.job_for_reply(s, end.reply.message_id)
    # One user message, one reply: the old reply is gone, the message is not repeated.
    assert [(m.role, m.message_id) for m in stored] == [
        ("user", started.user_message.message_id),
        ("assistant", end.reply.message_id),
    ]
    assert job_old is None, "the old reply's job no longer points at a deleted reply"
    assert job_new is not None, "the new reply is learnt from like any completed reply"
    # The model was asked the same question, without the old reply in the prompt.
    prompt = fake.requests[-1]["messages"]
    assert prompt[-1] == {"role": "user", "content": "hello"}
    assert not any(m["role"] == "assistant" for m in prompt)


async def test_regenerate_a_failed_reply_and_refusals(rt: Runtime, fake: FakeOpenAI) -> None:
    chats = Conversations.of(rt)
    user = "bob@example.com"
    sid = (await chats.open_view(user)).session.session_id
    with pytest.raises(InvalidInput, match="nothing to regenerate"):
        await _events(chats.regenerate(user, sid))
    fake.fail_next("500")
    failed = await _events(chats.send(user, sid, "hi there"))
    assert isinstance(failed[-1], TurnFailed)
    fixed = await _events(chats.regenerate(user, sid))
    assert isinstance(fixed[-1], TurnCompleted)
    async with rt.store.scope(user) as s:
        stored = await s.last_messages(sid, 10)
    assert [(m.role, m.status, m.content) for m in stored] == [
        ("user", "complete", "hi there"),
        ("assistant", "complete", "Echo: hi there"),
    ]
    # Another user cannot regenerate (or even see) bob's session.
    with pytest.raises(NotFound):
        await _events(chats.regenerate("mallory@example.com", sid))
    # What a user wrote stays append-only, even inside their own scope.
    async with rt.store.scope(user) as s:
        deleted = await s.conn.execute("DELETE FROM messages WHERE role = 'user'")
    assert deleted == "DELETE 0"


async def test_a_reply_cannot_be_regenerated_once_the_session_moved_on(rt: Runtime) -> None:
    chats = Conversations.of(rt)
    user = "carol@example.com"
    sid = (await chats.open_view(user)).session.session_id
    await _events(chats.send(user, sid, "first"))
    async with rt.store.scope(user) as s:
        first_message, _ = await s.last_turn(sid)
        await s.append_message(sid, "user", "second, from elsewhere")
    async with rt.store.scope(user) as s:
        with pytest.raises(InvalidInput, match="only the last reply"):
            await s.replace_reply(first_message, "late")


async def test_a_message_written_by_another_process_is_announced_by_ids_only(
    rt: Runtime, tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    user = "dave@example.com"
    sid = (await Conversations.of(rt).open_view(user)).session.session_id
    other_settings = _settings(tmp_path, database_dsn, fake)
    async with (
        rt.events.subscribe(user) as sub,
        open_runtime(other_settings, run_workers=False) as other,
    ):
        end = (await _events(Conversations.of(other).send(user, sid, "from elsewhere")))[-1]
        assert isinstance(end, TurnCompleted)
        inserted = await _next_message_event(sub, "insert")
        assert inserted.session_id == sid and inserted.user_id == user
        await _events(Conversations.of(other).regenerate(user, sid))
        deleted = await _next_message_event(sub, "delete")
        assert deleted.message_id == end.reply.message_id
    # The pane reads back through the scope: what the event names is there.
    after = await Conversations.of(rt).messages_after(user, sid, 0)
    assert [m.role for m in after] == ["user", "assistant"]


def test_message_payloads_are_parsed_to_ids_or_refused() -> None:
    sid = uuid.uuid4()
    good = {"user_id": "a", "session_id": str(sid), "message_id": 3, "op": "insert"}
    assert _message_changed({**good, "content": "secret"}) == MessageChanged("a", sid, 3, "insert")
    for bad in (
        {**good, "message_id": True},
        {**good, "message_id": "3"},
        {**good, "session_id": "not-a-uuid"},
        {**good, "op": "truncate"},
        {**good, "user_id": ""},
    ):
        assert _message_changed(bad) is None, bad


async def test_the_trigger_speaks_on_message_channel(rt: Runtime, database_dsn: str) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.add_listener(MESSAGE_CHANNEL, lambda *args: heard.put_nowait(args[3]))
        sid = (await Conversations.of(rt).open_view("erin@example.com")).session.session_id
        async with rt.store.scope("erin@example.com") as s:
            message = await s.append_message(sid, "user", "ids only, please")
        async with asyncio.timeout(10):
            payload = json.loads(await heard.get())
    finally:
        await conn.close()
    assert payload == {
        "user_id": "erin@example.com",
        "session_id": str(sid),
        "message_id": message.message_id,
        "op": "insert",
    }


async def test_retries_are_told_before_the_reply(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake, retries=2)
    async with open_runtime(settings, run_workers=False) as runtime:
        chats = Conversations.of(runtime)
        sid = (await chats.open_view("finn@example.com")).session.session_id
        fake.fail_next("500", count=2, retry_after=0.01)
        events = await _events(chats.send("finn@example.com", sid, "are you there"))
    retries = [e for e in events if isinstance(e, TurnRetrying)]
    assert retries == [TurnRetrying(1, 2), TurnRetrying(2, 2)]
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TurnDelta))
    assert all(events.index(r) < first_text for r in retries)
    assert isinstance(events[-1], TurnCompleted)
    assert events[-1].reply.content == "Echo: are you there"
