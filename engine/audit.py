"""One reusable audit of the engine's invariants, for tests, chaos runs and operators.

``audit_invariants(db)`` picks its checks from engine/admin.py's catalogue
(``AdminReader.run_checks``: one read-only snapshot as the admin login) and,
for the isolation check, reads through a few users' own scopes
(``Database.scoped``, SELECT only). It
changes nothing. Run it once the engine is idle (no turn streaming, no memory job
open): a turn still in flight is, by the definitions below, a turn without an
outcome, and an open job is reported as open.

The checks, each with a count of problems and a few examples in ``problems``:

1. acknowledged messages are stored: every message id the engine handed back
   to a caller (``TurnStarted.user_message``, a turn end's ``reply``) exists,
   owned by that user;
2. every turn has exactly one outcome: in each session, every user message is
   answered by one assistant message after it (status complete, failed or
   cancelled; a failed one carries its error text). A reply answers the latest
   unanswered user message before it, so overlapping turns in one session are
   counted right too.
   A user message left unanswered is a *turn without an outcome*: that is what
   a crash (or a lost connection) between storing the user's message and
   storing the reply leaves behind. An assistant message with no question
   before it is an *extra reply* (a turn's outcome stored twice);
3. memory jobs are settled and their effect happened once: no job pending or
   running, every failed job has its error, every completed reply has exactly
   one job, and no job added the same memory twice;
4. no row of one user is reachable in another's scope: for a sample of users,
   each user-owned table seen in that user's scope holds that user's rows
   only, and all of them; a connection in no scope sees no rows at all;
5. no duplicate memories per user (by ``content_key``);
6. row-level security is enabled and forced on every user-owned table, each
   scoped by its policy, and the app login is neither a superuser nor
   BYPASSRLS (admin's ``CHECK_RLS``, the one the inspector and doctor run).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from engine.admin import (
    CHECK_ACKNOWLEDGED,
    CHECK_BAD_REPLIES,
    CHECK_DUPLICATE_MEMORIES,
    CHECK_EXTRA_REPLIES,
    CHECK_JOB_EFFECTS,
    CHECK_NO_SCOPE,
    CHECK_OPEN_JOBS,
    CHECK_REPLIES_WITHOUT_JOB,
    CHECK_RLS,
    CHECK_SILENT_FAILURES,
    CHECK_UNANSWERED,
    USER_OWNED_TABLES,
    AdminReader,
    AuditCheck,
    AuditFinding,
)
from engine.db import Database

MAX_EXAMPLES = 10
"""Examples listed per check; the counts are always complete."""

DEFAULT_SCOPE_SAMPLE = 20

CHECK_SCOPES = "isolation"
"""Check 4, from inside a sample of users' scopes (not a cross-user read)."""

INVARIANT_CHECKS = (
    CHECK_ACKNOWLEDGED,
    CHECK_UNANSWERED,
    CHECK_EXTRA_REPLIES,
    CHECK_BAD_REPLIES,
    CHECK_OPEN_JOBS,
    CHECK_SILENT_FAILURES,
    CHECK_REPLIES_WITHOUT_JOB,
    CHECK_JOB_EFFECTS,
    CHECK_NO_SCOPE,
    CHECK_DUPLICATE_MEMORIES,
    CHECK_RLS,
)
"""Checks 1-3, 5, 6 and the no-scope half of 4: admin's catalogue, in this order."""


@dataclass(frozen=True, slots=True)
class InvariantReport:
    # What was looked at.
    users: int
    messages: int
    jobs: int
    memories: int
    acknowledged_checked: int
    users_sampled: int
    checks: tuple[AuditCheck, ...]
    """Every check run, with its count of problems and the first findings."""

    def count(self, name: str) -> int:
        """Problems the named check found."""
        return sum(check.count for check in self.checks if check.name == name)

    @property
    def unstored_acknowledged(self) -> int:
        return self.count(CHECK_ACKNOWLEDGED)

    @property
    def turns_without_outcome(self) -> int:
        return self.count(CHECK_UNANSWERED)

    @property
    def orphaned_turns(self) -> tuple[tuple[str, int], ...]:
        """(user_id, message_id) of the turns without an outcome, oldest first (capped)."""
        (check,) = (c for c in self.checks if c.name == CHECK_UNANSWERED)
        return tuple((f.subject, f.message_id) for f in check.findings if f.message_id is not None)

    @property
    def problems(self) -> list[str]:
        """At most MAX_EXAMPLES lines per failed check, then a '... and N more' line."""
        lines: list[str] = []
        for check in self.checks:
            shown = check.findings[:MAX_EXAMPLES]
            lines.extend(f"{check.name}: {finding}" for finding in shown)
            if len(check.findings) > len(shown):
                more = len(check.findings) - len(shown)
                lines.append(f"{check.name}: ... and {more} more ({check.detail} in all)")
        return lines

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError(
                "invariants violated:\n" + "\n".join(f"  - {p}" for p in self.problems)
            )

    def summary(self) -> str:
        failed = sum(not check.ok for check in self.checks)
        return (
            f"{self.users} users, {self.messages} messages, {self.jobs} jobs, "
            f"{self.memories} memories: " + ("ok" if self.ok else f"{failed} checks failed")
        )


async def audit_invariants(
    db: Database,
    *,
    acknowledged: Mapping[str, Collection[int]] | None = None,
    scope_sample: int = DEFAULT_SCOPE_SAMPLE,
    seed: int = 0,
) -> InvariantReport:
    """Check the invariants above; see the module docstring. Read-only."""
    acknowledged = acknowledged or {}
    reader = AdminReader(db)
    totals = await reader.totals()
    result = await reader.run_checks(*INVARIANT_CHECKS, acknowledged=acknowledged)
    own_rows = await reader.own_row_counts()
    user_ids = sorted(own_rows)
    sampled = (
        user_ids
        if len(user_ids) <= scope_sample
        else sorted(random.Random(seed).sample(user_ids, scope_sample))
    )
    leaks = [f for u in sampled for f in await _scope_findings(db, u, own_rows[u])]
    scopes = AuditCheck(CHECK_SCOPES, not leaks, f"{len(sampled)} scopes", tuple(leaks), len(leaks))
    return InvariantReport(
        users=totals["users"],
        messages=totals["messages"],
        jobs=totals["jobs"],
        memories=totals["memories"],
        acknowledged_checked=sum(len(ids) for ids in acknowledged.values()),
        users_sampled=len(sampled),
        checks=(*result.checks, scopes),
    )


async def _scope_findings(db: Database, user_id: str, own: Mapping[str, int]) -> list[AuditFinding]:
    findings = []
    async with db.scoped(user_id) as conn:
        for table in USER_OWNED_TABLES:
            rows = await conn.fetch(f"SELECT user_id, count(*) AS n FROM {table} GROUP BY user_id")
            seen = {r["user_id"]: r["n"] for r in rows}
            others = sorted(set(seen) - {user_id})
            if others:
                findings.append(AuditFinding(user_id, f"scope sees {table} rows of {others[:5]}"))
            if seen.get(user_id, 0) != own.get(table, 0):
                findings.append(
                    AuditFinding(
                        user_id,
                        f"scope sees {seen.get(user_id, 0)} of its "
                        f"{own.get(table, 0)} {table} rows",
                    )
                )
    return findings
