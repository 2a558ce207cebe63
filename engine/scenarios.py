"""Scripted multi-user runs: the seed conversation and a load generator.

``seed`` is the well-known agent-framework example's exact script: three users
run at once (``asyncio.gather``), each user's turns in order. Its users are
its own (``seed-N@example.com``, never the app's default ``user_N``), created
with the display name :data:`SEED_MARK`; it resets them first, so repeated
runs give the same result, and refuses to touch an id of that name that it
did not create (a person's data). Session names are the sessions' titles.

``load`` runs N users x S sessions x T turns concurrently, waits for every
memory job, then audits the result through the admin path: every user's
memories must mention only that user's unique token.

Both report what went wrong, not just what came out: failed turns with their
errors, and memory jobs that failed or were still open after the wait.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.admin import (
    CHECK_DUPLICATE_MEMORIES,
    CHECK_FAILED_JOBS,
    CHECK_OPEN_JOBS,
    CHECK_REPLIES_WITHOUT_JOB,
    AdminReader,
)
from engine.agent import TurnCompleted, TurnEnd, TurnFailed
from engine.errors import InvalidInput
from engine.queue import JobQueue
from engine.records import MemoryJob
from engine.runtime import Runtime
from engine.store import Store

ERRORS_SHOWN = 5
"""Distinct error texts a load reports (the most frequent), with their counts."""

SEED_SCRIPT: dict[str, list[tuple[str, str]]] = {
    "seed-1@example.com": [
        ("user_1_session_1", "My name is Mark Gonzales and I like anime and video games."),
        ("user_1_session_1", "I also enjoy reading manga and playing video games."),
        ("user_1_session_2", "I'm going to the movies tonight."),
        ("user_1_session_1", "What do you suggest I do this weekend?"),
    ],
    "seed-2@example.com": [
        ("user_2_session_1", "Hi my name is John Doe."),
        ("user_2_session_1", "I'm planning to hike this weekend."),
    ],
    "seed-3@example.com": [
        ("user_3_session_1", "Hi my name is Jane Smith."),
        ("user_3_session_1", "I'm going to the gym tomorrow."),
    ],
}


@dataclass(frozen=True, slots=True)
class FailedTurn:
    user_id: str
    session: str
    """The session's name in the script."""
    text: str
    error: str


@dataclass(frozen=True, slots=True)
class JobReport:
    """A memory job worth a look: failed, still open after the wait, or done with a note."""

    job_id: int
    user_id: str
    status: str
    attempts: int
    error: str | None
    note: str | None

    @classmethod
    def of(cls, job: MemoryJob) -> JobReport:
        return cls(job.job_id, job.user_id, job.status, job.attempts, job.last_error, job.note)


@dataclass(slots=True)
class SeedResult:
    memories: dict[str, list[str]]
    runs: int
    wall_s: float
    turn_failures: list[FailedTurn] = field(default_factory=list)
    unsettled_jobs: list[JobReport] = field(default_factory=list)
    """Jobs failed, or still pending or running when the wait ended."""
    job_notes: list[JobReport] = field(default_factory=list)
    """Jobs done with something to say (refused changes, an unusable answer)."""

    @property
    def failed_turns(self) -> int:
        return len(self.turn_failures)

    @property
    def ok(self) -> bool:
        return not self.turn_failures and not self.unsettled_jobs

    def problem(self) -> str | None:
        """One line saying what went wrong, or None when every turn and job succeeded."""
        statuses = Counter(job.status for job in self.unsettled_jobs)
        return problem_line(
            self.failed_turns,
            self.runs,
            statuses["failed"],
            statuses["pending"] + statuses["running"],
        )

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "users": self.memories,
            "runs": self.runs,
            "wall_s": round(self.wall_s, 3),
            "failed_turns": self.turn_failures,
            "unsettled_jobs": self.unsettled_jobs,
            "job_notes": self.job_notes,
        }


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def problem_line(failed_turns: int, runs: int, failed_jobs: int, open_jobs: int) -> str | None:
    """``7 of 8 turns failed; 1 memory job failed``, or None when nothing went wrong."""
    parts = []
    if failed_turns:
        parts.append(f"{failed_turns} of {runs} turns failed")
    if failed_jobs:
        parts.append(_count(failed_jobs, "memory job failed", "memory jobs failed"))
    if open_jobs:
        still = "still pending or running"
        parts.append(_count(open_jobs, f"memory job {still}", f"memory jobs {still}"))
    return "; ".join(parts) or None


async def reset_users(store: Store, user_ids: Sequence[str]) -> None:
    """Delete these users and everything of theirs (a scenario's clean start)."""
    for user_id in user_ids:
        async with store.scope(user_id) as s:
            await s.delete_user()


SEED_MARK = "memchat seed scenario"
"""Display name of the users the seed scenario creates: only those it resets."""


