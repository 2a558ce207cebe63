"""One reusable audit of the engine's invariants, for tests, chaos runs and operators.

``audit_invariants(db)`` reads the whole database through engine/admin.py
(``AdminReader.invariant_rows``: one read-only snapshot as the admin login;
the row-level security check from admin's catalogue) and, for the isolation
check, through a few users' own scopes (``Database.scoped``, SELECT only). It
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
from collections import defaultdict, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.admin import CHECK_RLS, USER_OWNED_TABLES, AdminReader
from engine.db import Database

MAX_EXAMPLES = 10
"""Examples listed per check; the counts are always complete."""

DEFAULT_SCOPE_SAMPLE = 20

_OUTCOMES = ("complete", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class InvariantReport:
    # What was looked at.
    users: int
    messages: int
    jobs: int
    memories: int
    acknowledged_checked: int
    users_sampled: int
    # Problems per check (0 everywhere when ok).
    unstored_acknowledged: int
    """Check 1: acknowledged message ids that are not stored (for that user)."""
    turns_without_outcome: int
    """Check 2: user messages no assistant message answers."""
    extra_replies: int
    """Check 2: assistant messages that answer no user message."""
    bad_replies: int
    """Check 2: replies with an unknown status, or failed without an error."""
    open_jobs: int
    """Check 3: jobs still pending or running."""
    failed_jobs_without_error: int
    """Check 3: jobs failed with no error recorded."""
    replies_without_job: int
    """Check 3: completed replies with no memory job."""
    duplicate_job_effects: int
    """Check 3: a job that added the same memory twice, or two jobs for one reply."""
    scope_leaks: int
    """Check 4: (user, table) pairs whose scope shows others' rows or hides own rows,
    plus tables a connection in no scope can read rows of."""
    duplicate_memories: int
    """Check 5: memories beyond the first per (user, content_key)."""
    rls_problems: int
    """Check 6: tables without enabled + forced RLS, app role that can bypass it."""
    orphaned_turns: tuple[tuple[str, int], ...] = ()
    """(user_id, message_id) of every turn without an outcome, oldest first."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def assert_ok(self) -> None:
        if self.problems:
            raise AssertionError(
                "invariants violated:\n" + "\n".join(f"  - {p}" for p in self.problems)
            )

    def summary(self) -> str:
        return (
            f"{self.users} users, {self.messages} messages, {self.jobs} jobs, "
            f"{self.memories} memories: " + ("ok" if self.ok else f"{len(self.problems)} problems")
        )


