"""Migrations: versioned, recorded, idempotent, safe when processes race."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import asyncpg
import pytest

from engine.db.migrate import available_migrations, current_version, migrate
from engine.errors import DatabaseError

pytestmark = pytest.mark.db


async def test_fresh_database_is_migrated_and_recorded(empty_database_dsn: str) -> None:
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        assert await current_version(conn) is None
        applied = await migrate(conn)
        assert applied == [m.version for m in available_migrations()]
        assert await current_version(conn) == available_migrations()[-1].version
        assert await migrate(conn) == []  # idempotent
        rows = await conn.fetch("SELECT version, checksum FROM memchat_migrations")
        assert {r["version"]: r["checksum"] for r in rows} == {
            m.version: m.checksum for m in available_migrations()
        }
    finally:
        await conn.close()


async def test_edited_migration_is_refused(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("UPDATE memchat_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(DatabaseError, match="was changed after it was applied"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_newer_schema_is_refused(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(
            "INSERT INTO memchat_migrations (version, name, checksum) VALUES (9999, 'future', '')"
        )
        with pytest.raises(DatabaseError, match="newer than this memchat"):
            await migrate(conn)
    finally:
        await conn.close()


_MIGRATE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import asyncpg
    from engine.db.migrate import migrate

    async def main():
        conn = await asyncpg.connect(sys.argv[1])
        try:
            print(await migrate(conn))
        finally:
            await conn.close()

    asyncio.run(main())
    """
)


async def test_two_processes_migrating_at_once_both_succeed(empty_database_dsn: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _MIGRATE_SCRIPT,
            empty_database_dsn,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    results = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode() for _, err in results]
    outputs = sorted(out.decode().strip() for out, _ in results)
    everything = str([m.version for m in available_migrations()])
    # Exactly one process applied the migrations; the others found nothing to do.
    assert outputs == sorted(["[]", "[]", everything])


async def test_0007_grants_its_functions_to_roles_granted_before_it(
    empty_database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database at 0006 whose roles were granted then: memchat_grant_runtime_roles
    # does not run again (the roles did not change), so 0007 grants what it adds.
    import engine.db.migrate as migrate_module

    every = available_migrations()
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(
                migrate_module, "available_migrations", lambda: [m for m in every if m.version < 7]
            )
            await migrate(conn)
        assert await migrate(conn) == [m.version for m in every if m.version >= 7]
        roles = dict(await conn.fetch("SELECT kind, rolname FROM memchat_runtime_roles"))
        for role, function, allowed in (
            (roles["app"], "memchat_queue_head(text, bigint)", True),
            (roles["worker"], "memchat_job_channel()", True),
            (roles["admin"], "memchat_queue_head(text, bigint)", False),
            ("public", "memchat_queue_head(text, bigint)", False),
        ):
            may = await conn.fetchval(
                "SELECT has_function_privilege($1, $2, 'EXECUTE')", role, function
            )
            assert may is allowed, (role, function)
    finally:
        await conn.close()


async def test_0008_lets_the_app_replace_replies_only(
    empty_database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database at 0007 whose roles were granted then: 0008 grants DELETE on
    # messages to that app role itself, and the restrictive policy keeps user
    # messages out of its reach.
    import engine.db.migrate as migrate_module

    every = available_migrations()
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(
                migrate_module, "available_migrations", lambda: [m for m in every if m.version < 8]
            )
            await migrate(conn)
        app = await conn.fetchval("SELECT rolname FROM memchat_runtime_roles WHERE kind = 'app'")
        may = "SELECT has_table_privilege($1, 'messages', $2)"
        assert await conn.fetchval(may, app, "DELETE") is False
        assert await migrate(conn) == [m.version for m in every if m.version >= 8]
        assert await conn.fetchval(may, app, "DELETE") is True
        assert await conn.fetchval(may, app, "UPDATE") is False, "messages are never rewritten"
        policy = await conn.fetchrow(
            "SELECT permissive, cmd, qual FROM pg_policies "
            "WHERE tablename = 'messages' AND policyname = 'messages_delete_replies'"
        )
        assert policy is not None
        assert (policy["permissive"], policy["cmd"]) == ("RESTRICTIVE", "DELETE")
        assert "assistant" in policy["qual"]
    finally:
        await conn.close()


async def test_0009_makes_existing_memories_searchable(empty_database_dsn: str) -> None:
    # Memories written before 0009 get their search vector and the GIN index.
    import engine.db.migrate as migrate_module

    every = available_migrations()
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        before = [m for m in every if m.version < 9]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(migrate_module, "available_migrations", lambda: before)
            await migrate(conn)
        await conn.execute("INSERT INTO users (user_id, display_name) VALUES ('ann', 'Ann')")
        await conn.execute(
            "INSERT INTO memories (user_id, content) VALUES ('ann', 'Keeps an Iguana')"
        )
        assert 9 in await migrate(conn)
        found = await conn.fetchval(
            "SELECT content FROM memories WHERE search @@ plainto_tsquery('simple', 'iguana')"
        )
        assert found == "Keeps an Iguana"
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'memories_search'"
        )
        assert "USING gin" in index and "search" in index
    finally:
        await conn.close()
