"""LISTEN/NOTIFY relayed to subscribers: routing, bad payloads, reconnects, overflow."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import asyncpg
import pytest

from engine.db import Database
from engine.errors import DatabaseError
from engine.events import (
    EngineEvent,
    EventHub,
    JobChanged,
    MemoryChanged,
    Resync,
    Subscription,
    backoff,
)
from engine.queue import JOB_CHANNEL
from engine.store import MEMORY_CHANNEL, Store

pytestmark = pytest.mark.db

# A safety net only: every wait below ends as soon as the awaited event arrives.
TIMEOUT = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENER_PIDS = (
    "SELECT pid FROM pg_stat_activity "
    "WHERE application_name = 'memchat-listen' AND datname = current_database()"
)


class _Unreachable:
    """Stands in for a Database whose server cannot be reached."""

    async def connect_dedicated(self) -> asyncpg.Connection:
        raise DatabaseError("cannot connect to nowhere: refused")


def offline_hub() -> EventHub:
    """A hub that is never started: enough for what needs no database."""
    return EventHub(cast(Database, _Unreachable()))


@pytest.fixture
async def hub(db: Database) -> AsyncIterator[EventHub]:
    events = EventHub(db, reconnect_delay=0.02, max_reconnect_delay=0.1)
    await events.start()
    try:
        yield events
    finally:
        await events.close()


@pytest.fixture
async def superuser(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def next_event(sub: Subscription) -> EngineEvent:
    return await asyncio.wait_for(anext(sub), TIMEOUT)


async def add_memory(store: Store, user_id: str, content: str) -> MemoryChanged:
    """Add a memory; return the event it should produce."""
    async with store.scope(user_id) as s:
        await s.ensure_user()
        memory = await s.add_memory(content)
        assert memory is not None
        (audit,) = await s.memory_events(memory.memory_id)
    return MemoryChanged(user_id, memory.memory_id, "add", audit.event_id)


async def notify(conn: asyncpg.Connection, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


async def test_memory_change_reaches_its_user_and_all_users_only(
    hub: EventHub, store: Store
) -> None:
    async with (
        hub.subscribe("alice") as alice,
        hub.subscribe("bob") as bob,
        hub.subscribe() as everyone,
    ):
        tea = await add_memory(store, "alice", "Likes tea")
        assert await next_event(alice) == tea
        assert await next_event(everyone) == tea

        chess = await add_memory(store, "bob", "Plays chess")
        # bob's first event is his own: alice's change never reached him.
        assert await next_event(bob) == chess
        assert await next_event(everyone) == chess
        # One notification is routed to all its subscribers at once, so alice
        # would already hold bob's event if it had been sent to her.
        assert alice.get_nowait() is None


async def test_update_and_delete_carry_their_op(hub: EventHub, store: Store) -> None:
    async with hub.subscribe("alice") as alice:
        added = await add_memory(store, "alice", "Lives in Oslo")
        assert added.memory_id is not None
        async with store.scope("alice") as s:
            await s.update_memory(added.memory_id, "Lives in Bergen")
            await s.delete_memory(added.memory_id)
        assert await next_event(alice) == added
        updated = await next_event(alice)
        deleted = await next_event(alice)
    assert isinstance(updated, MemoryChanged) and isinstance(deleted, MemoryChanged)
    assert (updated.op, updated.memory_id) == ("update", added.memory_id)
    assert (deleted.op, deleted.memory_id) == ("delete", added.memory_id)
    assert added.event_id is not None
    assert added.event_id < (updated.event_id or 0) < (deleted.event_id or 0)


async def test_job_notification_becomes_job_changed(
    hub: EventHub, superuser: asyncpg.Connection
) -> None:
    async with hub.subscribe("alice") as alice:
        await notify(superuser, JOB_CHANNEL, '{"user_id":"alice","job_id":1,"state":"running"}')
        assert await next_event(alice) == JobChanged("alice", 1, "running")


BAD_PAYLOADS = [
    (MEMORY_CHANNEL, "not json"),
    (MEMORY_CHANNEL, "[1, 2]"),
    (MEMORY_CHANNEL, "[" * 7000),
    (MEMORY_CHANNEL, '{"memory_id": null, "op": "add"}'),
    (MEMORY_CHANNEL, '{"user_id": "alice"}'),
    (MEMORY_CHANNEL, '{"user_id": 7, "op": "add"}'),
    (MEMORY_CHANNEL, '{"user_id": "alice", "op": "add", "memory_id": "nope"}'),
    (MEMORY_CHANNEL, '{"user_id": "alice", "op": "add", "event_id": "3"}'),
    (JOB_CHANNEL, '{"user_id": "alice", "state": "done"}'),
    (JOB_CHANNEL, '{"user_id": "alice", "job_id": true, "state": "done"}'),
    (JOB_CHANNEL, '{"user_id": "alice", "job_id": 1}'),
]


async def test_malformed_payloads_are_ignored(
    hub: EventHub, superuser: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="engine.events")
    async with hub.subscribe("alice") as alice, hub.subscribe() as everyone:
        for channel, payload in BAD_PAYLOADS:
            await notify(superuser, channel, payload)
        await notify(superuser, JOB_CHANNEL, '{"user_id":"alice","job_id":2,"state":"done"}')
        # Notifications from one session arrive in order: the valid one coming
        # first means every bad one was dropped and the listener carried on.
        expected = JobChanged("alice", 2, "done")
        assert await next_event(alice) == expected
        assert await next_event(everyone) == expected
    assert hub.connected
    ignored = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(ignored) == len(BAD_PAYLOADS)
    assert {r.levelno for r in ignored} == {logging.DEBUG}


async def test_memory_id_and_event_id_may_be_absent(
    hub: EventHub, superuser: asyncpg.Connection
) -> None:
    async with hub.subscribe("alice") as alice:
        await notify(superuser, MEMORY_CHANNEL, json.dumps({"user_id": "alice", "op": "delete"}))
        assert await next_event(alice) == MemoryChanged("alice", None, "delete", None)


_REMOTE_ADD = textwrap.dedent(
    """
    import asyncio, sys
    from engine.config import load_settings
    from engine.db import Database
    from engine.store import Store

    async def main() -> None:
        db = await Database.open(load_settings(overrides={"database": {"url": sys.argv[1]}}))
        try:
            async with Store(db).scope(sys.argv[2]) as s:
                await s.ensure_user()
                memory = await s.add_memory(sys.argv[3])
            print(memory.memory_id)
        finally:
            await db.close()

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_change_committed_by_another_process_arrives(
    hub: EventHub, database_dsn: str, tmp_path: Path
) -> None:
    async with hub.subscribe("carol") as carol:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _REMOTE_ADD,
            database_dsn,
            "carol",
            "Has a cat",
            # Away from the repository, so no config.toml there is picked up.
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        event = await next_event(carol)
    assert isinstance(event, MemoryChanged)
    assert (event.user_id, str(event.memory_id), event.op) == ("carol", out.decode().strip(), "add")


