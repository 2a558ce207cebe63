"""Isolation is enforced by PostgreSQL, not by the queries being careful."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from engine.admin import OPTIONAL_USER_TABLES, USER_OWNED_TABLES, AdminReader
from engine.db import Database
from engine.errors import NotFound
from engine.store import Store

pytestmark = pytest.mark.db


async def _seed(store: Store, user_id: str) -> tuple[uuid.UUID, uuid.UUID]:
    async with store.scope(user_id) as s:
        session = await s.create_session(f"{user_id}'s session")
        await s.append_message(session.session_id, "user", f"I am {user_id}")
        await s.append_message(session.session_id, "assistant", f"Hello {user_id}")
        memory = await s.add_memory(f"Name is {user_id}", ["name"])
        assert memory is not None
    return session.session_id, memory.memory_id


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
async def test_unfiltered_select_sees_only_own_rows(store: Store, db: Database, table: str) -> None:
    await _seed(store, "alice")
    await _seed(store, "bob")
    async with db.scoped("alice") as conn:
        rows = await conn.fetch(f"SELECT user_id FROM {table}")  # deliberately no WHERE
    if table == "memory_jobs":
        assert rows == []
    else:
        assert rows, f"alice should see her own {table}"
        assert {row["user_id"] for row in rows} == {"alice"}


async def test_no_scope_sees_nothing(db: Database, store: Store) -> None:
    await _seed(store, "alice")
    async with db._connection() as conn:
        assert await conn.fetch("SELECT * FROM memories") == []
        assert await conn.fetch("SELECT * FROM messages") == []


async def test_runtime_role_cannot_bypass_rls(db: Database) -> None:
    async with db.scoped("alice") as conn:
        row = await conn.fetchrow(
            "SELECT current_user AS role, session_user AS login, rolsuper, rolbypassrls "
            "FROM pg_roles WHERE rolname = current_user"
        )
    assert row["role"] == row["login"] == db.roles.app
    assert not row["rolsuper"]
    assert not row["rolbypassrls"]
    assert all(
        flags == (True, True) for flags in (await AdminReader(db).row_level_security()).values()
    )
    checked = set(await AdminReader(db).row_level_security())
    assert set(USER_OWNED_TABLES) <= checked <= set(USER_OWNED_TABLES + OPTIONAL_USER_TABLES)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO users (user_id, display_name) VALUES ('bob', 'Bob')",
        "INSERT INTO memories (user_id, content) VALUES ('bob', 'Name is Mallory')",
        "INSERT INTO memory_events (memory_id, user_id, op) "
        "VALUES (gen_random_uuid(), 'bob', 'add')",
        "INSERT INTO memory_jobs (user_id) VALUES ('bob')",
        "INSERT INTO sessions (user_id) VALUES ('bob')",
    ],
)
async def test_writing_another_users_row_fails(store: Store, db: Database, statement: str) -> None:
    await _seed(store, "alice")
    await _seed(store, "bob")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with db.scoped("alice") as conn:
            await conn.execute(statement)


async def test_message_into_another_users_session_fails(store: Store, db: Database) -> None:
    await _seed(store, "alice")
    bob_session, _ = await _seed(store, "bob")
    with pytest.raises(NotFound):
        async with store.scope("alice") as s:
            await s.append_message(bob_session, "user", "sneaky")
    # Even raw SQL naming alice as the owner cannot attach it to bob's session.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with db.scoped("alice") as conn:
            await conn.execute(
                "INSERT INTO messages (session_id, user_id, role, content) "
                "VALUES ($1, 'alice', 'user', 'sneaky')",
                bob_session,
            )
    async with store.scope("bob") as s:
        assert [m.content for m in await s.last_messages(bob_session, 10)] == [
            "I am bob",
            "Hello bob",
        ]


async def test_update_or_delete_another_users_memory_changes_nothing(store: Store) -> None:
    await _seed(store, "alice")
    _, bob_memory = await _seed(store, "bob")
    async with store.scope("alice") as s:
        with pytest.raises(NotFound):
            await s.update_memory(bob_memory, "Name is Mallory")
        with pytest.raises(NotFound):
            await s.delete_memory(bob_memory)
        with pytest.raises(NotFound):
            await s.get_memory(bob_memory)
    async with store.scope("alice") as s:
        # Raw statements by id: zero rows affected.
        assert await s.conn.execute("UPDATE memories SET content = 'x'") == "UPDATE 1"
        assert (
            await s.conn.execute("DELETE FROM memories WHERE memory_id = $1", bob_memory)
            == "DELETE 0"
        )
    async with store.scope("bob") as s:
        memory = await s.get_memory(bob_memory)
        assert memory.content == "Name is bob"
        assert [e.op for e in await s.memory_events()] == ["add"]


async def test_session_of_another_user_is_not_found(store: Store) -> None:
    bob_session, _ = await _seed(store, "bob")
    async with store.scope("alice") as s:
        with pytest.raises(NotFound):
            await s.get_session(bob_session)
        with pytest.raises(NotFound):
            await s.rename_session(bob_session, "mine now")
        with pytest.raises(NotFound):
            await s.delete_session(bob_session)
    async with store.scope("bob") as s:
        assert (await s.get_session(bob_session)).title == "bob's session"


async def test_admin_reads_everyone_but_cannot_write(store: Store, db: Database) -> None:
    await _seed(store, "alice")
    await _seed(store, "bob")
    summaries = await AdminReader(db).list_users()
    assert [(u.user_id, u.sessions, u.messages, u.memories) for u in summaries] == [
        ("alice", 1, 2, 1),
        ("bob", 1, 2, 1),
    ]
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        async with db.admin() as conn:
            await conn.execute("DELETE FROM memories")


async def test_one_hundred_concurrent_writers_each_see_exactly_their_rows(
    store: Store, db: Database
) -> None:
    users = [f"user{i:03d}@example.com" for i in range(100)]

    async def write(user_id: str) -> None:
        async with store.scope(user_id) as s:
            session = await s.create_session()
        for turn in range(3):
            async with store.scope(user_id) as s:
                await s.append_message(session.session_id, "user", f"{user_id} turn {turn}")
                await s.append_message(session.session_id, "assistant", f"reply to {user_id}")
                await s.add_memory(f"{user_id} fact {turn}", ["test"])

    await asyncio.gather(*(write(u) for u in users))

    async def check(user_id: str) -> None:
        async with db.scoped(user_id) as conn:
            messages = await conn.fetch("SELECT user_id, content FROM messages")
            memories = await conn.fetch("SELECT user_id, content FROM memories")
            sessions = await conn.fetch("SELECT user_id FROM sessions")
        assert len(messages) == 6 and len(memories) == 3 and len(sessions) == 1
        assert {r["user_id"] for r in messages + memories + sessions} == {user_id}
        assert all(user_id in r["content"] for r in messages + memories)

    await asyncio.gather(*(check(u) for u in users))
    summaries = await AdminReader(db).list_users()
    assert len(summaries) == 100
    assert {(s.messages, s.memories) for s in summaries} == {(6, 3)}
