"""Single-user mode (`memchat serve`'s user tabs): the engine, not the UI, holds the line."""

from __future__ import annotations

import asyncpg
import pytest

from engine.admin import AdminReader
from engine.config import Settings
from engine.db import Database
from engine.db.database import SingleUserRefusal
from engine.events import MemoryChanged
from engine.jobs import job_counts
from engine.runtime import open_runtime

pytestmark = pytest.mark.db

ALICE, BOB = "alice@example.com", "bob@example.com"


async def test_a_single_user_database_scopes_to_its_user_only(settings: Settings) -> None:
    db = await Database.open(settings, only_user="Alice@Example.com")
    try:
        assert db.only_user == ALICE
        async with db.scoped(ALICE) as conn:
            assert await conn.fetchval("SELECT current_setting('memchat.user_id')") == ALICE
        with pytest.raises(SingleUserRefusal, match="one user only") as refused:
            async with db.scoped(BOB):
                pass
        assert BOB not in str(refused.value)
        for path in (db.admin, db.queue, db.unscoped):
            with pytest.raises(SingleUserRefusal, match="not available in a single-user"):
                async with path():
                    pass
        with pytest.raises(SingleUserRefusal):
            await AdminReader(db).list_users()
        with pytest.raises(SingleUserRefusal):
            await job_counts(db)
    finally:
        await db.close()


async def test_a_single_user_process_never_logs_in_as_admin_or_worker(
    settings: Settings, database_dsn: str
) -> None:
    db = await Database.open(settings, only_user=ALICE)
    try:
        conn = await asyncpg.connect(database_dsn)
        try:
            names = {
                r["application_name"]
                for r in await conn.fetch(
                    "SELECT application_name FROM pg_stat_activity WHERE datname = "
                    "current_database() AND pid <> pg_backend_pid()"
                )
            }
        finally:
            await conn.close()
        assert "memchat" in names
        assert not names & {"memchat-admin", "memchat-queue"}, names
    finally:
        await db.close()


async def test_a_single_user_runtime_hears_and_stores_only_its_user(settings: Settings) -> None:
    # bob's memory is written by a normal (multi-user) process meanwhile.
    async with (
        open_runtime(settings, only_user=ALICE) as tab,
        open_runtime(settings, run_workers=False) as other,
    ):
        assert tab.dispatcher._dispatcher is None  # memory jobs are not this process's
        with pytest.raises(SingleUserRefusal):
            tab.events.subscribe(BOB)
        with pytest.raises(SingleUserRefusal):
            async with tab.store.scope(BOB):
                pass
        async with tab.events.subscribe(None) as everything, tab.events.subscribe(ALICE) as mine:
            async with other.store.scope(BOB) as bob:
                await bob.ensure_user()
                await bob.add_memory("bob likes chess")
            async with other.store.scope(ALICE) as alice:
                await alice.ensure_user()
                await alice.add_memory("alice likes kites")
            first = await anext(aiter(everything))
            own = await anext(aiter(mine))
        # bob's change came first; a single-user hub never delivers it.
        assert isinstance(first, MemoryChanged) and first.user_id == ALICE
        assert isinstance(own, MemoryChanged) and own.user_id == ALICE
        async with tab.store.scope(ALICE) as alice:
            assert [m.content for m in await alice.list_memories()] == ["alice likes kites"]