async def test_reconnects_after_the_backend_is_killed(
    hub: EventHub,
    store: Store,
    superuser: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.events")
    async with hub.subscribe("alice") as alice, hub.subscribe() as everyone:
        killed = await superuser.fetchval(
            f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM ({LISTENER_PIDS}) l"
        )
        assert killed == 1
        assert await next_event(alice) == Resync()
        assert await next_event(everyone) == Resync()
        assert hub.connected
        tea = await add_memory(store, "alice", "Likes tea")
        assert await next_event(alice) == tea
    levels = {r.levelno for r in caplog.records if "LISTEN connection" in r.getMessage()}
    assert levels == {logging.WARNING, logging.INFO}


async def test_silently_dead_connection_is_found_by_the_health_check(
    db: Database, store: Store, superuser: asyncpg.Connection
) -> None:
    # A stopped backend keeps its socket open, like a peer behind a dead network
    # link: no termination callback fires, only the health check notices.
    events = EventHub(
        db,
        reconnect_delay=0.02,
        max_reconnect_delay=0.1,
        health_check_interval=0.05,
        health_check_timeout=0.3,
    )
    await events.start()
    (pid,) = [row["pid"] for row in await superuser.fetch(LISTENER_PIDS)]
    try:
        os.kill(pid, signal.SIGSTOP)
    except (PermissionError, ProcessLookupError):
        await events.close()
        pytest.skip("the PostgreSQL server is not a local process of this user")
    try:
        async with events.subscribe("alice") as alice:
            assert await next_event(alice) == Resync()
            assert events.connected
            tea = await add_memory(store, "alice", "Likes tea")
            assert await next_event(alice) == tea
    finally:
        os.kill(pid, signal.SIGCONT)
        await events.close()


async def test_start_fails_with_database_error() -> None:
    events = offline_hub()
    with pytest.raises(DatabaseError, match="nowhere"):
        await events.start()
    assert not events.connected
    await events.close()


async def test_keeps_retrying_until_the_database_answers(
    hub: EventHub, db: Database, superuser: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = db.connect_dedicated
    attempts = 0

    async def flaky() -> asyncpg.Connection:
        nonlocal attempts
        attempts += 1
        if attempts <= 3:
            raise DatabaseError("cannot connect: the database system is starting up")
        return await real_connect()

    monkeypatch.setattr(db, "connect_dedicated", flaky)
    async with hub.subscribe("alice") as alice:
        await superuser.execute(f"SELECT pg_terminate_backend(pid) FROM ({LISTENER_PIDS}) l")
        assert await next_event(alice) == Resync()
    assert attempts == 4
    assert hub.connected


def test_backoff_doubles_up_to_the_limit() -> None:
    assert list(itertools.islice(backoff(0.2, 5.0), 7)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


async def test_slow_subscriber_gets_resync_instead_of_a_backlog(
    hub: EventHub, store: Store
) -> None:
    async with hub.subscribe("alice", queue_size=3) as slow, hub.subscribe("alice") as fast:
        async with store.scope("alice") as s:
            await s.ensure_user()
            for i in range(10):
                await s.add_memory(f"Fact number {i}")
        received = [await next_event(fast) for _ in range(10)]
        assert all(isinstance(e, MemoryChanged) for e in received)
        # Each notification is delivered to every subscriber in one step, so
        # once fast has all ten, slow's queue holds everything it ever will.
        backlog: list[EngineEvent] = []
        while (event := slow.get_nowait()) is not None:
            backlog.append(event)
    assert 1 <= len(backlog) <= 3
    assert Resync() in backlog
    # What follows the Resync is the newest changes, in order.
    after = backlog[backlog.index(Resync()) + 1 :]
    assert after == received[len(received) - len(after) :]


async def test_close_ends_subscribers_iteration() -> None:
    hub = offline_hub()
    seen: list[EngineEvent] = []
    got_both = asyncio.Event()

    async def consume(sub: Subscription) -> None:
        async for event in sub:
            seen.append(event)
            if len(seen) == 2:
                got_both.set()

    alice = hub.subscribe("alice")
    everyone = hub.subscribe()
    consumers = [asyncio.create_task(consume(alice)), asyncio.create_task(consume(everyone))]
    hub.publish(JobChanged("alice", 5, "pending"))
    # Both consumers are now blocked waiting for more when the hub closes.
    await asyncio.wait_for(got_both.wait(), TIMEOUT)
    await hub.close()
    await asyncio.wait_for(asyncio.gather(*consumers), TIMEOUT)
    assert seen == [JobChanged("alice", 5, "pending")] * 2
    assert alice.closed and everyone.closed
    assert not hub.connected
    await hub.close()
    # Subscribing to a closed hub gives a stream that is already over.
    late = hub.subscribe("alice")
    assert [e async for e in late] == []


async def test_leaving_the_context_unsubscribes() -> None:
    hub = offline_hub()
    received = asyncio.Event()

    async def consume(sub: Subscription) -> list[EngineEvent]:
        seen = [event async for event in _signal_each(sub, received)]
        return seen

    async with hub.subscribe("alice") as alice:
        consumer = asyncio.create_task(consume(alice))
        hub.publish(JobChanged("alice", 1, "running"))
        await asyncio.wait_for(received.wait(), TIMEOUT)
    assert await asyncio.wait_for(consumer, TIMEOUT) == [JobChanged("alice", 1, "running")]
    hub.publish(JobChanged("alice", 1, "done"))
    assert alice.get_nowait() is None


async def _signal_each(sub: Subscription, flag: asyncio.Event) -> AsyncIterator[EngineEvent]:
    async for event in sub:
        flag.set()
        yield event


async def test_publish_routes_by_user_and_resync_to_all() -> None:
    hub = offline_hub()
    subs = {user: hub.subscribe(user) for user in ("alice", "bob")}
    everyone = hub.subscribe()
    hub.publish(JobChanged("bob", 9, "done"))
    hub.publish(Resync())
    assert subs["alice"].get_nowait() == Resync()
    assert subs["bob"].get_nowait() == JobChanged("bob", 9, "done")
    assert subs["bob"].get_nowait() == Resync()
    assert everyone.get_nowait() == JobChanged("bob", 9, "done")
    assert everyone.get_nowait() == Resync()
