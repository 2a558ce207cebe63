"""Cross-user, read-only views: the one explicit way around per-user scoping.

Used by the inspector, audits, `memchat users` and `memchat jobs`. Everything
here runs in ``Database.admin()``, a read-only transaction as the
``memchat_admin`` role, which the database allows to SELECT and nothing else.

Each view reads every user at once with a few set-based queries and groups the
rows in Python, so its cost grows with the data, not with round trips per user.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine.db import Database
from engine.db.migrate import current_version
from engine.errors import NotFound
from engine.records import JobCounts, JobProblem, MemoryJob, MemoryOp
from engine.text import plural
from engine.validation import look_alikes, printable, validate_user_id

USER_OWNED_TABLES = ("users", "sessions", "messages", "memories", "memory_events", "memory_jobs")

MAX_FINDINGS = 50
"""Per check: a systemic failure over thousands of rows needs examples, not all of them."""

MIN_NAME_CHARS = 3
"""Shorter names ("Al", "Jo") match too many ordinary words to mean a leak."""

JOB_PROBLEMS_SHOWN = 3
"""Per user in the overview: the newest failed jobs and job notes, with their text."""

_JOB_COLUMNS = (
    "job_id, user_id, session_id, user_message_id, assistant_message_id, status, attempts, "
    "run_after, lease_until, worker, last_error, created_at, started_at, finished_at, note, "
    "extraction, prompt_tokens, completion_tokens"
)

_LOGIN = """
-- A pool's own login and its rights (AdminReader.live_logins).
SELECT session_user AS login, current_user AS role, r.rolsuper, r.rolbypassrls,
       r.rolcreaterole, r.rolcreatedb, r.rolreplication,
       ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
              WHERE m.member = r.oid ORDER BY 1)::text[] AS member_of,
       EXISTS (SELECT 1 FROM pg_class c
                WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                  AND has_table_privilege(r.oid, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE'))
           AS can_write,
       EXISTS (SELECT 1 FROM pg_class c
                WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                  AND has_table_privilege(r.oid, c.oid, 'SELECT'))
           AS can_read
  FROM pg_roles r WHERE r.rolname = session_user
"""

_REPORTED = "(prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL)"
"""Rows whose endpoint reported usage: the others count as unknown, not as zero."""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens summed over the rows that reported usage."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def token_usage(row: Any) -> TokenUsage | None:
    """From a row's prompt_tokens/completion_tokens sums; None when nothing was reported."""
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    if prompt is None and completion is None:
        return None
    return TokenUsage(prompt or 0, completion or 0)


@dataclass(frozen=True, slots=True)
class UserSummary:
    user_id: str
    display_name: str
    created_at: datetime
    sessions: int
    messages: int
    memories: int
    tokens: TokenUsage | None = None
    """Chat replies and memory jobs together; None when no usage was ever reported."""


@dataclass(frozen=True, slots=True)
class SessionOverview:
    session_id: uuid.UUID
    number: int
    """1 for the user's first session, in creation order: stable, unlike ids and times."""
    title: str | None
    messages: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MemoryChange:
    op: MemoryOp
    before: str | None
    after: str | None
    actor: str


@dataclass(frozen=True, slots=True)
class MemoryOverview:
    memory_id: uuid.UUID
    content: str
    topics: tuple[str, ...]
    source_session_title: str | None
    source_session_number: int | None
    """None when the memory has no source session (added by hand, or the session was deleted)."""
    created_at: datetime
    updated_at: datetime
    history: tuple[MemoryChange, ...]
    """Oldest first."""


@dataclass(frozen=True, slots=True)
class UserOverview:
    user_id: str
    display_name: str
    sessions: tuple[SessionOverview, ...]
    """Most recently active first."""
    memories: tuple[MemoryOverview, ...]
    """Oldest first, the order in which they were learned."""
    jobs: JobCounts
    forgotten: int
    """Memories this user once had that have since been deleted."""
    chat_tokens: TokenUsage | None = None
    """What this user's replies cost, when the endpoint said; None when it never did."""
    memory_tokens: TokenUsage | None = None
    """What this user's memory jobs cost, likewise."""
    look_alikes: tuple[str, ...] = ()
    """Other user ids that differ from this one only by look-alike characters (I/l/1, O/0)."""

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.sessions)


@dataclass(frozen=True, slots=True)
class AuditFinding:
    subject: str
    """The user id, or the table or role at fault."""
    message: str
    memory_id: uuid.UUID | None = None
    """The subject's memory at fault, if it is one (the inspector marks it)."""
    message_id: int | None = None
    """The subject's message at fault, if it is one (a turn without an outcome)."""

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass(frozen=True, slots=True)
class AuditCheck:
    name: str
    ok: bool
    detail: str
    findings: tuple[AuditFinding, ...] = ()
    """At most MAX_FINDINGS; ``count`` and ``detail`` carry the full count."""
    count: int = 0
    """How many problems the check found (0 when ok)."""


@dataclass(frozen=True, slots=True)
class AuditResult:
    checks: tuple[AuditCheck, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> tuple[AuditCheck, ...]:
        return tuple(check for check in self.checks if not check.ok)

    @property
    def findings(self) -> tuple[AuditFinding, ...]:
        return tuple(f for check in self.checks for f in check.findings)


CHECK_SOURCES = "memory sources"
CHECK_NAMES = "names"
CHECK_RLS = "row-level security"
CHECK_FAILED_JOBS = "failed jobs"
CHECK_STUCK_JOBS = "stuck jobs"
# For audits of an idle engine (engine/audit.py, `scenario load`): each is a
# problem only once no turn is in flight and no job is left to run.
CHECK_ACKNOWLEDGED = "acknowledged message not stored"
CHECK_UNANSWERED = "turn without an outcome"
CHECK_EXTRA_REPLIES = "extra reply (answers no user message)"
CHECK_BAD_REPLIES = "bad reply"
CHECK_OPEN_JOBS = "memory job not settled"
CHECK_SILENT_FAILURES = "memory job failed without an error"
CHECK_REPLIES_WITHOUT_JOB = "completed reply without a memory job"
CHECK_JOB_EFFECTS = "job effect applied twice"
CHECK_DUPLICATE_MEMORIES = "duplicate memory"
CHECK_NO_SCOPE = "isolation outside any scope"

INSPECTOR_CHECKS = (CHECK_SOURCES, CHECK_NAMES, CHECK_RLS)
"""What the inspector's isolation audit runs (``AdminReader.audit``)."""

PENDING_OVERDUE_MINUTES = 10
"""A pending job due this long ago and still not claimed: nobody is working the queue."""


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What a check is given besides its snapshot connection."""

    db: Database
    users: list[str] | None = None
    """Only these users' rows (the checks that take it); None: every user."""
    acknowledged: Mapping[str, Collection[int]] = dataclasses.field(default_factory=dict)
    """user_id -> message ids the engine handed back (CHECK_ACKNOWLEDGED)."""


class AdminReader:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        # One snapshot for all of a view's queries, so that counts, memories and
        # their histories agree with each other while users keep chatting.
        async with self.db.admin() as conn:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield conn

    async def list_users(self) -> list[UserSummary]:
        async with self.db.admin() as conn:
            rows = await conn.fetch(
                f"""
                WITH usage AS (
                    SELECT user_id, sum(prompt_tokens) AS prompt_tokens,
                           sum(completion_tokens) AS completion_tokens
                      FROM (SELECT user_id, prompt_tokens, completion_tokens
                              FROM messages WHERE {_REPORTED}
                            UNION ALL
                            SELECT user_id, prompt_tokens, completion_tokens
                              FROM memory_jobs WHERE {_REPORTED}) reported
                     GROUP BY user_id
                )
                SELECT u.user_id, u.display_name, u.created_at,
                       (SELECT count(*) FROM sessions s WHERE s.user_id = u.user_id) AS sessions,
                       (SELECT count(*) FROM messages m WHERE m.user_id = u.user_id) AS messages,
                       (SELECT count(*) FROM memories y WHERE y.user_id = u.user_id) AS memories,
                       t.prompt_tokens, t.completion_tokens
                  FROM users u LEFT JOIN usage t ON t.user_id = u.user_id
                 ORDER BY u.user_id
                """
            )
        return [
            UserSummary(
                user_id=row["user_id"],
                display_name=row["display_name"],
                created_at=row["created_at"],
                sessions=row["sessions"],
                messages=row["messages"],
                memories=row["memories"],
                tokens=token_usage(row),
            )
            for row in rows
        ]

    async def list_jobs(
        self, user_id: str | None = None, *, failed_only: bool = False, limit: int = 50
    ) -> list[MemoryJob]:
        """Memory jobs of every user (or one), newest first.

        Raises NotFound for a user id that has no user (a typo should not read
        as "no jobs").
        """
        user = validate_user_id(user_id) if user_id is not None else None
        async with self.db.admin() as conn:
            if user is not None and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM users WHERE user_id = $1)", user
            ):
                raise NotFound(f"no user {printable(user)}")
            rows = await conn.fetch(
                f"""
                SELECT {_JOB_COLUMNS} FROM memory_jobs
                 WHERE ($1::text IS NULL OR user_id = $1)
                   AND (NOT $2 OR status = 'failed')
                 ORDER BY job_id DESC
                 LIMIT $3
                """,
                user,
                failed_only,
                limit,
            )
        return [MemoryJob(**row) for row in rows]

    async def live_logins(self) -> dict[str, asyncpg.Record]:
        """Who each pool (app, admin, worker) logs in as, with the rights that matter.

        Not a read across users: each pool is asked about itself, for the
        doctor's login-roles check.
        """
        logins = {}
        for kind, connection in (
            ("app", self.db.unscoped),
            ("admin", self.db.admin),
            ("worker", self.db.queue),
        ):
            async with connection() as conn:
                row = await conn.fetchrow(_LOGIN)
            assert row is not None  # _LOGIN has no FROM at its top, so it returns one row
            logins[kind] = row
        return logins

    async def vector_status(self) -> str | None:
        """None when this database holds memory vectors (migration 0011), else why not."""
        async with self.db.admin() as conn:
            row = await conn.fetchrow(_VECTOR_STATUS)
        assert row is not None
        if row["ready"]:
            return None
        then = "then SELECT memchat_setup_vectors() as the database owner"
        if row["created"]:
            return f"the vector extension exists but memory_vectors does not: {then}"
        if row["available"]:
            return (
                "this database has no vector extension, and creating it needs a superuser: "
                f"CREATE EXTENSION vector; {then}"
            )
        return (
            "this PostgreSQL server has no pgvector extension: install it (e.g. the "
            f"postgresql-NN-pgvector package), CREATE EXTENSION vector as a superuser, {then}"
        )

    async def schema_version(self) -> int | None:
        """The schema's migration version; None before the first migration."""
        async with self.db.admin() as conn:
            # The admin login may read memchat_migrations (and nothing may write it).
            return await current_version(conn)

    async def open_job_count(self, user_ids: Iterable[str]) -> int:
        """Open (pending or running) jobs of these users, in one read across them."""
        async with self.db.admin() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM memory_jobs WHERE user_id = ANY($1::text[]) "
                "AND status IN ('pending', 'running')",
                list(user_ids),
            )
        return count

    async def row_level_security(self) -> dict[str, tuple[bool, bool]]:
        """Per user-owned table this database has: (enabled, forced)."""
        async with self.db.admin() as conn:
            return await _row_level_security(conn, await _rls_tables(conn))

    # -- the inspector's overview -------------------------------------------

    async def overview(self) -> list[UserOverview]:
        """Every user with sessions, memories (and their history) and job states."""
        async with self._snapshot() as conn:
            users = await conn.fetch(
                'SELECT user_id, display_name FROM users ORDER BY user_id COLLATE "C"'
            )
            sessions = await conn.fetch(
                """
                SELECT s.user_id, s.session_id, s.title, s.created_at, s.updated_at,
                       row_number() OVER (PARTITION BY s.user_id
                                          ORDER BY s.created_at, s.session_id) AS number,
                       coalesce(c.n, 0) AS messages
                  FROM sessions s
                  LEFT JOIN (SELECT session_id, count(*) AS n FROM messages GROUP BY session_id) c
                         ON c.session_id = s.session_id
                 ORDER BY s.user_id, s.updated_at DESC, s.created_at DESC, s.session_id
                """
            )
            memories = await conn.fetch(
                """
                SELECT user_id, memory_id, content, topics, source_session_id,
                       created_at, updated_at
                  FROM memories
                 ORDER BY user_id, created_at, memory_id
                """
            )
            events = await conn.fetch(
                """
                SELECT user_id, memory_id, op, before, after, actor
                  FROM memory_events
                 ORDER BY event_id
                """
            )
            jobs = await conn.fetch(
                f"""
                SELECT user_id,
                       count(*) FILTER (WHERE status = 'pending') AS pending,
                       count(*) FILTER (WHERE status = 'running') AS running,
                       count(*) FILTER (WHERE status = 'done') AS done,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       (array_agg(last_error ORDER BY job_id DESC)
                            FILTER (WHERE status = 'failed'))[1] AS last_error,
                       count(*) FILTER (WHERE {_NOTEWORTHY}) AS noted,
                       count(*) FILTER (WHERE status = 'failed' OR {_NOTEWORTHY})
                           AS problem_total
                  FROM memory_jobs
                 GROUP BY user_id
                """
            )
            problems = await conn.fetch(
                f"""
                SELECT user_id, status, attempts, last_error, note
                  FROM (SELECT user_id, job_id, status, attempts, last_error, note,
                               row_number() OVER (PARTITION BY user_id
                                                  ORDER BY job_id DESC) AS n
                          FROM memory_jobs
                         WHERE status = 'failed' OR {_NOTEWORTHY}) j
                 WHERE n <= $1
                 ORDER BY user_id, job_id DESC
                """,
                JOB_PROBLEMS_SHOWN,
            )
            usage = await conn.fetch(
                f"""
                SELECT user_id, 'chat' AS kind, sum(prompt_tokens) AS prompt_tokens,
                       sum(completion_tokens) AS completion_tokens
                  FROM messages WHERE {_REPORTED} GROUP BY user_id
                UNION ALL
                SELECT user_id, 'memory', sum(prompt_tokens), sum(completion_tokens)
                  FROM memory_jobs WHERE {_REPORTED} GROUP BY user_id
                """
            )
        overview = _assemble_overview(
            users, sessions, memories, events, _job_counts(jobs, problems), _usage(usage)
        )
        ids = [user.user_id for user in overview]
        return [
            dataclasses.replace(user, look_alikes=tuple(found))
            if (found := look_alikes(user.user_id, ids))
            else user
            for user in overview
        ]

    async def look_alikes(self, user_id: str) -> list[str]:
        """Existing user ids that could be mistaken for ``user_id`` (I/l/1, O/0, rn/m)."""
        user_id = validate_user_id(user_id)
        async with self._snapshot() as conn:
            rows = await conn.fetch("SELECT user_id FROM users")
        return look_alikes(user_id, (row["user_id"] for row in rows))

    # -- the check catalogue ----------------------------------------------

    async def run_checks(
        self,
        *names: str,
        users: list[str] | None = None,
        acknowledged: Mapping[str, Collection[int]] | None = None,
    ) -> AuditResult:
        """Run these checks of the catalogue (``CHECKS``), in order, in one snapshot.

        ``users`` narrows the checks that can be narrowed to those users' rows.
        """
        given = CheckInput(self.db, users, acknowledged or {})
        async with self._snapshot() as conn:
            return AuditResult(tuple([await CHECKS[name](conn, given) for name in names]))

    async def audit(self) -> AuditResult:
        """Check, across all users, that nothing of one user is attached to another."""
        return await self.run_checks(*INSPECTOR_CHECKS)

    # -- figures for a load scenario and for the invariant audit -------------

    async def memories_of(self, user_ids: list[str]) -> list[tuple[str, str]]:
        """(user_id, content) of every memory of these users."""
        async with self.db.admin() as conn:
            rows = await conn.fetch(
                "SELECT user_id, content FROM memories WHERE user_id = ANY($1::text[])", user_ids
            )
        return [(row["user_id"], row["content"]) for row in rows]

    async def failed_job_errors(self, user_ids: list[str], limit: int) -> dict[str, int]:
        """The most frequent errors of these users' failed jobs, with their counts."""
        async with self.db.admin() as conn:
            rows = await conn.fetch(
                "SELECT coalesce(last_error, '') AS error, count(*) AS n FROM memory_jobs "
                "WHERE user_id = ANY($1::text[]) AND status = 'failed' "
                "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2",
                user_ids,
                limit,
            )
        return {row["error"]: row["n"] for row in rows}

    async def totals(self) -> dict[str, int]:
        """Users, messages, jobs and memories in the database."""
        async with self.db.admin() as conn:
            row = await conn.fetchrow(
                """
                SELECT (SELECT count(*) FROM users) AS users,
                       (SELECT count(*) FROM messages) AS messages,
                       (SELECT count(*) FROM memory_jobs) AS jobs,
                       (SELECT count(*) FROM memories) AS memories
                """
            )
        assert row is not None  # a SELECT without FROM returns one row
        return dict(row)

    async def own_row_counts(self) -> dict[str, dict[str, int]]:
        """user_id -> table -> how many rows of that user the table holds."""
        async with self.db.admin() as conn:
            return await _own_row_counts(conn)

    async def unscoped_row_counts(self) -> dict[str, int]:
        """Rows of each user-owned table a connection in no user's scope can read (0 is right).

        Through the app login outside any scope, read-only: row-level security
        must show it nothing.
        """
        async with self.db.unscoped() as conn, conn.transaction(readonly=True):
            return {
                table: await conn.fetchval(f"SELECT count(*) FROM {table}")
                for table in USER_OWNED_TABLES
            }


