"""Issue 12 findings 10 and 11: first use of a user id from many places at once;
user ids that look the same are the same user (case) or are flagged (I/l/1, O/0).

Real PostgreSQL throughout; the first-use race runs 20 real ``memchat chat``
processes and, in one process, 60 connections at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from engine.admin import AdminReader
from engine.db import Database
from engine.db import migrate as migrate_module
from engine.db.migrate import available_migrations, migrate
from engine.errors import DatabaseError
from engine.store import Store
from engine.validation import look_alike_key, look_alikes, validate_user_id

pytestmark = pytest.mark.db

Run = Callable[..., subprocess.CompletedProcess[str]]


# -- finding 10: first use from many places at once ---------------------------------


async def test_first_use_from_60_connections_at_once(store: Store, db: Database) -> None:
    assert db.pool.get_max_size() >= 20
    for round_ in range(5):
        user_id = f"fresh-{round_}@example.com"
        # Open 60 scopes, then let every one insert the same new user at once.
        go = asyncio.Event()

        async def first_use(uid: str = user_id, go: asyncio.Event = go) -> str:
            await go.wait()
            async with store.scope(uid) as s:
                return (await s.ensure_user()).user_id

        tasks = [asyncio.create_task(first_use()) for _ in range(60)]
        await asyncio.sleep(0)  # every task is now waiting on the event
        go.set()
        assert await asyncio.gather(*tasks) == [user_id] * 60


@pytest.mark.slow
async def test_20_chat_processes_first_use_all_stored(database_dsn: str, tmp_path: Path) -> None:
    """20 real `memchat chat` processes create the same new user at the same moment.

    The moment is made exact, without timing: the test holds an EXCLUSIVE
    lock on ``users`` until all 20 processes are blocked in their INSERT
    (their statement snapshots taken), then lets them all go at once. The
    old statement crashed every process but one here.
    """
    config = tmp_path / "none.toml"
    config.touch()
    env = {
        **os.environ,
        "MEMCHAT_DATABASE__URL": database_dsn,
        "MEMCHAT_CONFIG": str(config),
        # 20 processes share the server's connections.
        "MEMCHAT_DATABASE__POOL_MIN_SIZE": "1",
        "MEMCHAT_DATABASE__POOL_MAX_SIZE": "2",
        "MEMCHAT_MEMORY__DRAIN_TIMEOUT": "0",
    }
    # One start first: a database cloned from the test template gets its own
    # login roles and grants at its first start (GRANT waits for the lock below
    # while holding the migration lock), and that is not what is measured here.
    warm = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "engine.cli", "users"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert warm.returncode == 0, warm.stderr
    gate = await asyncpg.connect(database_dsn)
    try:
        gate_tx = gate.transaction()
        await gate_tx.start()
        await gate.execute("LOCK TABLE users IN EXCLUSIVE MODE")
        procs = await asyncio.to_thread(start_chats, env, 20)
        observer = await asyncpg.connect(database_dsn)
        try:
            await wait_for_blocked_inserts(observer, 20, procs)
        finally:
            await observer.close()
        await gate_tx.commit()
    finally:
        await gate.close()
    results = [await asyncio.to_thread(p.communicate, timeout=180) for p in procs]
    failed = [
        (p.returncode, err) for p, (_out, err) in zip(procs, results, strict=True) if p.returncode
    ]
    assert not failed, failed
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch(
            "SELECT content FROM messages WHERE user_id = 'newcomer@example.com' AND role = 'user'"
        )
    finally:
        await conn.close()
    assert sorted(r["content"] for r in rows) == sorted(f"hello number {i}" for i in range(20))


def start_chats(env: dict[str, str], count: int) -> list[subprocess.Popen[str]]:
    """``count`` `memchat chat` processes, each a first message of the same new user."""
    chat = [sys.executable, "-m", "engine.cli", "chat", "--user", "Newcomer@Example.com"]
    return [
        subprocess.Popen(
            [*chat, "--new-session", f"hello number {i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


async def wait_for_blocked_inserts(
    observer: asyncpg.Connection, count: int, procs: list[subprocess.Popen[str]]
) -> None:
    """Until ``count`` backends wait for the users lock (fails if a process exits first)."""
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        waiting = await observer.fetchval(
            """
            SELECT count(*) FROM pg_locks l
             WHERE NOT l.granted AND l.relation = 'users'::regclass
            """
        )
        if waiting >= count:
            return
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"a process ended before reaching its INSERT: {exited[:1]}"
        assert asyncio.get_running_loop().time() < deadline, f"only {waiting} blocked"
        await asyncio.sleep(0.05)  # polling the server for a condition, not a timing guess


# -- finding 11: case-insensitive ids ----------------------------------------------


async def test_ids_differing_only_by_case_are_one_user(store: Store, db: Database) -> None:
    async with store.scope("ALICE@EXAMPLE.COM") as s:
        session = await s.create_session("from upper case")
    async with store.scope("alice@example.com") as s:
        assert [x.session_id for x in await s.list_sessions()] == [session.session_id]
    async with store.scope(" Alice@Example.Com ") as s:
        assert (await s.ensure_user()).user_id == "alice@example.com"
    users = await AdminReader(db).list_users()
    assert [u.user_id for u in users] == ["alice@example.com"]


async def test_the_database_refuses_an_id_that_is_not_lower_case(
    store: Store, db: Database
) -> None:
    # Even a scope that bypasses validate_user_id cannot store a mixed-case id.
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('memchat.user_id', 'Bob', true)")
            await conn.execute("INSERT INTO users (user_id, display_name) VALUES ('Bob', 'b')")


def test_cli_treats_ids_case_insensitively(memchat: Run) -> None:
    assert memchat("chat", "--user", "CaSe@Example.com", "hi there").returncode == 0
    sessions = memchat("sessions", "--user", "case@example.com", "--json")
    assert sessions.returncode == 0 and '"hi there"' in sessions.stdout


@pytest.mark.parametrize(
    ("typed", "existing"),
    [
        ("aIice", "alice"),  # capital I for l
        ("a1ice", "alice"),
        ("b0b", "bob"),
        ("rnary", "mary"),
    ],
)
def test_ascii_look_alikes_are_flagged(typed: str, existing: str) -> None:
    canonical = validate_user_id(typed)
    assert canonical != existing
    assert look_alike_key(canonical) == look_alike_key(existing)
    assert look_alikes(canonical, [existing, "carol"]) == [existing]


@pytest.mark.parametrize("bad", ["al\u0456ce", "ali\u200bce", "alice\u202e", "ａlice"])
def test_unicode_look_alikes_zero_width_and_bidi_are_refused(bad: str) -> None:
    from engine.errors import InvalidInput

    with pytest.raises(InvalidInput):
        validate_user_id(bad)


async def test_overview_flags_look_alike_users(store: Store, db: Database) -> None:
    for uid in ("alice", "aIice", "bob"):
        async with store.scope(uid) as s:
            await s.ensure_user()
    overview = {u.user_id: u for u in await AdminReader(db).overview()}
    assert overview["alice"].look_alikes == ("aiice",)
    assert overview["aiice"].look_alikes == ("alice",)
    assert overview["bob"].look_alikes == ()
    assert await AdminReader(db).look_alikes("ALICE") == ["aiice"]


# -- migration 0005 on existing data -------------------------------------------------


async def _migrate_to(dsn: str, version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    upto = [m for m in available_migrations() if m.version <= version]
    with monkeypatch.context() as patch:
        patch.setattr(migrate_module, "available_migrations", lambda: upto)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()


async def _as_owner(dsn: str, sql: str) -> list[asyncpg.Record]:
    """Run SQL as the owner (superuser in tests): rows of a query, nothing for a script."""
    conn = await asyncpg.connect(dsn)
    try:
        if ";" in sql.strip().rstrip(";"):
            await conn.execute(sql)
            return []
        return await conn.fetch(sql)
    finally:
        await conn.close()


OLD_DATA = """
INSERT INTO users (user_id, display_name) VALUES ('Mixed@Example.com', 'Mixed'), ('plain', 'p');
INSERT INTO sessions (session_id, user_id, title)
    VALUES ('00000000-0000-0000-0000-000000000001', 'Mixed@Example.com', 's');
