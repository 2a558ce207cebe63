"""The catalogue's checks of an idle engine (engine/admin.py CHECKS), one by one.

Each passes on the seed conversation (every turn answered, every job done)
and fails when the row it guards is broken on purpose through the database
owner's connection, in this test's own database. The same checks make up
engine/audit.py's invariant audit and `scenario load`'s figures.
"""

from __future__ import annotations

import asyncpg
import pytest

from engine.admin import (
    CHECK_ACKNOWLEDGED,
    CHECK_BAD_REPLIES,
    CHECK_DUPLICATE_MEMORIES,
    CHECK_EXTRA_REPLIES,
    CHECK_FAILED_JOBS,
    CHECK_JOB_EFFECTS,
    CHECK_NO_SCOPE,
    CHECK_OPEN_JOBS,
    CHECK_REPLIES_WITHOUT_JOB,
    CHECK_RLS,
    CHECK_SILENT_FAILURES,
    CHECK_UNANSWERED,
    AdminReader,
    AuditCheck,
)
from engine.audit import CHECK_SCOPES, INVARIANT_CHECKS, audit_invariants
from engine.db import Database
from engine.scenarios import SEED_SCRIPT, SeedResult

pytestmark = pytest.mark.db

USER_1, USER_2, USER_3 = SEED_SCRIPT

ME = "current_setting('memchat.user_id')"
"""The user _as_owner acts for (the owner may be a superuser, whom no policy filters)."""

IDLE_CHECKS = tuple(name for name in INVARIANT_CHECKS if name != CHECK_RLS)
"""The checks of an idle engine: engine/audit.py's, but for row-level security (its own tests)."""