async def reset_seed_users(store: Store, user_ids: Sequence[str]) -> None:
    """Start the seed's users afresh; refuse, changing nothing, if one is a person's.

    All are checked before any is deleted, so a refusal deletes nothing.
    """
    for user_id in user_ids:
        async with store.scope(user_id) as s:
            user = await s.get_user()
        if user is not None and user.display_name != SEED_MARK:
            raise InvalidInput(
                f"{user_id} exists and was not created by the seed scenario, so the scenario "
                "will not delete it; rename or delete that user yourself"
            )
    for user_id in user_ids:
        async with store.scope(user_id) as s:
            await s.delete_user()
            await s.ensure_user(SEED_MARK)


async def run_seed(runtime: Runtime, *, wait_within: float = 120.0) -> SeedResult:
    users = list(SEED_SCRIPT)
    await reset_seed_users(runtime.store, users)
    started = time.perf_counter()
    failures = await asyncio.gather(*(_seed_user(runtime, u, SEED_SCRIPT[u]) for u in users))
    await runtime.dispatcher.wait_idle(users, within=wait_within)
    wall = time.perf_counter() - started
    runs = sum(len(turns) for turns in SEED_SCRIPT.values())
    result = SeedResult({}, runs, wall, [f for user in failures for f in user])
    for user_id in users:
        async with runtime.store.scope(user_id) as s:
            # Oldest first reads like the conversation did.
            result.memories[user_id] = [m.content for m in reversed(await s.list_memories())]
            jobs = sorted(await JobQueue.list_jobs(s), key=lambda job: job.job_id)
        result.unsettled_jobs += [JobReport.of(j) for j in jobs if j.status != "done"]
        result.job_notes += [JobReport.of(j) for j in jobs if j.status == "done" and j.note]
    return result


async def _seed_user(
    runtime: Runtime, user_id: str, turns: list[tuple[str, str]]
) -> list[FailedTurn]:
    sessions: dict[str, str] = {}
    failed: list[FailedTurn] = []
    for session_name, text in turns:
        if session_name not in sessions:
            async with runtime.store.scope(user_id) as s:
                sessions[session_name] = str((await s.create_session(session_name)).session_id)
        end = await runtime.agent.run(user_id, sessions[session_name], text)
        if not isinstance(end, TurnCompleted):
            failed.append(FailedTurn(user_id, session_name, text, turn_error(end)))
    return failed


def turn_error(end: TurnEnd) -> str:
    return end.error if isinstance(end, TurnFailed) else end.reply.status


