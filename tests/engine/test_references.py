"""Issue 12 finding 12: rows cannot name another user's ids; NOTIFY is only a hint.

Real PostgreSQL, through the runtime role and a user's scope, as a hostile
(or buggy) scope would write.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from engine.admin import AdminReader
from engine.db import Database
from engine.events import EventHub, JobChanged, MemoryChanged
from engine.queue import JOB_CHANNEL, JobQueue
from engine.store import MEMORY_CHANNEL, Store

pytestmark = pytest.mark.db


async def _alices_rows(store: Store) -> tuple[uuid.UUID, int, uuid.UUID]:
    async with store.scope("alice") as s:
        session = await s.create_session()
        message = await s.append_message(session.session_id, "user", "My name is Alice.")
        memory = await s.add_memory("Name is Alice")
    assert memory is not None
    return session.session_id, message.message_id, memory.memory_id


async def test_a_job_cannot_name_another_users_session_or_messages(
    store: Store, db: Database
) -> None:
    session_id, message_id, _ = await _alices_rows(store)
    async with store.scope("bob") as s:
        await s.ensure_user()
    forged = [
        ("session_id", session_id),
        ("user_message_id", message_id),
        ("assistant_message_id", message_id),
    ]
    for column, value in forged:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            async with db.scoped("bob") as conn:
                await conn.execute(
                    f"INSERT INTO memory_jobs (user_id, {column}) VALUES ('bob', $1)", value
                )
    result = await AdminReader(db).audit()
    assert result.ok, result.findings


async def test_an_event_cannot_name_another_users_memory(store: Store, db: Database) -> None:
    _, _, memory_id = await _alices_rows(store)
    async with store.scope("bob") as s:
        await s.ensure_user()
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with db.scoped("bob") as conn:
            await conn.execute(
                "INSERT INTO memory_events (memory_id, user_id, op, after) "
                "VALUES ($1, 'bob', 'update', 'Name is Bob')",
                memory_id,
            )
    # Nor can bob take over the id by creating a memory with it once it is gone.
    async with store.scope("alice") as s:
        await s.delete_memory(memory_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with db.scoped("bob") as conn:
            await conn.execute(
                "INSERT INTO memories (memory_id, user_id, content) VALUES ($1, 'bob', 'x')",
                memory_id,
            )
    assert (await AdminReader(db).audit()).ok


async def test_history_outlives_the_memory_and_jobs_outlive_their_session(
    store: Store,
) -> None:
    session_id, message_id, memory_id = await _alices_rows(store)
    async with store.scope("alice") as s:
        user_message = (await s.get_messages([message_id]))[message_id]
        reply = await s.append_message(
            session_id, "assistant", "Hi Alice", follow_up=JobQueue.with_reply(user_message)
        )
        queued = await JobQueue.job_for_reply(s, reply.message_id)
        assert queued is not None
        job_id = queued.job_id
        await s.update_memory(memory_id, "Name is Alice B")
        await s.delete_memory(memory_id)
    async with store.scope("alice") as s:
        ops = [e.op for e in await s.memory_events(memory_id)]
        assert ops == ["add", "update", "delete"]
        await s.delete_session(session_id)
        job = next(j for j in await JobQueue.list_jobs(s) if j.job_id == job_id)
    assert (job.session_id, job.user_message_id, job.assistant_message_id) == (None, None, None)


async def test_forged_notifications_carry_nothing_a_listener_trusts(
    store: Store, db: Database, database_dsn: str
) -> None:
    """Payloads are hints: a forged one with content is parsed to ids only."""
    hub = EventHub(db)
    await hub.start()
    try:
        async with hub.subscribe("alice") as events:
            forger = await asyncpg.connect(database_dsn)
            try:
                payload = {
                    "user_id": "alice",
                    "memory_id": str(uuid.uuid4()),
                    "op": "add",
                    "content": "EVIL: alice's password is hunter2",
                }
                await forger.execute(
                    "SELECT pg_notify($1, $2)", MEMORY_CHANNEL, json.dumps(payload)
                )
                await forger.execute(
                    "SELECT pg_notify($1, $2)",
                    JOB_CHANNEL,
                    json.dumps(
                        {"user_id": "alice", "job_id": 1, "state": "failed", "error": "EVIL"}
                    ),
                )
            finally:
                await forger.close()
            first = await asyncio.wait_for(anext(events), 10)
            second = await asyncio.wait_for(anext(events), 10)
    finally:
        await hub.close()
    assert isinstance(first, MemoryChanged) and isinstance(second, JobChanged)
    assert "EVIL" not in repr(first) and "EVIL" not in repr(second)
    # And what the store itself sends carries ids and an op, never content.
    async with store.scope("alice") as s:
        assert (await JobQueue.job_state(s)) == ("idle", None)


async def test_payloads_the_store_sends_carry_ids_only(store: Store, database_dsn: str) -> None:
    listener = await asyncpg.connect(database_dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(MEMORY_CHANNEL, lambda *args: received.put_nowait(args[3]))
    try:
        memory_id = (await _alices_rows(store))[2]
        async with store.scope("alice") as s:
            await s.update_memory(memory_id, "Name is Alice Secret")
            await s.delete_memory(memory_id)
        payloads = [json.loads(await asyncio.wait_for(received.get(), 10)) for _ in range(3)]
    finally:
        await listener.close()
    for payload in payloads:
        assert set(payload) == {"user_id", "memory_id", "op", "event_id"}, payload
        assert "Alice" not in json.dumps(payload)
