"""The admin views: the inspector's overview and the isolation audit.

Every audit check is shown to pass on the seed conversation and then to fail
when the thing it guards is broken on purpose, in this test's own database.
"""

from __future__ import annotations

import asyncpg
import pytest

from engine.admin import (
    CHECK_NAMES,
    CHECK_RLS,
    CHECK_SOURCES,
    JOB_PROBLEMS_SHOWN,
    AdminReader,
    AuditResult,
    JobCounts,
    JobProblem,
    MemoryChange,
    TokenUsage,
    UserOverview,
    find_name_leaks,
)
from engine.db import Database
from engine.errors import InvalidInput, NotFound
from engine.models import Usage
from engine.scenarios import SEED_SCRIPT, SeedResult
from engine.store import Store

pytestmark = pytest.mark.db

USER_1, USER_2, USER_3 = SEED_SCRIPT


def _by_user(overview: list[UserOverview]) -> dict[str, UserOverview]:
    return {user.user_id: user for user in overview}


def _check(result: AuditResult, name: str) -> tuple[bool, str, list[str]]:
    check = next(c for c in result.checks if c.name == name)
    return check.ok, check.detail, [str(f) for f in check.findings]


async def _execute_as_owner(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


# -- overview -------------------------------------------------------------------


async def test_overview_after_seed_lists_each_users_own_rows(
    seeded: SeedResult, db: Database
) -> None:
    overview = await AdminReader(db).overview()
    assert [u.user_id for u in overview] == [USER_1, USER_2, USER_3]
    users = _by_user(overview)

    user_1 = users[USER_1]
    # Session 1 had the last turn, so it is the most recently active.
    assert [(s.number, s.title, s.messages) for s in user_1.sessions] == [
        (1, "user_1_session_1", 6),
        (2, "user_1_session_2", 2),
    ]
    assert user_1.messages == 8
    assert [
        (m.content, m.source_session_title, m.source_session_number) for m in user_1.memories
    ] == [
        ("Name is Mark Gonzales", "user_1_session_1", 1),
        ("Likes anime and video games", "user_1_session_1", 1),
        ("Enjoys reading manga and playing video games", "user_1_session_1", 1),
        ("Is going to the movies tonight", "user_1_session_2", 2),
    ]
    assert user_1.memories[0].topics == ("name",)
    for memory in user_1.memories:
        assert memory.history == (MemoryChange("add", None, memory.content, "job"),)
    assert user_1.jobs == JobCounts(done=4)
    assert user_1.forgotten == 0

    assert [(s.title, s.messages) for s in users[USER_2].sessions] == [("user_2_session_1", 4)]
    assert [m.content for m in users[USER_2].memories] == seeded.memories[USER_2]
    assert users[USER_2].jobs == JobCounts(done=2)
    assert [(s.title, s.messages) for s in users[USER_3].sessions] == [("user_3_session_1", 4)]
    assert [m.content for m in users[USER_3].memories] == seeded.memories[USER_3]
    assert users[USER_3].jobs == JobCounts(done=2)

    # No user's overview carries anything of another user.
    names = {USER_1: "Mark", USER_2: "John", USER_3: "Jane"}
    for user in overview:
        texts = [m.content for m in user.memories] + [s.title or "" for s in user.sessions]
        for other, name in names.items():
            if other != user.user_id:
                assert not any(name in t or other.split("@")[0] in t for t in texts)


async def test_overview_history_forgotten_failed_jobs_and_empty_users(
    store: Store, db: Database
) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session("plans")
        message = await s.append_message(session.session_id, "user", "My name is Al")
        named = await s.add_memory(
            "Name is Al",
            ["name"],
            source_session_id=session.session_id,
            source_message_id=message.message_id,
            actor="job",
        )
        assert named is not None
        await s.update_memory(named.memory_id, "Name is Alice", actor="cli")
        doomed = await s.add_memory("Likes tea")
        assert doomed is not None
        await s.delete_memory(doomed.memory_id)
        await s.add_memory("Added by hand")
    async with store.scope("zed") as s:
        await s.ensure_user()
    async with db.scoped("alice") as conn:
        for status, error in [
            ("failed", "older error"),
            ("failed", "newest error"),
            ("pending", None),
            ("running", None),
            ("done", None),
        ]:
            await conn.execute(
                "INSERT INTO memory_jobs (user_id, status, last_error) VALUES ('alice', $1, $2)",
                status,
                error,
            )

    users = _by_user(await AdminReader(db).overview())
    assert list(users) == ["alice", "zed"]
    alice = users["alice"]
    assert [(m.content, m.source_session_title) for m in alice.memories] == [
        ("Name is Alice", "plans"),
        ("Added by hand", None),
    ]
    assert alice.memories[0].history == (
        MemoryChange("add", None, "Name is Al", "job"),
        MemoryChange("update", "Name is Al", "Name is Alice", "cli"),
    )
    assert alice.forgotten == 1
    assert alice.jobs == JobCounts(
        pending=1,
        running=1,
        done=1,
        failed=2,
        last_error="newest error",
        problems=(
            JobProblem("failed", 0, "newest error", None),
            JobProblem("failed", 0, "older error", None),
        ),
        problem_total=2,
    )
    assert alice.jobs.total == 5

    zed = users["zed"]
    assert (zed.sessions, zed.memories, zed.jobs, zed.messages) == ((), (), JobCounts(), 0)


async def _insert_job(
    db: Database,
    user_id: str,
    status: str,
    *,
    error: str | None = None,
    note: str | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
    attempts: int = 1,
) -> int:
    async with db.scoped(user_id) as conn:
        return await conn.fetchval(
            "INSERT INTO memory_jobs (user_id, status, last_error, note, extraction, "
            "prompt_tokens, completion_tokens, attempts, finished_at) "
            "VALUES ($1, $2, $3, $4, 'tools', $5, $6, $7, "
            "CASE WHEN $2 IN ('done', 'failed') THEN clock_timestamp() END) RETURNING job_id",
            user_id,
            status,
            error,
            note,
            *tokens,
            attempts,
        )


async def test_overview_shows_failed_jobs_and_notes_newest_first_and_bounded(
    store: Store, db: Database
) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
    await _insert_job(db, "alice", "failed", error="first failure", attempts=3)
    await _insert_job(db, "alice", "done", note="2 changes refused: memory.max_per_user")
    await _insert_job(db, "alice", "done")
    await _insert_job(db, "alice", "failed", error="second failure", attempts=3)
    await _insert_job(db, "alice", "done", note="the answer was not usable")

    jobs = _by_user(await AdminReader(db).overview())["alice"].jobs
    assert (jobs.done, jobs.failed, jobs.noted, jobs.last_error) == (3, 2, 2, "second failure")
    assert jobs.problem_total == 4
    assert len(jobs.problems) == JOB_PROBLEMS_SHOWN == 3
    assert jobs.problems == (
        JobProblem("done", 1, None, "the answer was not usable"),
        JobProblem("failed", 3, "second failure", None),
        JobProblem("done", 1, None, "2 changes refused: memory.max_per_user"),
    )


async def test_tokens_are_summed_per_user_and_unknown_when_never_reported(
    store: Store, db: Database
) -> None:
    for user_id in ("alice", "bob", "carol"):
        async with store.scope(user_id) as s:
            session = await s.create_session()
            await s.append_message(session.session_id, "user", "hi")
            if user_id == "alice":
                await s.append_message(session.session_id, "assistant", "one", usage=Usage(100, 20))
                await s.append_message(session.session_id, "assistant", "two", usage=Usage(50, 5))
            await s.append_message(session.session_id, "assistant", "no usage reported")
    await _insert_job(db, "alice", "done", tokens=(300, 12))
    await _insert_job(db, "alice", "done")  # this endpoint said nothing
    await _insert_job(db, "bob", "done", tokens=(40, None))
    await _insert_job(db, "carol", "done")

    users = _by_user(await AdminReader(db).overview())
    assert (users["alice"].chat_tokens, users["alice"].memory_tokens) == (
        TokenUsage(150, 25),
        TokenUsage(300, 12),
    )
    assert (users["bob"].chat_tokens, users["bob"].memory_tokens) == (None, TokenUsage(40, 0))
    assert (users["carol"].chat_tokens, users["carol"].memory_tokens) == (None, None)

    summaries = {u.user_id: u for u in await AdminReader(db).list_users()}
    assert summaries["alice"].tokens == TokenUsage(450, 37)
    assert summaries["alice"].tokens.total == 487
    assert summaries["bob"].tokens == TokenUsage(40, 0)
    assert summaries["carol"].tokens is None, "no usage reported is unknown, not 0"


async def test_list_jobs_newest_first_by_user_failed_only_and_limited(
    store: Store, db: Database
) -> None:
    for user_id in ("alice", "bob"):
        async with store.scope(user_id) as s:
            await s.ensure_user()
    a1 = await _insert_job(db, "alice", "done", note="1 change refused", tokens=(10, 2))
    b1 = await _insert_job(db, "bob", "failed", error="model said no")
    a2 = await _insert_job(db, "alice", "failed", error="timed out", attempts=3)
    a3 = await _insert_job(db, "alice", "pending")
    reader = AdminReader(db)

    everyone = await reader.list_jobs()
    assert [j.job_id for j in everyone] == [a3, a2, b1, a1]
    alice = await reader.list_jobs("alice")
    assert [(j.job_id, j.status) for j in alice] == [(a3, "pending"), (a2, "failed"), (a1, "done")]
    assert (alice[2].note, alice[2].extraction, alice[2].prompt_tokens) == (
        "1 change refused",
        "tools",
        10,
    )
    assert alice[2].completion_tokens == 2 and alice[0].prompt_tokens is None
    failed = await reader.list_jobs(failed_only=True)
    assert [(j.user_id, j.last_error, j.attempts) for j in failed] == [
        ("alice", "timed out", 3),
        ("bob", "model said no", 1),
    ]
    assert [j.job_id for j in await reader.list_jobs("bob", failed_only=True)] == [b1]
    assert [j.job_id for j in await reader.list_jobs(limit=2)] == [a3, a2]
    assert await reader.list_jobs("alice", failed_only=True, limit=1) == [alice[1]]

    with pytest.raises(NotFound, match="no user 'nobody'"):
        await reader.list_jobs("nobody")
    with pytest.raises(InvalidInput, match="invalid user id"):
        await reader.list_jobs("not an id")


async def test_overview_reads_a_thousand_users_in_one_pass(db: Database, database_dsn: str) -> None:
    if not await _is_superuser(database_dsn):
        pytest.skip("needs a superuser to write across users in bulk")
    # Written in bulk past row-level security; through the app this would take minutes.
    await _execute_as_owner(
        database_dsn,
        """
        INSERT INTO users (user_id, display_name)
        SELECT 'u' || lpad(i::text, 4, '0'), 'User ' || i FROM generate_series(1, 1000) i
        """,
        """
        INSERT INTO sessions (user_id, title)
        SELECT user_id, 'session of ' || user_id FROM users
        """,
        """
        INSERT INTO messages (user_id, session_id, role, content)
        SELECT s.user_id, s.session_id, r, 'hello from ' || s.user_id
          FROM sessions s, unnest(ARRAY['user', 'assistant']) r
        """,
        """
        INSERT INTO memories (user_id, content, source_session_id)
        SELECT user_id, 'Name is ' || user_id, session_id FROM sessions
        """,
    )
    overview = await AdminReader(db).overview()
    assert len(overview) == 1000
    for user in overview:
        assert [s.title for s in user.sessions] == [f"session of {user.user_id}"]
        assert user.messages == 2
        assert [(m.content, m.source_session_title) for m in user.memories] == [
            (f"Name is {user.user_id}", f"session of {user.user_id}")
        ]
    assert (await AdminReader(db).audit()).ok


async def _is_superuser(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(
            await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        )
    finally:
        await conn.close()


# -- audit ----------------------------------------------------------------------


async def test_audit_passes_on_the_seed(seeded: SeedResult, db: Database) -> None:
    result = await AdminReader(db).audit()
    assert [c.name for c in result.checks] == [CHECK_SOURCES, CHECK_NAMES, CHECK_RLS]
    assert result.ok, result.findings
    assert result.findings == ()
    assert _check(result, CHECK_NAMES)[1] == ("3 names vs 8 memories: none names another user")


async def test_audit_passes_on_an_empty_database(db: Database) -> None:
    assert (await AdminReader(db).audit()).ok


async def test_audit_finds_a_memory_naming_another_user(
    seeded: SeedResult, store: Store, db: Database
) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Friends with Mark Gonzales")
        # Not names: a longer word, and a name too short to count.
        await s.add_memory("Likes Markus and Mark-free Gonzalesque food")
        await s.add_memory("Name is Jo")
    async with store.scope("carol") as s:
        await s.ensure_user()
        await s.add_memory("Name is Jo")
        await s.add_memory("Jo is a friend")

    result = await AdminReader(db).audit()
    assert not result.ok
    ok, detail, findings = _check(result, CHECK_NAMES)
    assert not ok
    assert detail == "1 memory names another user"
    assert findings == [
        f"bob: memory 'Friends with Mark Gonzales' names 'Mark Gonzales' ({USER_1})"
    ]
    assert _check(result, CHECK_SOURCES)[0] and _check(result, CHECK_RLS)[0]


async def test_a_shared_name_is_not_a_leak(store: Store, db: Database) -> None:
    for user in ("alice", "bob"):
        async with store.scope(user) as s:
            await s.ensure_user()
            await s.add_memory("Name is Sam Lee")
            await s.add_memory("Sam Lee likes tea")
    assert (await AdminReader(db).audit()).ok


async def test_audit_finds_a_memory_citing_another_users_message(
    seeded: SeedResult, store: Store, db: Database, database_dsn: str
) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Likes chess")
    async with db.scoped(USER_2) as conn:
        johns_message = await conn.fetchval("SELECT min(message_id) FROM messages")
    # The composite key (user_id, source_message_id) forbids this outright: break
    # the schema first, as a bug in a future migration could.
    await _execute_as_owner(
        database_dsn,
        "ALTER TABLE memories DROP CONSTRAINT memories_user_id_source_message_id_fkey",
    )
    async with db.scoped("bob") as conn:
        await conn.execute("UPDATE memories SET source_message_id = $1", johns_message)

    result = await AdminReader(db).audit()
    assert not result.ok
    ok, detail, findings = _check(result, CHECK_SOURCES)
    assert not ok
    assert detail == "1 row points at another user's rows"
    assert findings == [f"bob: memory 'Likes chess' cites a message of {USER_2}"]


async def test_audit_finds_a_memory_citing_another_users_session(
    seeded: SeedResult, store: Store, db: Database, database_dsn: str
) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Likes chess")
    async with db.scoped(USER_3) as conn:
        janes_session = await conn.fetchval("SELECT session_id FROM sessions")
    await _execute_as_owner(
        database_dsn,
        "ALTER TABLE memories DROP CONSTRAINT memories_user_id_source_session_id_fkey",
    )
    async with db.scoped("bob") as conn:
        await conn.execute("UPDATE memories SET source_session_id = $1", janes_session)

    result = await AdminReader(db).audit()
    ok, _, findings = _check(result, CHECK_SOURCES)
    assert not ok and not result.ok
    assert findings == [f"bob: memory 'Likes chess' cites a session of {USER_3}"]
    # The overview never labels bob's memory with Jane's session.
    bob = _by_user(await AdminReader(db).overview())["bob"]
    assert bob.memories[0].source_session_title is None


async def test_audit_finds_an_event_about_another_users_memory(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    async with db.scoped(USER_1) as conn:
        marks_memory = await conn.fetchval(
            "SELECT memory_id FROM memories WHERE content = 'Name is Mark Gonzales'"
        )
    # The (user_id, memory_id) key of migration 0005 makes this impossible;
    # without it (a schema changed by hand) the audit still finds it.
    await _execute_as_owner(
        database_dsn, "ALTER TABLE memory_events DROP CONSTRAINT memory_events_memory_fkey"
    )
    async with db.scoped("bob") as conn:
        await conn.execute("INSERT INTO users (user_id, display_name) VALUES ('bob', 'bob')")
        await conn.execute(
            "INSERT INTO memory_events (memory_id, user_id, op, after) "
            "VALUES ($1, 'bob', 'update', 'Name is Bob')",
            marks_memory,
        )
    ok, _, findings = _check(await AdminReader(db).audit(), CHECK_SOURCES)
    assert not ok
    assert findings == [f"bob: change 'update: Name is Bob' is recorded on a memory of {USER_1}"]


async def test_audit_finds_row_level_security_not_forced(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    await _execute_as_owner(database_dsn, "ALTER TABLE memories NO FORCE ROW LEVEL SECURITY")
    result = await AdminReader(db).audit()
    assert not result.ok
    ok, detail, findings = _check(result, CHECK_RLS)
    assert not ok
    assert findings == ["memories: row-level security is not forced"]
    assert detail == "1 problem with tables, policies or roles"
    assert _check(result, CHECK_SOURCES)[0] and _check(result, CHECK_NAMES)[0]


async def test_audit_finds_row_level_security_disabled_and_policies_broken(
    db: Database, database_dsn: str
) -> None:
    await _execute_as_owner(
        database_dsn,
        "ALTER TABLE messages DISABLE ROW LEVEL SECURITY",
        "DROP POLICY sessions_user_scope ON sessions",
        # Permissive policies are OR-ed: this one opens every user's memories.
        "CREATE POLICY memories_peek ON memories FOR SELECT USING (true)",
        "ALTER POLICY users_user_scope ON users USING (true)",
    )
    ok, _, findings = _check(await AdminReader(db).audit(), CHECK_RLS)
    assert not ok
    assert findings == [
        "users: policy users_user_scope no longer scopes every command by user",
        "sessions: policy sessions_user_scope is missing",
        "messages: row-level security is not enabled",
        f"memories: policy memories_peek lets {db.roles.app} past the user scope",
    ]


async def test_audit_finds_runtime_role_bypassing_rls(db: Database, database_dsn: str) -> None:
    if not await _is_superuser(database_dsn):
        pytest.skip("needs a superuser to alter roles")
    # The role is this test database's own, so altering it touches nothing shared.
    app = db.roles.app
    await _execute_as_owner(database_dsn, f"ALTER ROLE {app} BYPASSRLS")
    try:
        ok, _, findings = _check(await AdminReader(db).audit(), CHECK_RLS)
    finally:
        await _execute_as_owner(database_dsn, f"ALTER ROLE {app} NOBYPASSRLS")
    assert not ok
    assert findings == [f"{app}: has BYPASSRLS"]


# -- the name matcher on its own ------------------------------------------------


def test_name_leaks_are_whole_word_case_insensitive_and_ignore_own_names() -> None:
    memories = [
        ("a", "Name is Mark Gonzales."),
        ("a", "name is  MARK"),
        ("b", "Name is Jane"),
        ("b", "Met mark gonzales yesterday"),  # leak of a's full name
        ("b", "Met Mark"),  # leak of a's short name
        ("b", "Markus and Janet"),  # no whole word
        ("b", "Jane likes Mark\u2019s band"),  # own name fine; Mark is a's
        ("c", "Name is Ed"),  # too short to count
        ("d", "Ed and Mark\nGonzales"),
    ]
    assert [str(f) for f in find_name_leaks((u, c, None) for u, c in memories)] == [
        "b: memory 'Met mark gonzales yesterday' names 'Mark Gonzales' (a), 'MARK' (a)",
        "b: memory 'Met Mark' names 'MARK' (a)",
        "b: memory 'Jane likes Mark’s band' names 'MARK' (a)",
        "d: memory 'Ed and Mark\\x0aGonzales' names 'Mark Gonzales' (a), 'MARK' (a)",
    ]
