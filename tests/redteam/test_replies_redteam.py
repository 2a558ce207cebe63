"""Red team against what landed with issues 13/14: migration 0008 (the app may DELETE
replies; a NOTIFY per message), regenerate in place, coalesced extraction.

All real: PostgreSQL (a fresh database per test, a second database on the same
cluster), the engine's own runtime, the real `openai` client over HTTP to
bench/fake_openai.py playing a malicious endpoint.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import TurnStarted
from engine.config import Settings
from engine.db.database import Database
from engine.db.dsn import with_database
from engine.errors import NotFound
from engine.runtime import open_runtime
from engine.store import MESSAGE_CHANNEL, Store
from tests.conftest import make_settings

pytestmark = pytest.mark.db

ALICE, BOB = "alice@example.com", "bob@example.com"


async def _turn(store: Store, user: str, said: str, replied: str) -> tuple[uuid.UUID, int, int]:
    async with store.scope(user) as s:
        sid = (await s.create_session("t")).session_id
        u = await s.append_message(sid, "user", said)
        r = await s.append_message(sid, "assistant", replied)
    return sid, u.message_id, r.message_id


# -- 0008: DELETE through the app login -------------------------------------------------


async def test_app_login_deletes_only_its_users_replies(db: Database, store: Store) -> None:
    """Attack: from Alice's scope (the app login, as a user tab has it), DELETE every
    message, Bob's by id, and Alice's own user message; UPDATE a message. Held: only
    Alice's assistant rows go; a user's words stay append-only; nobody can edit."""
    _, a_user, _ = await _turn(store, ALICE, "alice said", "alice reply")
    b_sid, b_user, b_reply = await _turn(store, BOB, "bob said", "bob reply")
    async with db.scoped(ALICE) as conn:
        assert await conn.execute("DELETE FROM messages WHERE message_id = $1", b_reply) == (
            "DELETE 0"
        )
        assert await conn.execute("DELETE FROM messages WHERE message_id = $1", a_user) == (
            "DELETE 0"
        )
        assert await conn.execute("DELETE FROM messages") == "DELETE 1"  # alice's reply only
    async with db.scoped(ALICE) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "UPDATE messages SET content = 'forged' WHERE message_id = $1", a_user
            )
    async with db.scoped(ALICE) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE messages")
    # Planting a reply in Bob's session: his session id with Alice's user id, or Bob's.
    async with db.scoped(ALICE) as conn:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO messages (user_id, session_id, role, content) "
                "VALUES ($1, $2, 'assistant', 'planted')",
                ALICE,
                b_sid,
            )
    async with db.scoped(ALICE) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO messages (user_id, session_id, role, content) "
                "VALUES ($1, $2, 'assistant', 'planted')",
                BOB,
                b_sid,
            )
    async with db.unscoped() as conn:  # no scope: no rows at all
        assert await conn.execute("DELETE FROM messages") == "DELETE 0"
    async with db.admin() as conn:
        left = await conn.fetch("SELECT message_id, user_id, role FROM messages ORDER BY 1")
    assert [(r["user_id"], r["role"]) for r in left] == [
        (ALICE, "user"),
        (BOB, "user"),
        (BOB, "assistant"),
    ]
    assert {r["message_id"] for r in left} == {a_user, b_user, b_reply}


async def _listen(dsn: str) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    conn = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(MESSAGE_CHANNEL, lambda *args: got.put_nowait(args[3]))
    return conn, got


async def test_message_notifications_carry_ids_only_and_stay_in_their_database(
    db: Database, store: Store, database_dsn: str, pg_server_dsn: str
) -> None:
    """Attack: (1) make the trigger leak content: a message whose text is a secret;
    (2) forge a notification from ANOTHER database on the same cluster (another
    deployment, or any login that can connect to `postgres`). Held: the payload is ids
    and an operation; PostgreSQL delivers NOTIFY within its database only (the foreign
    one, sent first, never arrives before our own sentinel)."""
    listener, got = await _listen(database_dsn)
    other_db = f"redteam_other_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{other_db}"')
        sid, _, _ = await _turn(store, ALICE, "SECRET-PASSPORT-123", "SECRET-REPLY-456")
        payloads = [json.loads(await asyncio.wait_for(got.get(), 30)) for _ in range(2)]
        for payload in payloads:
            assert set(payload) == {"user_id", "session_id", "message_id", "op"}
            assert "SECRET" not in json.dumps(payload)
            assert payload["user_id"] == ALICE and payload["session_id"] == str(sid)

        foreign = await asyncpg.connect(with_database(pg_server_dsn, other_db))
        try:
            forged = {"user_id": ALICE, "session_id": str(sid), "message_id": 1, "op": "delete"}
            await foreign.execute("SELECT pg_notify($1, $2)", MESSAGE_CHANNEL, json.dumps(forged))
        finally:
            await foreign.close()
        async with db.scoped(ALICE) as conn:
            await conn.execute("SELECT pg_notify($1, 'sentinel')", MESSAGE_CHANNEL)
        assert await asyncio.wait_for(got.get(), 30) == "sentinel"
        assert got.empty()
    finally:
        await listener.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
        await admin.close()


# -- regenerate ---------------------------------------------------------------------------


def _offline(tmp_path: Path, dsn: str, delay_ms: float = 0.0) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": dsn, "pool_max_size": 20},
        model={"provider": "offline", "offline_token_delay_ms": delay_ms},
    )


async def test_regenerate_on_another_users_session_is_refused(
    tmp_path: Path, database_dsn: str
) -> None:
    """Attack: Alice's agent regenerates Bob's session (its id learnt somehow). Held:
    NotFound through Alice's scope; Bob's reply and message untouched."""
    async with open_runtime(_offline(tmp_path, database_dsn), run_workers=False) as rt:
        sid, b_user, b_reply = await _turn(rt.store, BOB, "bob said", "bob reply")
        async with rt.store.scope(ALICE) as s:
            await s.ensure_user()
        with pytest.raises(NotFound):
            async for _ in rt.agent.regenerate(ALICE, sid):
                pass
        async with rt.store.scope(BOB) as s:
            left = await s.last_messages(sid, 10)
    assert [(m.message_id, m.content) for m in left] == [
        (b_user, "bob said"),
        (b_reply, "bob reply"),
    ]


USERS = 50


async def test_two_regenerates_at_once_leave_one_reply_and_the_users_words(
    tmp_path: Path, database_dsn: str
) -> None:
    """Attack: two processes regenerate the same reply at the same moment, for 50
    users at once. Held: each session ends with its user message and exactly one
    reply (the row lock serialises replace_reply; the second deletes the first's)."""
    users = [f"r{n}@example.com" for n in range(USERS)]
    async with open_runtime(_offline(tmp_path, database_dsn), run_workers=False) as rt:
        sessions = {}
        for user in users:
            async with rt.store.scope(user) as s:
                sessions[user] = (await s.create_session("race")).session_id
        await asyncio.gather(*(rt.agent.run(u, sessions[u], f"hello from {u}") for u in users))

        async def regenerate(user: str) -> None:
            async for _ in rt.agent.regenerate(user, sessions[user]):
                pass

        await asyncio.gather(*(regenerate(u) for u in users for _ in range(2)))
        for user in users:
            async with rt.store.scope(user) as s:
                left = await s.last_messages(sessions[user], 10)
            assert [m.role for m in left] == ["user", "assistant"], user
            assert left[0].content == f"hello from {user}"


@pytest.mark.xfail(
    strict=True,
    reason="red team finding R2: a regenerate that starts while a turn's reply is still "
    "streaming (another process: a CLI, a second tab of the same user) answers that turn "
    "too; both replies are stored, the turn ends with two",
)
async def test_regenerate_during_a_streaming_reply_leaves_one_reply(
    tmp_path: Path, database_dsn: str
) -> None:
    """Attack: while a reply streams (its user message stored, no reply yet), another
    process regenerates the session, for 50 users at once. Expected: one reply per
    user message. On main: `_begin_again` takes the reply-less user message as its
    turn ("a message left without a reply gets one"), `replace_reply` deletes nothing,
    and the streaming turn then appends its own reply: two replies."""
    users = [f"s{n}@example.com" for n in range(USERS)]
    async with open_runtime(_offline(tmp_path, database_dsn), run_workers=False) as rt:
        sessions = {}
        for user in users:
            async with rt.store.scope(user) as s:
                sessions[user] = (await s.create_session("race")).session_id

        async def both(user: str) -> None:
            started, regenerated = asyncio.Event(), asyncio.Event()

            async def talk() -> None:
                async for event in rt.agent.stream(user, sessions[user], f"hi from {user}"):
                    if isinstance(event, TurnStarted):
                        started.set()
                        # A slow model: this reply is still coming while the other
                        # process regenerates (the stream waits for its reader).
                        await regenerated.wait()

            async def regenerate() -> None:
                await started.wait()
                async for _ in rt.agent.regenerate(user, sessions[user]):
                    pass
                regenerated.set()

            await asyncio.gather(talk(), regenerate())

        await asyncio.gather(*(both(u) for u in users))
        doubled = []
        for user in users:
            async with rt.store.scope(user) as s:
                left = await s.last_messages(sessions[user], 10)
            assert left[0].content == f"hi from {user}"  # the user's words are never lost
            if [m.role for m in left] != ["user", "assistant"]:
                doubled.append(user)
    assert doubled == [], f"{len(doubled)} of {USERS} turns have two replies"


# -- coalesced extraction: forged turn labels ---------------------------------------------


async def test_forged_turn_labels_stay_within_the_jobs_own_turns(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    """Attack: a malicious endpoint answers a coalesced extraction of Alice's three
    queued turns with changes naming turns it was not shown: "t9", Bob's message id,
    Bob's session id, "T2", "t0" (labels start at t1), a label with a NUL. Held: each
    forged label falls back to the newest turn shown (Alice's), a real label ("t1 ")
    to its own turn; Bob's
    message is the source of nothing; Alice's memories name only Alice's messages."""
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 10},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": "t", "name": "f"},
        memory={"extraction": "tools", "retry_delay": 0.01, "lease_seconds": 30},
    )
    async with open_runtime(settings, run_workers=False) as rt:
        b_sid, b_user, _ = await _turn(rt.store, BOB, "bob said", "bob reply")
        async with rt.store.scope(ALICE) as s:
            a_sid = (await s.create_session("coalesce")).session_id
        for n in range(3):
            await rt.agent.run(ALICE, a_sid, f"alice turn {n}")
        async with rt.store.scope(ALICE) as s:
            said = [m for m in await s.last_messages(a_sid, 10) if m.role == "user"]
        labels: list[Any] = ["t9", str(b_user), str(b_sid), "T2", "t1\x00", "t0", "t1 "]
        fake.queue_tool_calls(
            {"name": "add_memory", "arguments": {"memory": f"fact {i}", "turn": label}}
            for i, label in enumerate(labels)
        )
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle([ALICE], within=60)
        async with rt.db.admin() as conn:
            events = await conn.fetch(
                "SELECT e.user_id, e.after, e.source_message_id, m.user_id AS said_by "
                "FROM memory_events e JOIN messages m ON m.message_id = e.source_message_id "
                "ORDER BY e.event_id"
            )
            bobs = await conn.fetchval(
                "SELECT count(*) FROM memory_events WHERE source_message_id = $1", b_user
            )
    assert bobs == 0
    source = {e["after"]: e["source_message_id"] for e in events}
    assert {e["said_by"] for e in events} == {e["user_id"] for e in events} == {ALICE}
    newest, first = said[-1].message_id, said[0].message_id
    assert source == {f"fact {i}": newest for i in range(6)} | {"fact 6": first}
