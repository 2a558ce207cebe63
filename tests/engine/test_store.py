"""The scoped store: sessions, messages, memories, and what bad input does."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from engine.db import Database
from engine.errors import InvalidInput, NotFound
from engine.store import Store

pytestmark = pytest.mark.db


async def test_sessions_newest_first_with_default_title(store: Store) -> None:
    async with store.scope("alice") as s:
        first = await s.create_session()
        second = await s.create_session("Planning")
        await s.append_message(first.session_id, "user", "  My name is\nAlice  ")
    async with store.scope("alice") as s:
        sessions = await s.list_sessions()
    assert [x.session_id for x in sessions] == [first.session_id, second.session_id]
    assert sessions[0].title == "My name is Alice"
    assert sessions[1].title == "Planning"


async def test_first_user_message_titles_only_untitled_sessions(store: Store) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session("Kept")
        await s.append_message(session.session_id, "user", "something else")
        assert (await s.get_session(session.session_id)).title == "Kept"


async def test_rename_and_delete_session_with_its_messages(store: Store) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session()
        await s.append_message(session.session_id, "user", "hi")
        memory = await s.add_memory(
            "Likes tea", source_session_id=session.session_id, source_message_id=None
        )
        renamed = await s.rename_session(session.session_id, "  Tea\ttalk \x1b[2J ")
        assert renamed.title == "Tea talk [2J"
        await s.delete_session(session.session_id)
        assert await s.list_sessions() == []
        assert await s.conn.fetchval("SELECT count(*) FROM messages") == 0
        kept = await s.get_memory(memory.memory_id)
        assert kept.source_session_id is None
        with pytest.raises(NotFound):
            await s.delete_session(session.session_id)


async def test_last_messages_in_order(store: Store) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session()
        for i in range(10):
            await s.append_message(session.session_id, "user", f"m{i}")
        last = await s.last_messages(session.session_id, 3)
        older = await s.messages_before(session.session_id, last[0].message_id, 2)
        assert [m.content for m in last] == ["m7", "m8", "m9"]
        assert [m.content for m in older] == ["m5", "m6"]
        assert await s.last_messages(session.session_id, 0) == []
        assert await s.count_messages(session.session_id) == 10


async def test_unknown_session_is_not_found(store: Store) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
        with pytest.raises(NotFound, match="no session"):
            await s.append_message(uuid.uuid4(), "user", "hello")
    async with store.scope("nobody") as s:
        with pytest.raises(NotFound, match="no such user"):
            await s.add_memory("Likes tea")
    async with store.scope("alice") as s:
        with pytest.raises(InvalidInput, match="invalid session id"):
            await s.get_session("not-a-uuid")


async def test_memory_duplicates_are_not_inserted(store: Store) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
        first = await s.add_memory("Likes anime", ["Interests", "interests", ""])
        assert first is not None and first.topics == ("interests",)
        assert await s.add_memory("  likes   ANIME. ") is None
        other = await s.add_memory("Likes manga")
        assert other is not None
        with pytest.raises(InvalidInput, match="already says that"):
            await s.update_memory(other.memory_id, "likes anime!")
        # The failed update left the transaction usable.
        updated = await s.update_memory(other.memory_id, "Likes manga a lot", ["hobby"])
        assert updated.content == "Likes manga a lot" and updated.topics == ("hobby",)
        deleted = await s.delete_memory(first.memory_id)
        assert deleted.content == "Likes anime"
        events = await s.memory_events()
    assert [(e.op, e.before, e.after) for e in events] == [
        ("add", None, "Likes anime"),
        ("add", None, "Likes manga"),
        ("update", "Likes manga", "Likes manga a lot"),
        ("delete", "Likes anime", None),
    ]


async def test_memory_changes_notify_listeners(store: Store, db: Database) -> None:
    received: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(*args: object) -> None:
        received.put_nowait(str(args[3]))

    conn = await db.pool.acquire()
    try:
        await conn.add_listener("memchat_memory", on_notify)
        async with store.scope("alice") as s:
            await s.ensure_user()
            await s.add_memory("Likes tea")
        payload = await asyncio.wait_for(received.get(), 10)
        await conn.remove_listener("memchat_memory", on_notify)
    finally:
        await db.pool.release(conn)
    assert '"user_id" : "alice"' in payload and '"op" : "add"' in payload


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("nul\x00byte", "nul\ufffdbyte"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("\x1b[2J[bold]kept literally[/bold]", "\x1b[2J[bold]kept literally[/bold]"),
        ("emoji 🎉 and عربى and e\u0301", "emoji 🎉 and عربى and e\u0301"),
        ("'; DROP TABLE messages; --", "'; DROP TABLE messages; --"),
    ],
)
async def test_awkward_text_is_stored_or_normalised_as_documented(
    store: Store, text: str, stored: str
) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session()
        message = await s.append_message(session.session_id, "user", text)
        memory = await s.add_memory(text)
        assert message.content == stored
        assert (await s.last_messages(session.session_id, 1))[0].content == stored
        assert memory is not None and memory.content == " ".join(stored.split())


@pytest.mark.parametrize(
    ("text", "error"),
    [("", "memory is empty"), ("   \n\t", "memory is empty"), ("x" * 501, "too long")],
)
async def test_bad_memory_text_is_refused_and_nothing_written(
    store: Store, text: str, error: str
) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
        with pytest.raises(InvalidInput, match=error):
            await s.add_memory(text)
        assert await s.list_memories() == []


@pytest.mark.parametrize(
    ("user_id", "error"),
    [
        ("", "user id is empty"),
        ("   ", "user id is empty"),
        ("a" * 129, "too long"),
        ("bad id", "invalid user id"),
        ("x\x00y", "invalid user id"),
        ("-leading", "invalid user id"),
        ("\x1b]0;pwned\x07", "invalid user id"),
    ],
)
async def test_invalid_user_ids_are_refused(store: Store, user_id: str, error: str) -> None:
    with pytest.raises(InvalidInput, match=error) as info:
        async with store.scope(user_id):
            pass
    assert "\x1b" not in str(info.value) and "\x00" not in str(info.value)


async def test_user_id_surrounding_space_is_trimmed(store: Store) -> None:
    async with store.scope("  alice@example.com ") as s:
        user = await s.ensure_user()
    assert user.user_id == "alice@example.com"
