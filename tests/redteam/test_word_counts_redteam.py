"""Red team of migration 0012: word counts, grant rows and the index builder.

An attacker holding one of memchat's runtime logins (app, admin, worker) tries
the owner's new objects; hostile memory text tries the counting triggers; many
users and transactions at once (with rollbacks, deletions, no-op updates) try
to make the counts drift from the memories, and the drift change recall.
All against the real PostgreSQL of tests/conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from engine.db import Database
from engine.recall import relevant_memories
from engine.store import Store
from tests.engine.test_recall import word_count_drift

pytestmark = pytest.mark.db

# What an attacker would write as memory text: quotes, backslashes, SQL, a
# tsquery's operators, non-Latin scripts, and words at tsvector's size limit
# (2,047 bytes a lexeme; longer ones are dropped with a notice).
HOSTILE = [
    "It's O'Brien's \\\\ backslash \\' quote'' day",
    "'); DELETE FROM memory_words; --",
    "x' OR '1'='1 & !tea | <-> :* ''",
    "naïve café Ωμέγα 日本語 テスト ﷽ 👩‍👩‍👧",
    "w" * 2000,
    "é" * 1000,  # 2,000 bytes: the longest lexeme to_tsvector keeps
    "日" * 700,  # 2,100 bytes: dropped by to_tsvector, must not break the count
    "tab\there newline\nthere \u00a0nbsp \u200bzero-width",
]


class Rollback(Exception):
    """Raised inside a scope to roll its transaction back."""


# -- isolation: the runtime logins and the owner's new objects ----------------------

_FORBIDDEN = [
    "SELECT * FROM memory_words",
    "SELECT memories FROM memory_words WHERE user_id = 'bob'",
    "INSERT INTO memory_words VALUES ('bob', 'tea', 1000000)",
    "UPDATE memory_words SET memories = 1000000",
    "DELETE FROM memory_words",
    "TRUNCATE memory_words",
    "SELECT * FROM memchat_runtime_grants",
    "INSERT INTO memchat_runtime_grants (kind, object_type, object_name, privileges, since) "
    "VALUES ('app', 'TABLE', 'memchat_runtime_roles', 'SELECT', 99)",
    "UPDATE memchat_runtime_grants SET privileges = 'SELECT, INSERT, UPDATE, DELETE'",
    "SELECT memchat_index_vectors('x')",
    "SELECT memchat_apply_grants('a', 'b', 'c', 0)",
    "SELECT memchat_apply_runtime_grants(0)",
    "SELECT memchat_install_recall_vector()",
    "SELECT memchat_vector_index_name('x', 3)",
    "SELECT memchat_grant_runtime_roles('a', 'b', 'c')",
    "CREATE INDEX ON memories (content)",
]


@asynccontextmanager
async def _login(db: Database, kind: str) -> AsyncIterator[asyncpg.Connection]:
    if kind == "app-scoped":
        async with db.scoped("alice") as conn:
            yield conn
    elif kind == "app":
        async with db.unscoped() as conn:
            yield conn
    elif kind == "admin":
        async with db.admin() as conn:
            yield conn
    else:
        async with db.queue() as conn:
            yield conn


@pytest.mark.parametrize("kind", ["app-scoped", "app", "admin", "worker"])
async def test_runtime_logins_cannot_touch_word_counts_grant_rows_or_the_index_builder(
    db: Database, store: Store, database_dsn: str, kind: str
) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Bob drinks tea at noon")
    before = await word_count_drift(database_dsn)
    async with _login(db, kind) as conn:
        # Each login as itself, in a read-write transaction of its own making
        # (the admin's pool opens a read-only one: leave it, as an attacker would).
        if kind == "admin":
            await conn.execute("COMMIT")
        if kind != "app-scoped":
            await conn.execute("BEGIN")
        await conn.execute("RESET ROLE")
        refused = []
        for statement in _FORBIDDEN:
            # A savepoint: the next statement still runs after a refusal.
            await conn.execute("SAVEPOINT attack")
            try:
                await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                refused.append(statement)
            except asyncpg.UndefinedFunctionError:
                refused.append(statement)  # not even visible (no EXECUTE, or no pgvector)
            await conn.execute("ROLLBACK TO SAVEPOINT attack")
        if kind in ("app", "worker"):
            await conn.execute("ROLLBACK")
    assert refused == _FORBIDDEN
    assert before == 0 and await word_count_drift(database_dsn) == 0
    owner = await asyncpg.connect(database_dsn)
    try:
        assert (
            await owner.fetchval(
                "SELECT memories FROM memory_words WHERE user_id = 'bob' AND lexeme = 'tea'"
            )
            == 1
        )
        assert await owner.fetchval("SELECT max(since) FROM memchat_runtime_grants") <= 12
    finally:
        await owner.close()


async def test_another_users_word_counts_never_reach_recall(store: Store) -> None:
    # Bob's 60 memories all say "tea": tea is common for Bob, not for Alice,
    # whose one tea memory is her oldest among 40 others. If Bob's counts
    # leaked into Alice's search, "tea" would be dropped as too common and her
    # tea memory would not be found among the 5 asked for.
    async with store.scope("bob") as s:
        await s.ensure_user()
        for i in range(60):
            await s.add_memory(f"Bob drinks tea cup {i}")
    async with store.scope("alice") as s:
        await s.ensure_user()
        await s.add_memory("Alice grows tea in her garden")
        for i in range(40):
            await s.add_memory(f"Alice likes the colour number {i}")
    for text in ("tea", "tea' OR user_id <> 'alice", "Bob drinks tea cup 7"):
        async with store.scope("alice") as s:
            found = [m.content for m in await relevant_memories(s, text, 5)]
        assert "Alice grows tea in her garden" in found, (text, found)
        assert not any(content.startswith("Bob") for content in found), (text, found)


async def test_recall_arguments_cannot_reach_another_user(db: Database, store: Store) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Bob keeps a secret iguana")
    # Hostile text and limits straight into the SECURITY DEFINER function, from
    # the unscoped app connection and from another user's scope.
    hostile_args = [
        ("iguana", 50, 0),
        ("iguana') OR true --", 50, 0),
        ("iguana", -5, -100),
        ("iguana", 2_000_000_000, -2_000_000_000),
        ("\\'\" iguana | !a & b:*", 50, 0),
    ]

    async def answer(conn: asyncpg.Connection, args: tuple[str, int, int]) -> list[object]:
        await conn.execute("SAVEPOINT attack")
        try:
            return list(await conn.fetch("SELECT * FROM memchat_recall($1, $2, $3)", *args))
        except asyncpg.NumericValueOutOfRangeError:
            # p_limit - p_recent overflows: an error that says nothing of anyone's data.
            await conn.execute("ROLLBACK TO SAVEPOINT attack")
            return []

    async with db.unscoped() as conn:
        await conn.execute("BEGIN")
        for args in hostile_args:
            assert await answer(conn, args) == []
        await conn.execute("ROLLBACK")
    async with store.scope("alice") as s:
        await s.ensure_user()
        for args in hostile_args:
            assert await answer(s.conn, args) == []


# -- the counts: hostile text, rollbacks, deletions, no-op updates, 50+ users -------


async def test_hostile_memory_text_is_counted_exactly(store: Store, database_dsn: str) -> None:
    async with store.scope("mallory") as s:
        await s.ensure_user()
        ids = []
        for text in HOSTILE:
            # Straight through the app login, as a tampered client would.
            ids.append(
                await s.conn.fetchval(
                    "INSERT INTO memories (user_id, content) VALUES ($1, $2) RETURNING memory_id",
                    "mallory",
                    text,
                )
            )
        # Updated to the same words (other case, spacing): nothing changes.
        await s.conn.execute(
            "UPDATE memories SET content = upper(content) || ' ' WHERE user_id = 'mallory'"
        )
    assert await word_count_drift(database_dsn) == 0
    async with store.scope("mallory") as s:
        found = [m.content for m in await relevant_memories(s, "O'Brien's backslash", 3)]
    assert any("O'BRIEN" in c for c in found), found
    async with store.scope("mallory") as s:
        await s.conn.execute("DELETE FROM memories WHERE memory_id = ANY($1::uuid[])", ids[::2])
    assert await word_count_drift(database_dsn) == 0
    owner = await asyncpg.connect(database_dsn)
    try:
        assert await owner.fetchval("SELECT count(*) FROM memory_words") > 0
        assert await owner.fetchval(
            "SELECT memories FROM memory_words WHERE user_id = 'mallory' AND lexeme = ''"
        ) == len(HOSTILE) - len(ids[::2])
    finally:
        await owner.close()


async def test_counts_stay_exact_through_rollbacks_deletions_and_noop_updates(
    store: Store, database_dsn: str
) -> None:
    # 60 users at once, each: memories added, one added again twice at once,
    # one updated to the same words, one updated to other words, one deleted,
    # a transaction that writes and
    # rolls back, and every fifth user deleted whole (the cascade); meanwhile 12
    # transactions write and roll back, or write and commit, one shared user's.
    users = [f"u{i:02d}" for i in range(60)]

    async def one_user(user_id: str, tag: int) -> None:
        async with store.scope(user_id) as s:
            await s.ensure_user()
            a = await s.add_memory(f"Keeps a parrot number {tag} near the sea")
            b = await s.add_memory(f"Reads {HOSTILE[tag % len(HOSTILE)][:300]} by the sea")
            c = await s.add_memory(f"Swims in the sea every {tag} days")
            assert a is not None and b is not None and c is not None

        async def duplicate() -> None:
            # Two transactions adding a memory the user has (the dedup path):
            # neither may count it again.
            async with store.scope(user_id) as s:
                assert await s.add_memory(f"Swims in the sea every {tag} days") is None

        await asyncio.gather(duplicate(), duplicate())
        async with store.scope(user_id) as s:
            await s.update_memory(a.memory_id, f"keeps a PARROT number {tag} near the SEA")
            await s.update_memory(b.memory_id, f"Reads novels {tag} by the lake")
            await s.delete_memory(c.memory_id)
        with pytest.raises(Rollback):
            async with store.scope(user_id) as s:
                await s.add_memory(f"Rolled back word zanzibar{tag}")
                await s.update_memory(a.memory_id, "rolled back update")
                await s.delete_memory(b.memory_id)
                raise Rollback
        if tag % 5 == 0:
            async with store.scope(user_id) as s:
                assert await s.delete_user()

    async def shared(tag: int) -> None:
        if tag % 2:
            with pytest.raises(Rollback):
                async with store.scope("shared") as s:
                    await s.add_memory(f"Shared sea memory {tag} rolled back")
                    await s.conn.execute("UPDATE memories SET content = content || ' sea'")
                    raise Rollback
        else:
            async with store.scope("shared") as s:
                await s.add_memory(f"Shared sea memory {tag}")
                await s.conn.execute(
                    "UPDATE memories SET content = content WHERE user_id = 'shared'"
                )

    async with store.scope("shared") as s:
        await s.ensure_user()
    await asyncio.wait_for(
        asyncio.gather(
            *(one_user(u, i) for i, u in enumerate(users)), *(shared(i) for i in range(12))
        ),
        timeout=120,
    )
    assert await word_count_drift(database_dsn) == 0
    owner = await asyncpg.connect(database_dsn)
    try:
        assert (
            await owner.fetchval("SELECT count(*) FROM memory_words WHERE lexeme LIKE 'zanzibar%'")
            == 0
        )
        assert (
            await owner.fetchval(
                "SELECT count(*) FROM memory_words WHERE user_id = ANY($1::text[])",
                [u for i, u in enumerate(users) if i % 5 == 0],
            )
            == 0
        )
        assert (
            await owner.fetchval(
                "SELECT memories FROM memory_words WHERE user_id = 'shared' AND lexeme = 'sea'"
            )
            == 6
        )
    finally:
        await owner.close()


async def test_a_writer_of_one_user_never_stalls_another_user(
    store: Store, database_dsn: str
) -> None:
    # Alice's transaction holds her '' row (a memory written, not committed);
    # 50 other users write memories with the same words meanwhile, and must all
    # finish while Alice's transaction is still open.
    held = asyncio.Event()
    release = asyncio.Event()

    async def alice() -> None:
        async with store.scope("alice") as s:
            await s.ensure_user()
            await s.add_memory("Likes the sea and the parrot")
            held.set()
            await release.wait()

    holder = asyncio.create_task(alice())
    await held.wait()

    async def other(i: int) -> None:
        async with store.scope(f"o{i}") as s:
            await s.ensure_user()
            await s.add_memory("Likes the sea and the parrot")

    try:
        await asyncio.wait_for(asyncio.gather(*(other(i) for i in range(50))), timeout=30)
    finally:
        release.set()
        await holder
    assert await word_count_drift(database_dsn) == 0