def _job_counts(jobs: Iterable[Any], problems: Iterable[Any]) -> dict[str, JobCounts]:
    problems_of: dict[str, list[JobProblem]] = defaultdict(list)
    for row in problems:
        problems_of[row["user_id"]].append(
            JobProblem(row["status"], row["attempts"], row["last_error"], row["note"])
        )
    return {
        row["user_id"]: JobCounts(
            pending=row["pending"],
            running=row["running"],
            done=row["done"],
            failed=row["failed"],
            last_error=row["last_error"],
            noted=row["noted"],
            problems=tuple(problems_of.get(row["user_id"], ())),
            problem_total=row["problem_total"],
        )
        for row in jobs
    }


def _usage(rows: Iterable[Any]) -> dict[tuple[str, str], TokenUsage]:
    """(user_id, "chat" | "memory") -> tokens, for the users whose endpoint reported any."""
    found = {(row["user_id"], row["kind"]): token_usage(row) for row in rows}
    return {key: usage for key, usage in found.items() if usage is not None}


def _assemble_overview(
    users: Iterable[Any],
    sessions: Iterable[Any],
    memories: Iterable[Any],
    events: Iterable[Any],
    job_counts: dict[str, JobCounts],
    usage: dict[tuple[str, str], TokenUsage],
) -> list[UserOverview]:
    sessions_of: dict[str, list[SessionOverview]] = defaultdict(list)
    # Keyed by (user, session) so that a memory can only ever be labelled with
    # a session of its own user, even if the data says otherwise.
    session_by_key: dict[tuple[str, uuid.UUID], SessionOverview] = {}
    for row in sessions:
        session = SessionOverview(
            session_id=row["session_id"],
            number=row["number"],
            title=row["title"],
            messages=row["messages"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )
        sessions_of[row["user_id"]].append(session)
        session_by_key[(row["user_id"], row["session_id"])] = session

    history: dict[tuple[str, uuid.UUID], list[MemoryChange]] = defaultdict(list)
    for row in events:
        history[(row["user_id"], row["memory_id"])].append(
            MemoryChange(op=row["op"], before=row["before"], after=row["after"], actor=row["actor"])
        )

    memories_of: dict[str, list[MemoryOverview]] = defaultdict(list)
    for row in memories:
        key = (row["user_id"], row["memory_id"])
        source = (
            session_by_key.get((row["user_id"], row["source_session_id"]))
            if row["source_session_id"] is not None
            else None
        )
        memories_of[row["user_id"]].append(
            MemoryOverview(
                memory_id=row["memory_id"],
                content=row["content"],
                topics=tuple(row["topics"] or ()),
                source_session_title=source.title if source else None,
                source_session_number=source.number if source else None,
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                history=tuple(history.get(key, ())),
            )
        )

    forgotten: dict[str, int] = defaultdict(int)
    for (user_id, _), changes in history.items():
        if changes[-1].op == "delete":
            forgotten[user_id] += 1

    return [
        UserOverview(
            user_id=row["user_id"],
            display_name=row["display_name"],
            sessions=tuple(sessions_of.get(row["user_id"], ())),
            memories=tuple(memories_of.get(row["user_id"], ())),
            jobs=job_counts.get(row["user_id"], JobCounts()),
            forgotten=forgotten.get(row["user_id"], 0),
            chat_tokens=usage.get((row["user_id"], "chat")),
            memory_tokens=usage.get((row["user_id"], "memory")),
        )
        for row in users
    ]


# -- check 1: every row a memory points at is its own user's -----------------


async def _check_sources(conn: asyncpg.Connection) -> AuditCheck:
    # The composite foreign keys make these impossible in a healthy schema;
    # the audit does not take the schema's word for it.
    rows = await conn.fetch(
        """
        SELECT y.user_id, y.memory_id, y.content, 'memory' AS kind,
               'cites a message of' AS what, m.user_id AS other
          FROM memories y JOIN messages m ON m.message_id = y.source_message_id
         WHERE m.user_id <> y.user_id
        UNION ALL
        SELECT y.user_id, y.memory_id, y.content, 'memory', 'cites a session of', s.user_id
          FROM memories y JOIN sessions s ON s.session_id = y.source_session_id
         WHERE s.user_id <> y.user_id
        UNION ALL
        SELECT e.user_id, NULL, e.op || ': ' || coalesce(e.after, e.before, ''), 'change',
               'is recorded on a memory of', y.user_id
          FROM memory_events e JOIN memories y ON y.memory_id = e.memory_id
         WHERE y.user_id <> e.user_id
        ORDER BY 1, 4, 5, 3
        """
    )
    counts = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM memories) AS memories,
               (SELECT count(*) FROM memory_events) AS events
        """
    )
    assert counts is not None  # a SELECT without FROM returns one row
    findings = [
        AuditFinding(
            row["user_id"],
            f"{row['kind']} {printable(row['content'])} {row['what']} {row['other']}",
            row["memory_id"],
        )
        for row in rows
    ]
    if findings:
        count = len(findings)
        detail = f"{plural(count, 'row')} {_verb(count, 'point')} at another user's rows"
    else:
        detail = (
            f"{plural(counts['memories'], 'memory')}, {plural(counts['events'], 'event')}: "
            "no source of another user"
        )
    return AuditCheck(
        CHECK_SOURCES, not findings, detail, tuple(findings[:MAX_FINDINGS]), len(findings)
    )


# -- check 2: no memory names another user ------------------------------------

_NAME_RE = re.compile(r"\s*name\s+is\s+(.+?)[\s.!;,]*", re.IGNORECASE)
_WORD_RE = re.compile(r"\w+")


def _name_of(content: str) -> str | None:
    """X from a memory "Name is X", with single spaces; None if too short to tell."""
    match = _NAME_RE.fullmatch(content)
    if match is None:
        return None
    name = " ".join(match.group(1).split())
    return name if len(name) >= MIN_NAME_CHARS else None


def _name_pattern(name: str) -> re.Pattern[str]:
    # Whole word on both ends, whatever characters the name starts or ends
    # with; any run of spaces inside it.
    body = r"\s+".join(re.escape(part) for part in name.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def find_name_leaks(
    memories: Iterable[tuple[str, str, uuid.UUID | None]],
) -> list[AuditFinding]:
    """Memories (user_id, content, memory_id) mentioning a name another user gave as theirs."""
    memories = list(memories)
    # Keyed case-insensitively; the first spelling seen is the one reported.
    owners: dict[str, set[str]] = defaultdict(set)
    spelling: dict[str, str] = {}
    for user_id, content, _ in memories:
        name = _name_of(content)
        if name is not None:
            owners[name.casefold()].add(user_id)
            spelling.setdefault(name.casefold(), name)

    # Looking every name up in every memory is names x memories regex scans;
    # only names whose first word occurs in a memory can match it.
    by_first_word: dict[str, list[str]] = defaultdict(list)
    wordless: list[str] = []
    for name in owners:
        first = _WORD_RE.search(name)
        if first is None:
            wordless.append(name)
        else:
            by_first_word[first.group()].append(name)
    patterns = {name: _name_pattern(name) for name in owners}

    findings: list[AuditFinding] = []
    for user_id, content, memory_id in memories:
        folded = content.casefold()
        words = set(_WORD_RE.findall(folded))
        candidates = [n for w in words for n in by_first_word.get(w, ())] + wordless
        # Longest first: "Mark Gonzales" says more than the "Mark" inside it.
        leaked = sorted(
            (n for n in candidates if user_id not in owners[n] and patterns[n].search(folded)),
            key=lambda n: (-len(n), n),
        )
        if leaked:
            named = ", ".join(
                f"{printable(spelling[n])} ({', '.join(sorted(owners[n]))})" for n in leaked
            )
            findings.append(
                AuditFinding(user_id, f"memory {printable(content)} names {named}", memory_id)
            )
    return findings


async def _check_names(conn: asyncpg.Connection) -> AuditCheck:
    rows = await conn.fetch(
        "SELECT user_id, content, memory_id FROM memories "
        'ORDER BY user_id COLLATE "C", created_at, memory_id'
    )
    memories = [(row["user_id"], row["content"], row["memory_id"]) for row in rows]
    findings = find_name_leaks(memories)
    names = {name.casefold() for _, content, _ in memories if (name := _name_of(content))}
    if findings:
        detail = f"{plural(len(findings), 'memory')} {_verb(len(findings), 'name')} another user"
    else:
        detail = (
            f"{plural(len(names), 'name')} vs {plural(len(memories), 'memory')}: "
            "none names another user"
        )
    return AuditCheck(
        CHECK_NAMES, not findings, detail, tuple(findings[:MAX_FINDINGS]), len(findings)
    )


# -- check 3: the database enforces isolation ---------------------------------


# A note that only says how a coalesced run was shared out (engine/jobs.py,
# engine/queue.py) is bookkeeping, not something the inspector should flag.
_NOTEWORTHY = (
    "(note IS NOT NULL AND note !~ "
    "'^(coalesced into job [0-9]+|extracted with job\\(s\\) [0-9, ]+)$')"
)

OPTIONAL_USER_TABLES = ("memory_vectors",)
"""User-owned tables a database may lack (memory_vectors: only where pgvector is)."""


async def _rls_tables(conn: asyncpg.Connection) -> tuple[str, ...]:
    """The user-owned tables this database has to keep isolated."""
    present = await conn.fetchval(
        "SELECT array_agg(t) FROM unnest($1::text[]) AS t"
        " WHERE to_regclass('public.' || quote_ident(t)) IS NOT NULL",
        list(OPTIONAL_USER_TABLES),
    )
    return USER_OWNED_TABLES + tuple(present or ())


async def _row_level_security(
    conn: asyncpg.Connection, tables: tuple[str, ...]
) -> dict[str, tuple[bool, bool]]:
    rows = await conn.fetch(
        """
        SELECT relname, relrowsecurity, relforcerowsecurity
          FROM pg_class
         WHERE relname = ANY($1::text[]) AND relkind = 'r'
           AND relnamespace = 'public'::regnamespace
        """,
        list(tables),
    )
    return {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in rows}


_VECTOR_STATUS = """
SELECT to_regclass('public.memory_vectors') IS NOT NULL AS ready,
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') AS created,
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') AS available
"""

_SCOPE_SETTING = "current_setting('memchat.user_id'"


async def _check_rls(conn: asyncpg.Connection, app_role: str) -> AuditCheck:
    checked = await _rls_tables(conn)
    tables = await _row_level_security(conn, checked)
    policies = await conn.fetch(
        """
        SELECT tablename, policyname, permissive, roles, cmd, qual, with_check
          FROM pg_policies
         WHERE schemaname = 'public' AND tablename = ANY($1::text[])
         ORDER BY tablename, policyname
        """,
        list(checked),
    )
    role = await conn.fetchrow(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", app_role
    )

    findings: list[AuditFinding] = []
    if role is None:
        findings.append(AuditFinding(app_role, "role is missing"))
    else:
        if role["rolsuper"]:
            findings.append(AuditFinding(app_role, "is a superuser (bypasses row-level security)"))
        if role["rolbypassrls"]:
            findings.append(AuditFinding(app_role, "has BYPASSRLS"))

    by_table: dict[str, list[Any]] = defaultdict(list)
    for policy in policies:
        by_table[policy["tablename"]].append(policy)
    for table in checked:
        if table not in tables:
            findings.append(AuditFinding(table, "table is missing"))
            continue
        enabled, forced = tables[table]
        if not enabled:
            findings.append(AuditFinding(table, "row-level security is not enabled"))
        if not forced:
            findings.append(AuditFinding(table, "row-level security is not forced"))
        findings.extend(_policy_findings(table, by_table.get(table, []), app_role))

    if findings:
        detail = f"{plural(len(findings), 'problem')} with tables, policies or roles"
    else:
        # Not the role's name: it carries the database's, and this line is shown
        # (and snapshot-tested) in the inspector.
        detail = f"{len(checked)} tables forced and scoped; the app login can't bypass"
    return AuditCheck(
        CHECK_RLS, not findings, detail, tuple(findings[:MAX_FINDINGS]), len(findings)
    )


def _policy_findings(table: str, policies: list[Any], app_role: str) -> list[AuditFinding]:
    scope_name = f"{table}_user_scope"
    scope = next((p for p in policies if p["policyname"] == scope_name), None)
    findings: list[AuditFinding] = []
    if scope is None:
        findings.append(AuditFinding(table, f"policy {scope_name} is missing"))
    elif not (
        scope["cmd"] == "ALL"
        and list(scope["roles"]) == ["public"]
        and _SCOPE_SETTING in (scope["qual"] or "")
        and _SCOPE_SETTING in (scope["with_check"] or "")
    ):
        findings.append(
            AuditFinding(table, f"policy {scope_name} no longer scopes every command by user")
        )
    # Permissive policies are OR-ed together: any other one that applies to the
    # runtime role widens what a user's scope can see or write.
    for policy in policies:
        if policy["policyname"] == scope_name or policy["permissive"] != "PERMISSIVE":
            continue
        if {"public", app_role} & set(policy["roles"]):
            findings.append(
                AuditFinding(
                    table, f"policy {policy['policyname']} lets {app_role} past the user scope"
                )
            )
    return findings


# -- check 4: failed jobs, newest user first ----------------------------------


async def _check_failed_jobs(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    """One finding per user with failed jobs (newest first): the newest error, raw."""
    rows = await conn.fetch(
        f"""
        SELECT user_id, count(*) AS failed,
               (array_agg(last_error ORDER BY job_id DESC))[1] AS last_error
          FROM memory_jobs
         WHERE status = 'failed' AND {_OF_USERS}
         GROUP BY user_id
         ORDER BY max(job_id) DESC
        """,
        given.users,
    )
    findings = [AuditFinding(row["user_id"], row["last_error"] or "?") for row in rows]
    failed = sum(row["failed"] for row in rows)
    detail = f"{plural(failed, 'failed job')} of {plural(len(rows), 'user')}"
    return AuditCheck(CHECK_FAILED_JOBS, not rows, detail, tuple(findings[:MAX_FINDINGS]), failed)


# -- check 5: no job is stuck ----------------------------------------------------


async def _check_stuck_jobs(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status = 'running'
                                  AND lease_until < clock_timestamp()) AS expired,
               count(*) FILTER (WHERE status = 'pending' AND run_after
                                  < clock_timestamp() - make_interval(mins => $1)) AS overdue,
               max(lease_until) FILTER (WHERE status = 'running') AS longest_lease,
               (SELECT max_lease_seconds FROM memchat_queue_limits) AS max_lease
          FROM memory_jobs WHERE status IN ('pending', 'running')
        """,
        PENDING_OVERDUE_MINUTES,
    )
    assert row is not None  # an aggregate without GROUP BY returns one row
    expired, overdue = row["expired"], row["overdue"]
    if not expired and not overdue:
        return AuditCheck(CHECK_STUCK_JOBS, True, f"none (leases capped at {row['max_lease']:g} s)")
    parts = []
    if expired:
        parts.append(f"{expired} running past their lease")
    if overdue:
        parts.append(f"{overdue} pending for over {PENDING_OVERDUE_MINUTES} min")
    return AuditCheck(CHECK_STUCK_JOBS, False, "; ".join(parts), count=expired + overdue)