async def _as_owner(dsn: str, user_id: str, *statements: str) -> list[asyncpg.Record]:
    """Run statements as the database owner, inside ``user_id``'s scope setting
    (row-level security is forced on the owner too); the last one's rows."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT set_config('memchat.user_id', $1, false)", user_id)
        rows: list[asyncpg.Record] = []
        for statement in statements:
            rows = await conn.fetch(statement)
        return rows
    finally:
        await conn.close()


async def _one(
    db: Database,
    name: str,
    users: list[str] | None = None,
    acknowledged: dict[str, list[int]] | None = None,
) -> AuditCheck:
    result = await AdminReader(db).run_checks(name, users=users, acknowledged=acknowledged)
    (check,) = result.checks
    return check


def _lines(check: AuditCheck) -> list[str]:
    return [str(f) for f in check.findings]


async def test_every_idle_check_passes_on_the_seed(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    rows = await _as_owner(
        database_dsn, USER_1, f"SELECT message_id FROM messages WHERE user_id = {ME}"
    )
    acknowledged = {USER_1: [r["message_id"] for r in rows]}
    assert acknowledged[USER_1]
    result = await AdminReader(db).run_checks(*IDLE_CHECKS, acknowledged=acknowledged)
    assert [c.name for c in result.checks] == list(IDLE_CHECKS)
    assert [(c.ok, c.count, c.findings) for c in result.checks] == [(True, 0, ())] * len(
        IDLE_CHECKS
    )
    assert result.checks[0].detail == "no message"
    report = await audit_invariants(db, acknowledged=acknowledged)
    assert report.ok and report.problems == [], report.problems
    assert report.acknowledged_checked == len(acknowledged[USER_1])


async def test_acknowledged_messages_missing_or_stored_for_another_user(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (marks,) = await _as_owner(
        database_dsn, USER_1, f"SELECT min(message_id) AS id FROM messages WHERE user_id = {ME}"
    )
    mark = marks["id"]
    assert (await _one(db, CHECK_ACKNOWLEDGED, acknowledged={USER_1: [mark]})).ok
    check = await _one(db, CHECK_ACKNOWLEDGED, acknowledged={USER_2: [mark], "bob": [10**9]})
    assert (check.ok, check.count) == (False, 2)
    assert _lines(check) == [
        f"{USER_2}: message {mark} is stored for {USER_1}",
        f"bob: message {10**9} is not stored",
    ]


async def test_a_user_message_without_a_reply_is_a_turn_without_an_outcome(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_2,
        "INSERT INTO messages (session_id, user_id, role, content) "
        f"SELECT session_id, user_id, 'user', 'hello?' FROM sessions WHERE user_id = {ME} LIMIT 1 "
        "RETURNING message_id, session_id",
    )
    check = await _one(db, CHECK_UNANSWERED)
    assert (check.ok, check.count) == (False, 1)
    assert _lines(check) == [f"{USER_2}: session {row['session_id']}, message {row['message_id']}"]
    assert check.findings[0].message_id == row["message_id"]
    # Narrowed to other users, the check does not see it.
    assert (await _one(db, CHECK_UNANSWERED, users=[USER_1, USER_3])).ok


async def test_a_reply_to_no_user_message_is_an_extra_reply(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_3,
        f"INSERT INTO sessions (user_id, title) VALUES ({ME}, 'x') RETURNING session_id",
        "INSERT INTO messages (session_id, user_id, role, content) "
        "SELECT session_id, user_id, 'assistant', 'unasked' FROM sessions WHERE title = 'x' "
        "RETURNING message_id, session_id",
    )
    check = await _one(db, CHECK_EXTRA_REPLIES)
    assert (check.ok, check.count) == (False, 1)
    assert _lines(check) == [f"{USER_3}: session {row['session_id']}, message {row['message_id']}"]
    assert (await _one(db, CHECK_UNANSWERED)).ok


async def test_a_reply_failed_without_an_error_is_a_bad_reply(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_3,
        "UPDATE messages SET status = 'failed', error = ' ' WHERE message_id = "
        f"(SELECT max(message_id) FROM messages WHERE role = 'assistant' AND user_id = {ME}) "
        "RETURNING message_id, session_id",
    )
    check = await _one(db, CHECK_BAD_REPLIES)
    assert (check.ok, check.count) == (False, 1)
    assert _lines(check) == [
        f"{USER_3}: session {row['session_id']}, reply {row['message_id']} failed without an error"
    ]


async def test_a_pending_job_is_not_settled(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_2,
        "UPDATE memory_jobs SET status = 'pending' WHERE job_id = "
        f"(SELECT min(job_id) FROM memory_jobs WHERE user_id = {ME}) "
        "RETURNING job_id, attempts",
    )
    check = await _one(db, CHECK_OPEN_JOBS)
    assert (check.ok, check.count, check.detail) == (False, 1, "1 open job")
    assert _lines(check) == [
        f"{USER_2}: job {row['job_id']} is pending (attempts {row['attempts']}, last error None)"
    ]
    assert (await _one(db, CHECK_OPEN_JOBS, users=[USER_1])).ok


async def test_a_job_failed_without_an_error_is_found_and_counted_as_failed(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_2,
        "UPDATE memory_jobs SET status = 'failed', last_error = '' WHERE job_id = "
        f"(SELECT min(job_id) FROM memory_jobs WHERE user_id = {ME}) "
        "RETURNING job_id",
    )
    check = await _one(db, CHECK_SILENT_FAILURES)
    assert (check.ok, check.count) == (False, 1)
    assert _lines(check) == [f"{USER_2}: job {row['job_id']}"]
    failed = await _one(db, CHECK_FAILED_JOBS, users=[USER_2])
    assert (failed.ok, failed.count) == (False, 1)
    assert (await _one(db, CHECK_FAILED_JOBS, users=[USER_1, USER_3])).count == 0


async def test_a_completed_reply_without_a_job_is_found(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (row,) = await _as_owner(
        database_dsn,
        USER_3,
        "DELETE FROM memory_jobs WHERE job_id = "
        f"(SELECT min(job_id) FROM memory_jobs WHERE user_id = {ME}) "
        "RETURNING assistant_message_id",
    )
    check = await _one(db, CHECK_REPLIES_WITHOUT_JOB)
    assert (check.ok, check.count) == (False, 1)
    assert _lines(check) == [f"{USER_3}: reply {row['assistant_message_id']}"]
    assert (await _one(db, CHECK_REPLIES_WITHOUT_JOB, users=[USER_1, USER_2])).ok


async def test_two_jobs_for_one_reply_and_one_memory_added_twice_are_found(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    first_job = f"(SELECT min(job_id) FROM memory_jobs WHERE user_id = {ME})"
    jobs = await _as_owner(
        database_dsn,
        USER_1,
        "INSERT INTO memory_jobs (user_id, session_id, user_message_id, assistant_message_id, "
        "status) SELECT user_id, session_id, user_message_id, assistant_message_id, 'done' "
        f"FROM memory_jobs WHERE job_id = {first_job}",
        "INSERT INTO memory_events (memory_id, user_id, op, after, job_id) "
        "SELECT memory_id, user_id, op, after, job_id FROM memory_events "
        f"WHERE op = 'add' AND job_id IS NOT NULL AND user_id = {ME} ORDER BY event_id LIMIT 1",
        "SELECT assistant_message_id, array_agg(job_id ORDER BY job_id) AS jobs FROM memory_jobs "
        "GROUP BY assistant_message_id HAVING count(*) > 1",
    )
    (added,) = await _as_owner(
        database_dsn,
        USER_1,
        "SELECT job_id, after FROM memory_events WHERE op = 'add' AND job_id IS NOT NULL "
        "GROUP BY job_id, after HAVING count(*) > 1",
    )
    check = await _one(db, CHECK_JOB_EFFECTS)
    assert (check.ok, check.count) == (False, 2)
    assert _lines(check) == [
        f"{USER_1}: reply {jobs[0]['assistant_message_id']} has jobs {list(jobs[0]['jobs'])}",
        f"{USER_1}: job {added['job_id']} added {added['after']!r} 2 times",
    ]


async def test_duplicate_memories_count_every_copy_beyond_the_first(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    # The unique index forbids these; the check does not take the schema's word for it.
    await _as_owner(
        database_dsn,
        USER_2,
        "DROP INDEX memories_unique_per_user",
        "INSERT INTO memories (user_id, content) VALUES "
        f"({ME}, 'Likes tea'), "
        f"({ME}, 'likes  TEA.'), "
        f"({ME}, 'Likes tea!')",
    )
    check = await _one(db, CHECK_DUPLICATE_MEMORIES)
    assert (check.ok, check.count, check.detail) == (False, 2, "2 duplicate memories")
    assert _lines(check) == [f"{USER_2}: 'likes tea' 3 times"]
    assert (await _one(db, CHECK_DUPLICATE_MEMORIES, users=[USER_1, USER_3])).ok


async def test_rows_readable_outside_any_scope_fail_both_isolation_checks(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    (memories,) = await _as_owner(
        database_dsn, USER_1, f"SELECT count(*) AS n FROM memories WHERE user_id = {ME}"
    )
    assert (await audit_invariants(db)).ok
    # Permissive policies are OR-ed: this one shows every memory to everyone.
    await _as_owner(
        database_dsn, USER_1, "CREATE POLICY memories_peek ON memories FOR SELECT USING (true)"
    )
    check = await _one(db, CHECK_NO_SCOPE)
    assert (check.ok, check.count) == (False, 1)
    all_memories = (await AdminReader(db).totals())["memories"]
    assert memories["n"] < all_memories
    assert _lines(check) == [f"memories: a connection in no user's scope sees {all_memories} rows"]
    report = await audit_invariants(db)
    assert not report.ok
    scopes = next(c for c in report.checks if c.name == CHECK_SCOPES)
    assert not scopes.ok and scopes.count == 3  # each seed user's scope sees the others'
    # Admin's row-level security check sees the policy itself; nothing else fails.
    assert {c.name for c in report.checks if not c.ok} == {CHECK_NO_SCOPE, CHECK_SCOPES, CHECK_RLS}


async def test_notes_that_only_tell_how_a_coalesced_run_was_shared_are_not_flagged(
    seeded: SeedResult, db: Database, database_dsn: str
) -> None:
    # user_1's seed has four done jobs: two get coalescing's bookkeeping notes,
    # one a real note (a refused change), one none.
    await _as_owner(
        database_dsn,
        USER_1,
        "UPDATE memory_jobs SET note = CASE rn WHEN 1 THEN 'coalesced into job 7' "
        "WHEN 2 THEN 'extracted with job(s) 8, 9' WHEN 3 THEN 'refused: too long' END "
        "FROM (SELECT job_id AS id, row_number() OVER (ORDER BY job_id) AS rn "
        f"FROM memory_jobs WHERE user_id = {ME}) o WHERE job_id = o.id",
    )
    (user_1,) = [u for u in await AdminReader(db).overview() if u.user_id == USER_1]
    assert (user_1.jobs.noted, user_1.jobs.problem_total) == (1, 1)
    assert [p.note for p in user_1.jobs.problems] == ["refused: too long"]
