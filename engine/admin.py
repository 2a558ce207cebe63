"""Cross-user, read-only views: the one explicit way around per-user scoping.

Used by the inspector, audits and `memchat users`. Everything here runs in
``Database.admin()``, a read-only transaction as the ``memchat_admin`` role,
which the database allows to SELECT and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.db import Database


@dataclass(frozen=True, slots=True)
class UserSummary:
    user_id: str
    display_name: str
    created_at: datetime
    sessions: int
    messages: int
    memories: int


class AdminReader:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list_users(self) -> list[UserSummary]:
        async with self.db.admin() as conn:
            rows = await conn.fetch(
                """
                SELECT u.user_id, u.display_name, u.created_at,
                       (SELECT count(*) FROM sessions s WHERE s.user_id = u.user_id) AS sessions,
                       (SELECT count(*) FROM messages m WHERE m.user_id = u.user_id) AS messages,
                       (SELECT count(*) FROM memories y WHERE y.user_id = u.user_id) AS memories
                  FROM users u
                 ORDER BY u.user_id
                """
            )
        return [UserSummary(**row) for row in rows]

    async def row_level_security(self) -> dict[str, tuple[bool, bool]]:
        """Per user-owned table: (enabled, forced)."""
        async with self.db.admin() as conn:
            rows = await conn.fetch(
                """
                SELECT relname, relrowsecurity, relforcerowsecurity
                  FROM pg_class
                 WHERE relname = ANY($1::text[]) AND relkind = 'r'
                   AND relnamespace = 'public'::regnamespace
                """,
                list(USER_OWNED_TABLES),
            )
        return {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in rows}


USER_OWNED_TABLES = ("users", "sessions", "messages", "memories", "memory_events", "memory_jobs")