# -- checks of an idle engine: every turn and job came out once ----------------

_OF_USERS = "($1::text[] IS NULL OR user_id = ANY($1::text[]))"
"""The ``users`` narrowing of CheckInput, as a WHERE condition on $1."""

_OUTCOMES = ("complete", "failed", "cancelled")

_REPLIES_WITHOUT_JOB = """
    SELECT m.user_id, m.message_id FROM messages m
     WHERE m.role = 'assistant' AND m.status = 'complete'
       AND NOT EXISTS (SELECT 1 FROM memory_jobs j
                        WHERE j.user_id = m.user_id
                          AND j.assistant_message_id = m.message_id)
"""
"""Completed replies no memory job was queued for (each should have one)."""


def _counted(name: str, findings: list[AuditFinding], noun: str, count: int = -1) -> AuditCheck:
    """A check that is ok when it found nothing; ``count`` defaults to the findings."""
    count = len(findings) if count < 0 else count
    detail = plural(count, noun) if count else f"no {noun}"
    return AuditCheck(name, not count, detail, tuple(findings[:MAX_FINDINGS]), count)


async def _check_acknowledged(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    """Every message id the engine handed back is stored, for the user it was handed to."""
    wanted = sorted(
        ((user, int(mid)) for user, ids in given.acknowledged.items() for mid in ids),
        key=lambda w: w[1],
    )
    rows = await conn.fetch(
        "SELECT message_id, user_id FROM messages WHERE message_id = ANY($1::bigint[])",
        [mid for _, mid in wanted],
    )
    owner = {row["message_id"]: row["user_id"] for row in rows}
    findings = [
        AuditFinding(
            user,
            f"message {mid} is not stored"
            if mid not in owner
            else f"message {mid} is stored for {owner[mid]}",
            message_id=mid,
        )
        for user, mid in wanted
        if owner.get(mid) != user
    ]
    return _counted(CHECK_ACKNOWLEDGED, findings, "message")


async def _turns(
    conn: asyncpg.Connection, given: CheckInput
) -> tuple[list[AuditFinding], list[AuditFinding], list[AuditFinding]]:
    """Match each session's replies to its user messages: a reply answers the latest
    unanswered user message before it. Exact for turns taken one after another (a
    crashed turn's message is the one left over); for overlapping turns in one session
    the counts are exact, the pairing may not be. Returns (unanswered, extra, bad)."""
    rows = await conn.fetch(
        f"SELECT session_id, message_id, user_id, role, status, error FROM messages "
        f"WHERE {_OF_USERS} ORDER BY session_id, message_id",
        given.users,
    )
    extras: list[AuditFinding] = []
    bad: list[AuditFinding] = []
    waiting: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for row in rows:
        sid = row["session_id"]
        if row["role"] == "user":
            waiting[sid].append(row)
            continue
        where = f"session {sid}, reply {row['message_id']}"
        if row["status"] not in _OUTCOMES:
            bad.append(AuditFinding(row["user_id"], f"{where} has status {row['status']!r}"))
        elif row["status"] == "failed" and not (row["error"] or "").strip():
            bad.append(AuditFinding(row["user_id"], f"{where} failed without an error"))
        if waiting[sid]:
            waiting[sid].pop()
        else:
            extras.append(
                AuditFinding(row["user_id"], f"session {sid}, message {row['message_id']}")
            )
    left = sorted((r for queue in waiting.values() for r in queue), key=lambda r: r["message_id"])
    unanswered = [
        AuditFinding(
            r["user_id"],
            f"session {r['session_id']}, message {r['message_id']}",
            message_id=r["message_id"],
        )
        for r in left
    ]
    return unanswered, extras, bad


async def _check_unanswered(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return _counted(CHECK_UNANSWERED, (await _turns(conn, given))[0], "user message")


async def _check_extra_replies(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return _counted(CHECK_EXTRA_REPLIES, (await _turns(conn, given))[1], "reply")


async def _check_bad_replies(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return _counted(CHECK_BAD_REPLIES, (await _turns(conn, given))[2], "reply")


async def _listed(
    conn: asyncpg.Connection,
    given: CheckInput,
    name: str,
    query: str,
    noun: str,
    finding: Callable[[Any], AuditFinding],
) -> AuditCheck:
    """A check whose every row (of ``query``, narrowed by $1) is one problem."""
    return _counted(name, [finding(row) for row in await conn.fetch(query, given.users)], noun)


async def _check_open_jobs(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return await _listed(
        conn,
        given,
        CHECK_OPEN_JOBS,
        "SELECT user_id, job_id, status, attempts, last_error FROM memory_jobs "
        f"WHERE status IN ('pending', 'running') AND {_OF_USERS} ORDER BY job_id",
        "open job",
        lambda r: AuditFinding(
            r["user_id"],
            f"job {r['job_id']} is {r['status']} "
            f"(attempts {r['attempts']}, last error {r['last_error']!r})",
        ),
    )


async def _check_silent_failures(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return await _listed(
        conn,
        given,
        CHECK_SILENT_FAILURES,
        "SELECT user_id, job_id FROM memory_jobs WHERE status = 'failed' "
        f"AND coalesce(btrim(last_error), '') = '' AND {_OF_USERS} ORDER BY job_id",
        "job",
        lambda r: AuditFinding(r["user_id"], f"job {r['job_id']}"),
    )


async def _check_replies_without_job(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    return await _listed(
        conn,
        given,
        CHECK_REPLIES_WITHOUT_JOB,
        f"SELECT user_id, message_id FROM ({_REPLIES_WITHOUT_JOB}) r "
        f"WHERE {_OF_USERS} ORDER BY message_id",
        "reply",
        lambda r: AuditFinding(
            r["user_id"], f"reply {r['message_id']}", message_id=r["message_id"]
        ),
    )


async def _check_job_effects(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    """No reply has two jobs, and no job added the same memory twice."""
    per_reply = await conn.fetch(
        f"""
        SELECT user_id, assistant_message_id, array_agg(job_id ORDER BY job_id) AS jobs
          FROM memory_jobs WHERE assistant_message_id IS NOT NULL AND {_OF_USERS}
         GROUP BY user_id, assistant_message_id HAVING count(*) > 1
         ORDER BY assistant_message_id
        """,
        given.users,
    )
    per_job = await conn.fetch(
        f"""
        SELECT user_id, job_id, after, count(*) AS n FROM memory_events
         WHERE op = 'add' AND job_id IS NOT NULL AND {_OF_USERS}
         GROUP BY user_id, job_id, after HAVING count(*) > 1
         ORDER BY job_id
        """,
        given.users,
    )
    findings = [
        AuditFinding(r["user_id"], f"reply {r['assistant_message_id']} has jobs {list(r['jobs'])}")
        for r in per_reply
    ] + [
        AuditFinding(r["user_id"], f"job {r['job_id']} added {r['after']!r} {r['n']} times")
        for r in per_job
    ]
    return _counted(CHECK_JOB_EFFECTS, findings, "effect")


async def _check_duplicate_memories(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    """Memories beyond the first per (user, content_key); one finding per repeated key."""
    rows = await conn.fetch(
        f"SELECT user_id, content_key, count(*) AS n FROM memories WHERE {_OF_USERS} "
        "GROUP BY user_id, content_key HAVING count(*) > 1 ORDER BY user_id, content_key",
        given.users,
    )
    findings = [AuditFinding(r["user_id"], f"{r['content_key']!r} {r['n']} times") for r in rows]
    extra = sum(r["n"] - 1 for r in rows)
    return _counted(CHECK_DUPLICATE_MEMORIES, findings, "duplicate memory", extra)


async def _check_no_scope(conn: asyncpg.Connection, given: CheckInput) -> AuditCheck:
    """A connection of the app login in no user's scope reads no user's rows."""
    counts = await AdminReader(given.db).unscoped_row_counts()
    findings = [
        AuditFinding(table, f"a connection in no user's scope sees {n} rows")
        for table, n in counts.items()
        if n
    ]
    return _counted(CHECK_NO_SCOPE, findings, "table")


CheckFn = Callable[[asyncpg.Connection, CheckInput], Awaitable[AuditCheck]]

CHECKS: dict[str, CheckFn] = {
    CHECK_SOURCES: lambda conn, given: _check_sources(conn),
    CHECK_NAMES: lambda conn, given: _check_names(conn),
    CHECK_RLS: lambda conn, given: _check_rls(conn, given.db.roles.app),
    CHECK_FAILED_JOBS: _check_failed_jobs,
    CHECK_STUCK_JOBS: _check_stuck_jobs,
    CHECK_ACKNOWLEDGED: _check_acknowledged,
    CHECK_UNANSWERED: _check_unanswered,
    CHECK_EXTRA_REPLIES: _check_extra_replies,
    CHECK_BAD_REPLIES: _check_bad_replies,
    CHECK_OPEN_JOBS: _check_open_jobs,
    CHECK_SILENT_FAILURES: _check_silent_failures,
    CHECK_REPLIES_WITHOUT_JOB: _check_replies_without_job,
    CHECK_JOB_EFFECTS: _check_job_effects,
    CHECK_DUPLICATE_MEMORIES: _check_duplicate_memories,
    CHECK_NO_SCOPE: _check_no_scope,
}
"""The catalogue: every cross-user check, by name. Each reads, in the caller's
snapshot, and returns an AuditCheck; the inspector, doctor, audits and
`scenario load` pick theirs."""


async def _own_row_counts(conn: asyncpg.Connection) -> dict[str, dict[str, int]]:
    """user_id -> table -> how many rows of that user the table holds."""
    # Table names come from USER_OWNED_TABLES (a constant), never from input.
    union = " UNION ALL ".join(
        f"SELECT '{t}' AS t, user_id, count(*) AS n FROM {t} GROUP BY user_id"
        for t in USER_OWNED_TABLES
    )
    result: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(USER_OWNED_TABLES, 0))
    for row in await conn.fetch(union):
        result[row["user_id"]][row["t"]] = row["n"]
    return dict(result)


def _verb(count: int, verb: str) -> str:
    return verb + "s" if count == 1 else verb
