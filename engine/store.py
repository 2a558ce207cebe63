"""Users, sessions, messages and memories, always within one user's scope.

Use it as ``async with store.scope(user_id) as s: await s.list_sessions()``.
Everything done through one ``UserScope`` is one transaction, so a turn can
store its reply and enqueue its memory job atomically: in one statement, as
a ``FollowUp`` of the reply's INSERT (``JobQueue.with_reply``: the job
queue's statements live in engine/queue.py). The scope's
transaction is the database's row-level security scope too: an id that
belongs to another user is simply not there.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from engine.config import LimitSettings
from engine.db import Database
from engine.db.database import savepoint
from engine.errors import InvalidInput, NotFound
from engine.models.base import Usage
from engine.records import (
    Memory,
    MemoryEvent,
    Message,
    MessageRole,
    MessageStatus,
    Session,
    User,
)
from engine.redact import scrub
from engine.validation import (
    clean_text,
    clean_title,
    default_title,
    parse_memory_id,
    parse_session_id,
    printable,
    storable,
    validate_user_id,
)

MEMORY_CHANNEL = "memchat_memory"
MESSAGE_CHANNEL = "memchat_messages"
"""Where a trigger (migration 0008) announces every message written or replaced: ids only."""
MAX_TOPICS = 10
MAX_TOPIC_CHARS = 40

_SESSION_COLUMNS = "session_id, user_id, title, created_at, updated_at"
_MESSAGE_COLUMNS = (
    "message_id, session_id, user_id, role, content, status, error, created_at, "
    "prompt_tokens, completion_tokens"
)
_MEMORY_COLUMNS = (
    "memory_id, user_id, content, topics, source_session_id, source_message_id, "
    "created_at, updated_at"
)
# A message and its session's touch, as the CTE ``msg`` ($1 to $9, see
# UserScope._append_args); the caller's statement goes on from there.
_APPEND_MESSAGE = f"""
    WITH touched AS (
        UPDATE sessions
           SET updated_at = clock_timestamp(), title = COALESCE(title, $7)
         WHERE session_id = $1
        RETURNING session_id
    ), msg AS (
        INSERT INTO messages (session_id, user_id, role, content, status, error,
                              prompt_tokens, completion_tokens)
        SELECT session_id, $2, $3, $4, $5, $6, $8, $9 FROM touched
        RETURNING {_MESSAGE_COLUMNS}
    )