class _Problems:
    """Problem lines, at most MAX_EXAMPLES per check plus a '... and N more' line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, check: str, examples: list[str]) -> int:
        if not examples:
            return 0
        self.lines.extend(f"{check}: {e}" for e in examples[:MAX_EXAMPLES])
        if len(examples) > MAX_EXAMPLES:
            self.lines.append(f"{check}: ... and {len(examples) - MAX_EXAMPLES} more")
        return len(examples)


async def audit_invariants(
    db: Database,
    *,
    acknowledged: Mapping[str, Collection[int]] | None = None,
    scope_sample: int = DEFAULT_SCOPE_SAMPLE,
    seed: int = 0,
) -> InvariantReport:
    """Check the invariants above; see the module docstring. Read-only."""
    acknowledged = acknowledged or {}
    problems = _Problems()
    reader = AdminReader(db)
    # One snapshot for every cross-user read (engine/admin.py).
    rows = await reader.invariant_rows([int(m) for ids in acknowledged.values() for m in ids])
    counts = rows["counts"]
    unstored = _check_acknowledged(rows["acknowledged"], acknowledged)
    messages = rows["messages"]
    open_jobs = rows["open_jobs"]
    failed_silently = rows["failed_silently"]
    without_job = rows["without_job"]
    twice_per_reply = rows["twice_per_reply"]
    twice_per_job = rows["twice_per_job"]
    duplicates = rows["duplicates"]
    own_rows = rows["own_rows"]

    # 1. acknowledged messages are stored.
    n_unstored = problems.add("acknowledged message not stored", unstored)

    # 2. every turn has exactly one outcome.
    orphans, extras, bad = _match_turns(messages)
    n_orphans = problems.add(
        "turn without an outcome",
        [f"user {u}, session {s}, message {m}" for u, s, m in orphans],
    )
    n_extras = problems.add(
        "extra reply (answers no user message)",
        [f"user {u}, session {s}, message {m}" for u, s, m in extras],
    )
    n_bad = problems.add("bad reply", bad)

    # 3. jobs settled, each effect once.
    n_open = problems.add(
        "memory job not settled",
        [
            f"user {r['user_id']}, job {r['job_id']} is {r['status']} "
            f"(attempts {r['attempts']}, last error {r['last_error']!r})"
            for r in open_jobs
        ],
    )
    n_silent = problems.add(
        "memory job failed without an error",
        [f"user {r['user_id']}, job {r['job_id']}" for r in failed_silently],
    )
    n_without_job = problems.add(
        "completed reply without a memory job",
        [f"user {r['user_id']}, reply {r['message_id']}" for r in without_job],
    )
    n_twice = problems.add(
        "job effect applied twice",
        [
            f"user {r['user_id']}, reply {r['assistant_message_id']} has jobs {list(r['jobs'])}"
            for r in twice_per_reply
        ]
        + [
            f"user {r['user_id']}, job {r['job_id']} added {r['after']!r} {r['n']} times"
            for r in twice_per_job
        ],
    )

    # 4. isolation, seen from inside the scopes.
    user_ids = sorted(own_rows)
    sampled = (
        user_ids
        if len(user_ids) <= scope_sample
        else sorted(random.Random(seed).sample(user_ids, scope_sample))
    )
    leaks = [line for u in sampled for line in await _scope_findings(db, u, own_rows[u])]
    leaks += [
        f"a connection in no user's scope sees {n} {table} rows"
        for table, n in (await reader.unscoped_row_counts()).items()
        if n
    ]
    n_leaks = problems.add("isolation", leaks)

    # 5. duplicate memories.
    problems.add(
        "duplicate memory",
        [f"user {r['user_id']}: {r['content_key']!r} {r['n']} times" for r in duplicates],
    )
    n_dupes = sum(r["n"] - 1 for r in duplicates)

    # 6. row-level security: the catalogue's check (tables, policies, the app login).
    (rls,) = (await reader.run_checks(CHECK_RLS)).checks
    n_rls = problems.add("row-level security", [str(f) for f in rls.findings])

    return InvariantReport(
        users=counts["users"],
        messages=counts["messages"],
        jobs=counts["jobs"],
        memories=counts["memories"],
        acknowledged_checked=sum(len(ids) for ids in acknowledged.values()),
        users_sampled=len(sampled),
        unstored_acknowledged=n_unstored,
        turns_without_outcome=n_orphans,
        extra_replies=n_extras,
        bad_replies=n_bad,
        open_jobs=n_open,
        failed_jobs_without_error=n_silent,
        replies_without_job=n_without_job,
        duplicate_job_effects=n_twice,
        scope_leaks=n_leaks,
        duplicate_memories=n_dupes,
        rls_problems=n_rls,
        orphaned_turns=tuple((u, m) for u, _, m in orphans),
        problems=problems.lines,
    )


def _check_acknowledged(rows: list[Any], acknowledged: Mapping[str, Collection[int]]) -> list[str]:
    wanted = [(user, int(mid)) for user, ids in acknowledged.items() for mid in ids]
    owner = {r["message_id"]: r["user_id"] for r in rows}
    missing = []
    for user, mid in sorted(wanted, key=lambda w: w[1]):
        if mid not in owner:
            missing.append(f"user {user}, message {mid} is not stored")
        elif owner[mid] != user:
            missing.append(f"user {user}, message {mid} is stored for {owner[mid]}")
    return missing


def _match_turns(
    rows: list[Any],
) -> tuple[list[tuple[str, Any, int]], list[tuple[str, Any, int]], list[str]]:
    """Match each session's replies to its user messages: a reply answers the latest
    unanswered user message before it. Exact for turns taken one after another (a
    crashed turn's message is the one left over); for overlapping turns in one session
    the counts are exact, the pairing may not be."""
    orphans: list[tuple[str, Any, int]] = []
    extras: list[tuple[str, Any, int]] = []
    bad: list[str] = []
    waiting: dict[Any, deque[Any]] = defaultdict(deque)
    for row in rows:
        sid = row["session_id"]
        if row["role"] == "user":
            waiting[sid].append(row)
            continue
        where = f"user {row['user_id']}, session {sid}, reply {row['message_id']}"
        if row["status"] not in _OUTCOMES:
            bad.append(f"{where} has status {row['status']!r}")
        elif row["status"] == "failed" and not (row["error"] or "").strip():
            bad.append(f"{where} failed without an error")
        if waiting[sid]:
            waiting[sid].pop()
        else:
            extras.append((row["user_id"], sid, row["message_id"]))
    for queue in waiting.values():
        orphans.extend((r["user_id"], r["session_id"], r["message_id"]) for r in queue)
    orphans.sort(key=lambda o: o[2])
    return orphans, extras, bad


async def _scope_findings(db: Database, user_id: str, own: Mapping[str, int]) -> list[str]:
    findings = []
    async with db.scoped(user_id) as conn:
        for table in USER_OWNED_TABLES:
            rows = await conn.fetch(f"SELECT user_id, count(*) AS n FROM {table} GROUP BY user_id")
            seen = {r["user_id"]: r["n"] for r in rows}
            others = sorted(set(seen) - {user_id})
            if others:
                findings.append(f"{user_id}'s scope sees {table} rows of {others[:5]}")
            if seen.get(user_id, 0) != own.get(table, 0):
                findings.append(
                    f"{user_id}'s scope sees {seen.get(user_id, 0)} of its "
                    f"{own.get(table, 0)} {table} rows"
                )
    return findings