INSERT INTO messages (session_id, user_id, role, content)
    VALUES ('00000000-0000-0000-0000-000000000001', 'Mixed@Example.com', 'user', 'hi');
INSERT INTO memories (memory_id, user_id, content, source_session_id)
    VALUES ('00000000-0000-0000-0000-0000000000aa', 'Mixed@Example.com', 'Likes tea',
            '00000000-0000-0000-0000-000000000001');
INSERT INTO memory_events (memory_id, user_id, op, after)
    VALUES ('00000000-0000-0000-0000-0000000000aa', 'Mixed@Example.com', 'add', 'Likes tea'),
           ('00000000-0000-0000-0000-0000000000bb', 'Mixed@Example.com', 'delete', NULL);
INSERT INTO memory_jobs (user_id, session_id, user_message_id)
    VALUES ('Mixed@Example.com', '00000000-0000-0000-0000-000000000001', 1),
           ('Mixed@Example.com', '00000000-0000-0000-0000-0000000000ff', 999);
"""


async def test_migration_lower_cases_existing_ids_and_keeps_everything(
    empty_database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = empty_database_dsn
    await _migrate_to(dsn, 4, monkeypatch)
    await _as_owner(dsn, OLD_DATA)
    await _migrate_to(dsn, 5, monkeypatch)
    counts = await _as_owner(
        dsn,
        """
        SELECT (SELECT count(*) FROM sessions WHERE user_id = 'mixed@example.com') AS sessions,
               (SELECT count(*) FROM messages WHERE user_id = 'mixed@example.com') AS messages,
               (SELECT count(*) FROM memories WHERE user_id = 'mixed@example.com') AS memories,
               (SELECT count(*) FROM memory_events WHERE user_id = 'mixed@example.com') AS events,
               (SELECT count(*) FROM memory_jobs WHERE user_id = 'mixed@example.com') AS jobs,
               (SELECT count(*) FROM memory_jobs WHERE session_id IS NULL
                                                   AND user_message_id IS NULL) AS dangling,
               (SELECT string_agg(user_id, ',' ORDER BY user_id) FROM users) AS users
        """,
    )
    assert dict(counts[0]) == {
        "sessions": 1,
        "messages": 1,
        "memories": 1,
        "events": 2,  # the deleted memory's history stays
        "jobs": 2,
        "dangling": 1,  # the job whose session was gone before 0005
        "users": "mixed@example.com,plain",
    }


async def test_migration_refuses_ids_differing_only_by_case_and_changes_nothing(
    empty_database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = empty_database_dsn
    await _migrate_to(dsn, 4, monkeypatch)
    await _as_owner(
        dsn,
        "INSERT INTO users (user_id, display_name) "
        "VALUES ('ALICE', 'a'), ('alice', 'b'), ('z', 'z')",
    )
    with pytest.raises(DatabaseError) as caught:
        await _migrate_to(dsn, 5, monkeypatch)
    message = caught.value.message
    assert "\n" not in message
    assert "differ only by case" in message and "ALICE, alice" in message
    rows = await _as_owner(dsn, "SELECT user_id FROM users ORDER BY user_id")
    assert [r["user_id"] for r in rows] == ["ALICE", "alice", "z"]
    version = await _as_owner(dsn, "SELECT max(version) AS v FROM memchat_migrations")
    assert version[0]["v"] < 5