"""

_ADDED_COLUMNS = ", ".join("m." + c for c in _MEMORY_COLUMNS.split(", "))

_EVENT_COLUMNS = (
    "event_id, memory_id, user_id, op, before, after, job_id, source_message_id, actor, at"
)


@dataclass(frozen=True, slots=True)
class FollowUp:
    """Work done by the statement that appends a message, over its new row ``msg``.

    ``ctes`` (each starting with a comma) follow the message's CTEs; ``column``
    is an expression the final SELECT evaluates once (it must read the CTEs
    whose effects must happen, e.g. a NOTIFY); ``args`` are numbered from $10.
    """

    ctes: str
    column: str
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Added:
    """What ``add_memory_within`` did: the new memory (None: a duplicate, or
    ``refused`` at the limit) and how many memories the user has now (None:
    not counted, no limit was given)."""

    memory: Memory | None
    count: int | None
    refused: bool = False


class Store:
    def __init__(self, db: Database, limits: LimitSettings | None = None) -> None:
        self.db = db
        self.limits = limits or LimitSettings()

    @asynccontextmanager
    async def scope(self, user_id: str) -> AsyncIterator[UserScope]:
        user_id = validate_user_id(user_id)
        async with self.db.scoped(user_id) as conn:
            yield UserScope(conn, user_id, self.limits)


class UserScope:
    """One user's view of the data, inside one transaction."""

    def __init__(self, conn: asyncpg.Connection, user_id: str, limits: LimitSettings) -> None:
        self.conn = conn
        self.user_id = user_id
        self.limits = limits

    # -- users -------------------------------------------------------------

    async def ensure_user(self, display_name: str | None = None) -> User:
        """Create this user on first use; return it either way."""
        name = display_name or self.user_id
        row = await self.conn.fetchrow(
            """
            WITH created AS (
                INSERT INTO users (user_id, display_name) VALUES ($1, $2)
                ON CONFLICT (user_id) DO NOTHING
                RETURNING user_id, display_name, created_at
            )
            SELECT * FROM created
            UNION ALL
            SELECT user_id, display_name, created_at FROM users WHERE user_id = $1
            LIMIT 1
            """,
            self.user_id,
            storable(name),
        )
        if row is None:
            # Another transaction inserted this user at the same moment: the
            # INSERT waited for it and skipped, but the SELECT above ran on
            # the statement's snapshot, taken before that commit. A new
            # statement takes a new snapshot (READ COMMITTED) and sees it.
            row = await self.conn.fetchrow(
                "SELECT user_id, display_name, created_at FROM users WHERE user_id = $1",
                self.user_id,
            )
        if row is None:
            raise NotFound(f"user {printable(self.user_id)} was deleted while being created")
        return User(**row)

    async def get_user(self) -> User | None:
        """This user, or None before first use."""
        row = await self.conn.fetchrow(
            "SELECT user_id, display_name, created_at FROM users WHERE user_id = $1", self.user_id
        )
        return User(**row) if row is not None else None

    async def delete_user(self) -> bool:
        """Remove this user and everything they own (sessions, messages, memories, jobs)."""
        status = await self.conn.execute("DELETE FROM users WHERE user_id = $1", self.user_id)
        return status != "DELETE 0"

    # -- sessions ----------------------------------------------------------

    async def create_session(self, title: str | None = None) -> Session:
        await self.ensure_user()
        clean = clean_title(title, max_chars=self.limits.max_title_chars) if title else None
        row = await self.conn.fetchrow(
            f"INSERT INTO sessions (user_id, title) VALUES ($1, $2) RETURNING {_SESSION_COLUMNS}",
            self.user_id,
            clean,
        )
        assert row is not None  # INSERT … RETURNING returns the row it inserted
        return Session(**row)

    async def list_sessions(self) -> list[Session]:
        rows = await self.conn.fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = $1 "
            "ORDER BY updated_at DESC, created_at DESC",
            self.user_id,
        )
        return [Session(**row) for row in rows]

    async def get_session(self, session_id: str | uuid.UUID) -> Session:
        sid = parse_session_id(session_id)
        row = await self.conn.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = $1", sid
        )
        if row is None:
            raise self._no_session(sid)
        return Session(**row)

    async def rename_session(self, session_id: str | uuid.UUID, title: str) -> Session:
        sid = parse_session_id(session_id)
        clean = clean_title(title, max_chars=self.limits.max_title_chars)
        row = await self.conn.fetchrow(
            f"UPDATE sessions SET title = $2 WHERE session_id = $1 RETURNING {_SESSION_COLUMNS}",
            sid,
            clean,
        )
        if row is None:
            raise self._no_session(sid)
        return Session(**row)

    async def delete_session(self, session_id: str | uuid.UUID) -> None:
        """Delete a session with its messages; memories stay, without their source."""
        sid = parse_session_id(session_id)
        status = await self.conn.execute("DELETE FROM sessions WHERE session_id = $1", sid)
        if status == "DELETE 0":
            raise self._no_session(sid)

    def _no_session(self, sid: uuid.UUID) -> NotFound:
        return NotFound(f"no session {sid} for user {printable(self.user_id)}")

    # -- messages ----------------------------------------------------------

    async def append_message(
        self,
        session_id: str | uuid.UUID,
        role: MessageRole,
        content: str,
        *,
        status: MessageStatus = "complete",
        error: str | None = None,
        usage: Usage | None = None,
        follow_up: FollowUp | None = None,
    ) -> Message:
        """Append one message; a user's first message becomes the session's title.

        ``follow_up``: more work over the new row, done by the same statement
        (the memory job of a reply: ``JobQueue.with_reply``).
        """
        sid = parse_session_id(session_id)
        args = self._append_args(sid, role, content, status, error, usage)
        extra = follow_up or FollowUp("", "NULL", ())
        query = (
            f"{_APPEND_MESSAGE}{extra.ctes} "
            f"SELECT {_MESSAGE_COLUMNS}, {extra.column} AS follow_up FROM msg"
        )
        row = await self._fetch_appended(sid, query, *args, *extra.args)
        return Message(**{k: v for k, v in row.items() if k != "follow_up"})

    async def append_user_message(
        self, session_id: str | uuid.UUID, content: str, history: int
    ) -> tuple[Message, list[Message]]:
        """Append the user's message and read the ``history`` messages before it, in
        one statement: (the message, the history and the message, oldest first)."""
        sid = parse_session_id(session_id)
        args = self._append_args(sid, "user", content, "complete", None, None)
        # The statement's snapshot is taken before its INSERT: the earlier
        # messages are read as they were, and the new one comes from RETURNING.
        query = f"""
            {_APPEND_MESSAGE}
            SELECT {_MESSAGE_COLUMNS}, 0 AS newest FROM msg
            UNION ALL
            SELECT * FROM (
                SELECT {_MESSAGE_COLUMNS}, 1 AS newest FROM messages
                 WHERE session_id = $1
                 ORDER BY message_id DESC
                 LIMIT $10
            ) earlier
        """
        rows = await self._fetch_all_appended(sid, query, *args, max(history, 0))
        new = [r for r in rows if r["newest"] == 0]
        if not new:
            raise self._no_session(sid)
        messages = [Message(**{k: v for k, v in r.items() if k != "newest"}) for r in rows]
        return Message(**{k: v for k, v in new[0].items() if k != "newest"}), sorted(
            messages, key=lambda m: m.message_id
        )

    def _append_args(
        self,
        sid: uuid.UUID,
        role: MessageRole,
        content: str,
        status: MessageStatus,
        error: str | None,
        usage: Usage | None,
    ) -> tuple[object, ...]:
        """_APPEND_MESSAGE's parameters, $1 to $9."""
        content = storable(content)
        return (
            sid,
            self.user_id,
            role,
            content,
            status,
            stored_error(error),
            default_title(content) if role == "user" else None,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )

    async def _fetch_appended(self, sid: uuid.UUID, query: str, *args: object) -> asyncpg.Record:
        rows = await self._fetch_all_appended(sid, query, *args)
        return rows[0]

    async def _fetch_all_appended(
        self, sid: uuid.UUID, query: str, *args: object
    ) -> list[asyncpg.Record]:
        try:
            rows = await self.conn.fetch(query, *args)
        except asyncpg.ForeignKeyViolationError:
            rows = []
        # No row: the session is not there (deleted, or another user's).
        if not rows:
            raise self._no_session(sid)
        return rows

    async def last_turn(self, session_id: str | uuid.UUID) -> tuple[Message, Message | None]:
        """The session's last user message and its reply (None when unanswered).

        What regenerating answers again; InvalidInput when nobody wrote yet.
        """
        sid = parse_session_id(session_id)
        rows = await self.conn.fetch(
            f"""
            WITH last_user AS (
                SELECT message_id FROM messages
                 WHERE session_id = $1 AND role = 'user'
                 ORDER BY message_id DESC LIMIT 1
            )
            SELECT {_MESSAGE_COLUMNS} FROM messages
             WHERE session_id = $1 AND message_id >= (SELECT message_id FROM last_user)
             ORDER BY message_id LIMIT 2
            """,
            sid,
        )
        if not rows:
            await self.get_session(sid)  # NotFound for a session that is not there
            raise InvalidInput("nothing to regenerate: this session has no message yet")
        user_message = Message(**rows[0])
        reply = Message(**rows[1]) if len(rows) > 1 else None
        return user_message, reply

    async def replace_reply(
        self,
        user_message: Message,
        content: str,
        *,
        status: MessageStatus = "complete",
        error: str | None = None,
        usage: Usage | None = None,
        follow_up: FollowUp | None = None,
    ) -> Message:
        """Store a new reply to ``user_message`` in place of the one(s) it had.

        The old reply is deleted and the new one appended in this transaction,
        so the session shows one reply at every moment (and a crash leaves the
        old one). Only the last turn can be answered again: a user message
        written after it (another process) refuses the change.
        """
        sid = user_message.session_id
        # The session's row lock: appends (which update that row) wait for
        # this transaction, so nothing lands between the check and the insert.
        locked = await self.conn.fetchval(
            "SELECT true FROM sessions WHERE session_id = $1 FOR UPDATE", sid
        )
        if locked is None:
            raise self._no_session(sid)
        moved_on = await self.conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE session_id = $1 AND role = 'user' "
            "AND message_id > $2)",
            sid,
            user_message.message_id,
        )
        if moved_on:
            raise InvalidInput(
                "a newer message was written in this session meanwhile: "
                "only the last reply can be regenerated"
            )
        # Every reply after the session's last user message answers it.
        await self.conn.execute(
            "DELETE FROM messages WHERE session_id = $1 AND role = 'assistant' AND message_id > $2",
            sid,
            user_message.message_id,
        )
        return await self.append_message(
            sid, "assistant", content, status=status, error=error, usage=usage, follow_up=follow_up
        )

    async def last_messages(self, session_id: str | uuid.UUID, limit: int) -> list[Message]:
        """The last ``limit`` messages of a session, oldest first."""
        sid = parse_session_id(session_id)
        if limit <= 0:
            return []
        rows = await self.conn.fetch(
            f"""
            SELECT * FROM (
                SELECT {_MESSAGE_COLUMNS} FROM messages
                 WHERE session_id = $1
                 ORDER BY message_id DESC
                 LIMIT $2
            ) recent ORDER BY message_id
            """,
            sid,
            limit,
        )
        return [Message(**row) for row in rows]

    async def messages_before(
        self, session_id: str | uuid.UUID, before_id: int | None, limit: int
    ) -> list[Message]:
        """A page of older messages (for scrolling back), oldest first."""
        sid = parse_session_id(session_id)
        rows = await self.conn.fetch(
            f"""
            SELECT * FROM (
                SELECT {_MESSAGE_COLUMNS} FROM messages
                 WHERE session_id = $1 AND ($2::bigint IS NULL OR message_id < $2)
                 ORDER BY message_id DESC
                 LIMIT $3
            ) page ORDER BY message_id
            """,
            sid,
            before_id,
            limit,
        )
        return [Message(**row) for row in rows]

    async def messages_after(
        self, session_id: str | uuid.UUID, after_id: int, limit: int
    ) -> list[Message]:
        """The next ``limit`` messages after ``after_id``, oldest first."""
        sid = parse_session_id(session_id)
        rows = await self.conn.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 AND message_id > $2 "
            "ORDER BY message_id LIMIT $3",
            sid,
            after_id,
            limit,
        )
        return [Message(**row) for row in rows]

    async def message_counts(self) -> dict[uuid.UUID, int]:
        """Messages per session of this user, in one query (sessions without any are absent)."""
        rows = await self.conn.fetch(
            "SELECT session_id, count(*) AS n FROM messages WHERE user_id = $1 GROUP BY session_id",
            self.user_id,
        )
        return {row["session_id"]: row["n"] for row in rows}

    async def count_messages(self, session_id: str | uuid.UUID) -> int:
        sid = parse_session_id(session_id)
        count: int = await self.conn.fetchval(
            "SELECT count(*) FROM messages WHERE session_id = $1", sid
        )
        return count

    # -- memories ----------------------------------------------------------

    async def list_memories(self) -> list[Memory]:
        rows = await self.conn.fetch(
            f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE user_id = $1 "
            "ORDER BY updated_at DESC, created_at DESC, memory_id",
            self.user_id,
        )
        return [_memory(row) for row in rows]

    async def count_memories(self) -> int:
        count: int = await self.conn.fetchval(
            "SELECT count(*) FROM memories WHERE user_id = $1", self.user_id
        )
        return count

    async def get_memory(self, memory_id: str | uuid.UUID) -> Memory:
        mid = parse_memory_id(memory_id)
        row = await self.conn.fetchrow(
            f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE memory_id = $1", mid
        )
        if row is None:
            raise self._no_memory(mid)
        return _memory(row)

    async def add_memory(
        self,
        content: str,
        topics: Sequence[str] = (),
        *,
        source_session_id: uuid.UUID | None = None,
        source_message_id: int | None = None,
        job_id: int | None = None,
        actor: str = "user",
    ) -> Memory | None:
        """Remember a fact; None when the user already has the same memory."""
        added = await self.add_memory_within(
            content,
            topics,
            None,
            source_session_id=source_session_id,
            source_message_id=source_message_id,
            job_id=job_id,
            actor=actor,
        )
        return added.memory

    async def add_memory_within(
        self,
        content: str,
        topics: Sequence[str],
        limit: int | None,
        *,
        source_session_id: uuid.UUID | None = None,
        source_message_id: int | None = None,
        job_id: int | None = None,
        actor: str = "user",
    ) -> Added:
        """``add_memory``, refused when the user has ``limit`` memories already:
        the count and the add are one statement (a memory job's adds)."""
        content = self._clean_memory(content)
        try:
            # The count, the memory, its audit row and the NOTIFY in one
            # statement (one round trip): this runs once per extracted fact.
            row = await self.conn.fetchrow(
                f"""
                WITH n AS (
                    -- Counted only against a limit (an InitPlan runs when used).
                    SELECT CASE WHEN $9::int IS NOT NULL THEN
                               (SELECT count(*) FROM memories WHERE user_id = $1)
                           END AS before
                ), m AS (
                    INSERT INTO memories
                        (user_id, content, topics, source_session_id, source_message_id)
                    SELECT $1, $2, $3, $4, $5 FROM n WHERE $9::int IS NULL OR n.before < $9
                    ON CONFLICT (user_id, content_key) DO NOTHING
                    RETURNING {_MEMORY_COLUMNS}
                ), ev AS (
                    INSERT INTO memory_events
                        (memory_id, user_id, op, before, after, job_id, source_message_id, actor)
                    SELECT memory_id, user_id, 'add', NULL, content, $6, $5, $7 FROM m
                    RETURNING event_id
                )
                SELECT n.before AS counted, {_ADDED_COLUMNS},
                       CASE WHEN m.memory_id IS NOT NULL THEN
                           pg_notify($8, json_build_object(
                               'user_id', m.user_id, 'memory_id', m.memory_id, 'op', 'add',
                               'event_id', (SELECT event_id FROM ev))::text)::text
                       END AS notified
                  FROM n LEFT JOIN m ON true
                """,
                self.user_id,
                content,
                _clean_topics(topics),
                source_session_id,
                source_message_id,
                job_id,
                actor,
                MEMORY_CHANNEL,
                limit,
            )
        except asyncpg.ForeignKeyViolationError as exc:
            missing = (
                "no such user"
                if exc.constraint_name == "memories_user_id_fkey"
                else "its source session or message is not this user's"
            )
            raise NotFound(
                f"cannot add a memory for user {printable(self.user_id)}: {missing}"
            ) from None
        assert row is not None  # FROM n (one row) LEFT JOIN m
        fields = dict(row)
        counted: int | None = fields.pop("counted")
        if fields["memory_id"] is None:
            full = counted is not None and limit is not None and counted >= limit
            return Added(None, counted, refused=full)
        return Added(_memory(fields), None if counted is None else counted + 1)

    async def update_memory(
        self,
        memory_id: str | uuid.UUID,
        content: str,
        topics: Sequence[str] | None = None,
        *,
        job_id: int | None = None,
        source_message_id: int | None = None,
        actor: str = "user",
    ) -> Memory:
        mid = parse_memory_id(memory_id)
        content = self._clean_memory(content)
        try:
            # A savepoint, so that a duplicate leaves the caller's transaction usable.
            async with savepoint(self.conn):
                row = await self.conn.fetchrow(
                    f"""
                    WITH old AS (
                        SELECT memory_id, content FROM memories WHERE memory_id = $1 FOR UPDATE
                    )
                    UPDATE memories m
                       SET content = $2,
                           topics = COALESCE($3, m.topics),
                           updated_at = clock_timestamp()
                      FROM old
                     WHERE m.memory_id = old.memory_id
                    RETURNING {", ".join("m." + c for c in _MEMORY_COLUMNS.split(", "))},
                              old.content AS before
                    """,
                    mid,
                    content,
                    _clean_topics(topics) if topics is not None else None,
                )
        except asyncpg.UniqueViolationError:
            raise InvalidInput("another memory of this user already says that") from None
        if row is None:
            raise self._no_memory(mid)
        fields = dict(row)
        before = fields.pop("before")
        memory = _memory(fields)
        await self._record(mid, "update", before, content, job_id, source_message_id, actor)
        return memory

    async def delete_memory(
        self,
        memory_id: str | uuid.UUID,
        *,
        job_id: int | None = None,
        source_message_id: int | None = None,
        actor: str = "user",
    ) -> Memory:
        mid = parse_memory_id(memory_id)
        row = await self.conn.fetchrow(
            f"DELETE FROM memories WHERE memory_id = $1 RETURNING {_MEMORY_COLUMNS}", mid
        )
        if row is None:
            raise self._no_memory(mid)
        memory = _memory(row)
        await self._record(mid, "delete", memory.content, None, job_id, source_message_id, actor)
        return memory

    async def memory_events(self, memory_id: str | uuid.UUID | None = None) -> list[MemoryEvent]:
        """The audit trail, oldest first: of one memory, or of all this user's memories."""
        mid = parse_memory_id(memory_id) if memory_id is not None else None
        rows = await self.conn.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM memory_events "
            "WHERE user_id = $1 AND ($2::uuid IS NULL OR memory_id = $2) ORDER BY event_id",
            self.user_id,
            mid,
        )
        return [MemoryEvent(**row) for row in rows]

    async def get_messages(self, message_ids: Sequence[int]) -> dict[int, Message]:
        rows = await self.conn.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ANY($1::bigint[])",
            list(message_ids),
        )
        return {row["message_id"]: Message(**row) for row in rows}

    def _clean_memory(self, content: str) -> str:
        text = clean_text(
            content,
            what="memory",
            max_chars=self.limits.max_memory_chars,
            setting="limits.max_memory_chars",
        )
        # A memory is one line: newlines and tabs inside it are just spacing.
        return " ".join(text.split())

    def _no_memory(self, mid: uuid.UUID) -> NotFound:
        return NotFound(f"no memory {mid} for user {printable(self.user_id)}")

    async def _record(
        self,
        memory_id: uuid.UUID,
        op: str,
        before: str | None,
        after: str | None,
        job_id: int | None,
        source_message_id: int | None,
        actor: str,
    ) -> None:
        """Audit the change and tell listeners (delivered when the transaction commits)."""
        await self.conn.execute(
            """
            WITH ev AS (
                INSERT INTO memory_events
                    (memory_id, user_id, op, before, after, job_id, source_message_id, actor)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                RETURNING event_id
            )
            SELECT pg_notify($9, json_build_object(
                'user_id', $2::text, 'memory_id', $1::uuid, 'op', $3::text,
                'event_id', (SELECT event_id FROM ev))::text)
            """,
            memory_id,
            self.user_id,
            op,
            before,
            after,
            job_id,
            source_message_id,
            actor,
            MEMORY_CHANNEL,
        )


def stored_error(error: str | None) -> str | None:
    """Error text as a row may keep it: printable, bounded, without configured secrets."""
    # Error text comes from model servers, which may echo the API key (with
    # or without its sk- prefix): the configured secrets never reach a row.
    return storable(scrub(error)) if error is not None else None


def _memory(row: Any) -> Memory:
    fields = dict(row)
    fields.pop("notified", None)
    fields["topics"] = tuple(fields["topics"] or ())
    return Memory(**fields)


def _clean_topics(topics: Sequence[str]) -> list[str]:
    cleaned: list[str] = []
    for topic in topics:
        if not isinstance(topic, str):
            continue
        # Cut before cleaning: a model may send a huge topic (or 60,000 of them).
        text = " ".join(storable(topic[: MAX_TOPIC_CHARS * 4]).split())[:MAX_TOPIC_CHARS].lower()
        if text and text not in cleaned:
            cleaned.append(text)
            if len(cleaned) == MAX_TOPICS:
                break
    return cleaned