@dataclass(slots=True)
class LoadResult:
    users: int
    runs: int
    wall_s: float = 0.0
    """From the first turn until every memory job was done (or the wait gave up)."""
    memories: int = 0
    leaks: int = 0
    lost: int = 0
    duplicates: int = 0
    failed_jobs: int = 0
    """The five audit figures: 0 when the run was not audited."""
    failed_turns: int = 0
    open_jobs: int = 0
    """Jobs still pending or running after the wait (part of ``lost``)."""
    audited: bool = False
    jobs_idle: bool = False
    """Whether every memory job was done within the wait."""
    turn_errors: Counter[str] = field(default_factory=Counter)
    """Error text -> failed turns with it."""
    job_errors: dict[str, int] = field(default_factory=dict)
    """Error text -> failed jobs with it (the ERRORS_SHOWN most frequent; audited runs)."""
    turn_latencies: list[float] = field(default_factory=list, repr=False)
    completed_at: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Per user, when each completed turn ended (perf_counter), in order."""

    def as_json(self) -> dict[str, object]:
        return {
            "users": self.users,
            "runs": self.runs,
            "wall_s": round(self.wall_s, 3),
            "runs_per_s": round(self.runs / self.wall_s, 1) if self.wall_s else None,
            "memories": self.memories,
            "leaks": self.leaks,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "failed_jobs": self.failed_jobs,
            "failed_turns": self.failed_turns,
            "open_jobs": self.open_jobs,
            "turn_errors": dict(self.turn_errors.most_common(ERRORS_SHOWN)),
            "job_errors": self.job_errors,
        }

    @property
    def ok(self) -> bool:
        return not self.problem()

    def problem(self) -> str | None:
        """One line saying what went wrong, or None when the load was clean."""
        replies_without_job = self.lost - self.open_jobs - self.failed_jobs
        parts = [
            problem_line(self.failed_turns, self.runs, self.failed_jobs, self.open_jobs),
            *(
                _count(n, one, many)
                for n, one, many in (
                    (self.leaks, "memory names another user", "memories name another user"),
                    # ``lost`` counts open and failed jobs too, said above.
                    (replies_without_job, "reply has no memory job", "replies have no memory job"),
                    (self.duplicates, "duplicate memory", "duplicate memories"),
                )
                if n > 0
            ),
        ]
        if not self.jobs_idle and not self.open_jobs:
            parts.append("the wait for memory jobs ran out")
        return "; ".join(p for p in parts if p) or None


def load_user_id(i: int) -> str:
    return f"load_{i}@example.com"


def load_user_ids(users: int, offset: int = 0) -> list[str]:
    return [load_user_id(i) for i in range(offset + 1, offset + users + 1)]


def load_message(i: int, session: int, turn: int) -> str:
    if session == 0 and turn == 0:
        return f"My name is LoadUser{i} and my favourite number is {7 * i}."
    return f"LoadUser{i} here again, session {session + 1}, turn {turn + 1}. I like tea number {i}."


_TOKEN = re.compile(r"LoadUser(\d+)\b")


async def create_load_sessions(
    runtime: Runtime, user_ids: list[str], sessions: int
) -> dict[str, list[str]]:
    """Each user's sessions, made ahead (e.g. before a benchmark's clock starts)."""
    made: dict[str, list[str]] = {}

    async def make(user_id: str) -> None:
        async with runtime.store.scope(user_id) as s:
            made[user_id] = [
                str((await s.create_session(f"load session {n + 1}")).session_id)
                for n in range(sessions)
            ]

    await asyncio.gather(*(make(u) for u in user_ids))
    return made


async def run_load(
    runtime: Runtime,
    users: int,
    sessions: int,
    turns: int,
    *,
    wait_within: float = 600.0,
    offset: int = 0,
    session_ids: dict[str, list[str]] | None = None,
    audit: bool = True,
) -> LoadResult:
    """N users at once, each user's turns in order, then every memory job.

    Without ``session_ids`` the users are reset first and their sessions made
    as they go; with them (from :func:`create_load_sessions`), those sessions
    are used as they are, history and all.
    """
    ids = load_user_ids(users, offset)
    if session_ids is None:
        await reset_users(runtime.store, ids)
    result = LoadResult(users=users, runs=users * sessions * turns)
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _load_user(runtime, offset + n + 1, sessions, turns, result, session_ids)
            for n in range(users)
        )
    )
    result.jobs_idle = await runtime.dispatcher.wait_idle(ids, within=wait_within)
    result.wall_s = time.perf_counter() - started
    if audit:
        await audit_into(result, runtime, ids)
    return result


async def audit_into(result: LoadResult, runtime: Runtime, user_ids: list[str]) -> None:
    """The load audit's figures (and failed jobs' errors) written onto ``result``."""
    for name, value in (await audit_load(runtime, user_ids)).items():
        setattr(result, name, value)
    if result.failed_jobs:
        result.job_errors = await failed_job_errors(runtime, user_ids)
    result.audited = True


async def _load_user(
    runtime: Runtime,
    i: int,
    sessions: int,
    turns: int,
    result: LoadResult,
    session_ids: dict[str, list[str]] | None,
) -> None:
    user_id = load_user_id(i)
    completed = result.completed_at.setdefault(user_id, [])
    for session in range(sessions):
        if session_ids is not None:
            sid: str | uuid.UUID = session_ids[user_id][session]
        else:
            async with runtime.store.scope(user_id) as s:
                sid = (await s.create_session(f"load session {session + 1}")).session_id
        for turn in range(turns):
            began = time.perf_counter()
            end = await runtime.agent.run(user_id, sid, load_message(i, session, turn))
            ended = time.perf_counter()
            result.turn_latencies.append(ended - began)
            if isinstance(end, TurnCompleted):
                completed.append(ended)
            else:
                result.failed_turns += 1
                result.turn_errors[turn_error(end)] += 1


LOAD_CHECKS = (
    CHECK_FAILED_JOBS,
    CHECK_OPEN_JOBS,
    CHECK_REPLIES_WITHOUT_JOB,
    CHECK_DUPLICATE_MEMORIES,
)
"""What a load audit picks from admin's catalogue, for its own users only."""


async def audit_load(runtime: Runtime, user_ids: list[str]) -> dict[str, int]:
    """Leaks, lost jobs, duplicates and failures for these users (admin path, read-only)."""
    reader = AdminReader(runtime.db)
    checks = await reader.run_checks(*LOAD_CHECKS, users=user_ids)
    failed, open_jobs, without_job, duplicates = (check.count for check in checks.checks)
    memories = await reader.memories_of(user_ids)
    own_token = {uid: uid.split("@")[0].removeprefix("load_") for uid in user_ids}
    leaks = sum(
        1
        for user_id, content in memories
        if set(_TOKEN.findall(content)) - {own_token.get(user_id, "")}
    )
    return {
        "memories": len(memories),
        "leaks": leaks,
        # Every job not done, and every reply that never got one.
        "lost": failed + open_jobs + without_job,
        "duplicates": duplicates,
        "failed_jobs": failed,
        "open_jobs": open_jobs,
    }


async def failed_job_errors(runtime: Runtime, user_ids: list[str]) -> dict[str, int]:
    """The most frequent errors of these users' failed jobs, with their counts."""
    return await AdminReader(runtime.db).failed_job_errors(user_ids, ERRORS_SHOWN)
