"""The durable memory-job queue: every statement on ``memory_jobs`` is here.

``JobQueue`` is the one place that reads or writes the ``memory_jobs`` table,
in the manner of a job-queue manager (procrastinate's ``JobManager``): the
SQL is kept together below as named queries, and every change of a job's
state notifies ``JOB_CHANNEL``.

Two ways in, as the database's roles allow:

- inside a user's scope (``Store.scope``: the app login, row-level security):
  enqueue a turn's job with its reply, claim that user's head-of-queue job
  (``memchat chat``), settle, release, extend a lease, and read that user's
  jobs. These take the scope, so they join its transaction;
- through ``Database.queue()`` (the worker login, which may only call the
  queue functions): the dispatcher's batch claim across users, requeueing
  expired leases, and the counts across users.

Which job may run is one rule, in one SQL function (``memchat_queue_head``,
migration 0007): a job is claimable when no older job of the same user is
still open, so a user's jobs run one at a time and in order.

Coalescing: the worker that holds a user's head job takes that user's later
due jobs along (``absorb_turns``, in the user's scope, running under the same
worker and lease), extracts from all those turns in one model call, and
settles them in the head's statement: the head ``done``, each absorbed job
``done`` with the note "coalesced into job N". If the head does not end
``done``, the absorbed jobs are given back (``release_absorbed``); if the
worker dies, their leases expire with the head's and all are requeued, so a
turn is neither lost nor applied twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from engine.db import Database
from engine.models.base import Usage
from engine.records import JobCounts, JobStatus, MemoryJob, Message
from engine.store import FollowUp, stored_error
from engine.validation import storable

if TYPE_CHECKING:
    from engine.store import UserScope

JOB_CHANNEL = "memchat_jobs"
"""Where every change of a job's state is announced (``memchat_job_channel()`` in SQL)."""

SidebarJobState = Literal["idle", "running", "failed"]

_JOB_COLUMNS = (
    "job_id, user_id, session_id, user_message_id, assistant_message_id, status, attempts, "
    "run_after, lease_until, worker, last_error, created_at, started_at, finished_at, note, "
    "extraction, prompt_tokens, completion_tokens"
)

# -- named queries: a user's scope (app login, row-level security) -------------

# A turn's job, queued by the statement that stores its reply (store.FollowUp):
# the reply row is ``msg``, $10 the turn's user message, $11 the channel.
ENQUEUE_WITH_REPLY = """
    , job AS (
        INSERT INTO memory_jobs
            (user_id, session_id, user_message_id, assistant_message_id)
        SELECT user_id, session_id, $10, message_id FROM msg
        RETURNING user_id, job_id
    )
"""
ENQUEUED_JOB = """(SELECT job_id FROM job, LATERAL pg_notify($11, json_build_object(
    'user_id', job.user_id, 'job_id', job.job_id, 'state', 'pending')::text) n)"""

CLAIM_HEAD_JOB = f"""
    WITH claimed AS (
        UPDATE memory_jobs
           SET status = 'running', attempts = attempts + 1, worker = $2,
               started_at = clock_timestamp(),
               lease_until = clock_timestamp() + make_interval(secs => $3)
         WHERE job_id = (
                   SELECT j.job_id FROM memory_jobs j
                    WHERE j.user_id = $1 AND j.status = 'pending'
                      AND j.run_after <= clock_timestamp()
                      AND memchat_queue_head(j.user_id, j.job_id)
                    ORDER BY j.job_id LIMIT 1
                      FOR UPDATE SKIP LOCKED)
        RETURNING {_JOB_COLUMNS}
    )
    SELECT claimed.* FROM claimed, LATERAL pg_notify($4, json_build_object(
        'user_id', claimed.user_id, 'job_id', claimed.job_id,
        'state', 'running')::text) notified
"""

SETTLE = """
    UPDATE memory_jobs
       SET status = $3,
           last_error = CASE WHEN $3 = 'done' THEN NULL
                             ELSE COALESCE($4, last_error) END,
           -- A success keeps what earlier attempts ran into as history, not error.
           note = CASE WHEN $3 = 'done' AND last_error IS NOT NULL
                       THEN concat_ws('; ', COALESCE($7, note),
                                      'succeeded after: ' || last_error)
                       ELSE COALESCE($7, note) END,
           extraction = COALESCE($8, extraction),
           prompt_tokens = CASE WHEN $9::int IS NULL THEN prompt_tokens
                                ELSE coalesce(prompt_tokens, 0) + $9 END,
           completion_tokens = CASE WHEN $10::int IS NULL THEN completion_tokens
                                    ELSE coalesce(completion_tokens, 0) + $10 END,
           run_after = CASE WHEN $5::float8 IS NULL THEN run_after
                            ELSE clock_timestamp() + make_interval(secs => $5) END,
           finished_at = CASE WHEN $3 IN ('done', 'failed') THEN clock_timestamp() END,
           lease_until = NULL,
           worker = CASE WHEN $3 = 'pending' THEN NULL ELSE worker END
     WHERE job_id = $1 AND worker = $2 AND status = 'running'
    RETURNING user_id, job_id, pg_notify($6, json_build_object(
        'user_id', user_id, 'job_id', job_id, 'state', $3::text)::text)
"""

RELEASE = """
    UPDATE memory_jobs
       SET status = 'pending', attempts = greatest(attempts - 1, 0), worker = NULL,
           lease_until = NULL, run_after = clock_timestamp()
     WHERE job_id = $1 AND worker = $2 AND status = 'running'
    RETURNING pg_notify($3, json_build_object(
        'user_id', user_id, 'job_id', job_id, 'state', 'pending')::text)
"""

EXTEND_LEASE = """
    UPDATE memory_jobs SET lease_until = clock_timestamp() + make_interval(secs => $3)
     WHERE job_id = ANY($1::bigint[]) AND worker = $2 AND status = 'running'
"""

# The held head job's turn and the user's later due jobs, taken along under
# the same worker and lease, with every message of those turns: one round trip.
# FOR UPDATE (no SKIP LOCKED): a later job is locked only for a moment (a
# retry, a requeue), and skipping it would leave a hole in the turns' order.
_TURN_MESSAGE_COLUMNS = ", ".join(
    f"msg.{c}"
    for c in (
        "message_id",
        "session_id",
        "user_id",
        "role",
        "content",
        "status",
        "error",
        "created_at",
        "prompt_tokens",
        "completion_tokens",
    )
)
ABSORB_TURNS = f"""
    WITH picked AS (
        SELECT j.job_id FROM memory_jobs j
         WHERE j.user_id = $1 AND j.status = 'pending' AND j.job_id > $2
           AND j.run_after <= clock_timestamp()
         ORDER BY j.job_id LIMIT greatest($5, 0)
           FOR UPDATE
    ), absorbed AS (
        UPDATE memory_jobs m
           -- Carried along, a job counts one attempt at most: a head that keeps
           -- losing its worker must not use up the attempts of the turns it carries.
           SET status = 'running', attempts = greatest(m.attempts, 1), worker = $3,
               started_at = clock_timestamp(),
               lease_until = clock_timestamp() + make_interval(secs => $4)
          FROM picked
         WHERE m.job_id = picked.job_id
           -- Only while this worker still holds the head: else nothing is taken.
           AND EXISTS (SELECT 1 FROM memory_jobs head WHERE head.job_id = $2
                          AND head.worker = $3 AND head.status = 'running')
        RETURNING m.job_id, m.user_message_id, m.assistant_message_id,
                  pg_notify($8, json_build_object(
                      'user_id', m.user_id, 'job_id', m.job_id, 'state', 'running')::text)
    ), turns AS (
        SELECT $2::bigint AS job_id, $6::bigint AS user_message_id,
               $7::bigint AS assistant_message_id
        UNION ALL
        SELECT job_id, user_message_id, assistant_message_id FROM absorbed
    )
    SELECT t.job_id AS turn_job_id, {_TURN_MESSAGE_COLUMNS}
      FROM turns t
      LEFT JOIN messages msg
        ON msg.message_id = t.user_message_id OR msg.message_id = t.assistant_message_id
     ORDER BY t.job_id, msg.message_id
"""

RELEASE_ABSORBED = """
    UPDATE memory_jobs
       SET status = 'pending', attempts = greatest(attempts - 1, 0), worker = NULL,
           lease_until = NULL, run_after = clock_timestamp()
     WHERE job_id = ANY($1::bigint[]) AND worker = $2 AND status = 'running'
    RETURNING pg_notify($3, json_build_object(
        'user_id', user_id, 'job_id', job_id, 'state', 'pending')::text)
"""

# The absorbed jobs ($11) of a head settled by SETTLE ($1..$10), done with
# their note ($12); a CTE of the two statements below.
_SETTLE_ABSORBED = """
        UPDATE memory_jobs
           SET status = 'done', last_error = NULL,
               note = concat_ws('; ', $12::text, 'succeeded after: ' || last_error),
               extraction = COALESCE($8, extraction),
               finished_at = clock_timestamp(), lease_until = NULL
         WHERE job_id = ANY($11::bigint[]) AND worker = $2 AND status = 'running'
        RETURNING pg_notify($6, json_build_object(
            'user_id', user_id, 'job_id', job_id, 'state', 'done')::text)
"""

# SETTLE for the head ($1..$10) and, in the same statement, its absorbed jobs
# ($11) done with their note ($12): both counts say whether we still held them.
SETTLE_WITH_ABSORBED = f"""
    WITH head AS ({SETTLE}), rest AS ({_SETTLE_ABSORBED})
    SELECT (SELECT count(*) FROM head) AS head, (SELECT count(*) FROM rest) AS rest
"""

# SETTLE_WITH_ABSORBED ($1..$12, the head done) and, in the same statement,
# the user's next head claimed by this worker ($13: lease seconds), so that a
# chained run needs no transaction and no dispatcher claim of its own. The
# head rule is memchat_queue_head's (migration 0007), written out because
# this statement's snapshot still shows the jobs it settles as running.
SETTLE_AND_CLAIM_NEXT = f"""
    WITH head AS ({SETTLE}), rest AS ({_SETTLE_ABSORBED}), next AS (
        UPDATE memory_jobs
           SET status = 'running', attempts = attempts + 1, worker = $2,
               started_at = clock_timestamp(),
               lease_until = clock_timestamp() + make_interval(secs => $13)
         WHERE job_id = (
                   SELECT j.job_id FROM memory_jobs j
                    WHERE j.user_id = (SELECT user_id FROM head)
                      AND j.status = 'pending' AND j.run_after <= clock_timestamp()
                      AND NOT EXISTS (
                          SELECT 1 FROM memory_jobs older
                           WHERE older.user_id = j.user_id
                             AND older.status IN ('pending', 'running')
                             AND older.job_id < j.job_id
                             AND older.job_id <> ALL(array_append($11::bigint[], $1)))
                    ORDER BY j.job_id LIMIT 1
                      FOR UPDATE SKIP LOCKED)
        RETURNING job_id, user_id, session_id, user_message_id, assistant_message_id,
                  attempts, pg_notify($6, json_build_object(
                      'user_id', user_id, 'job_id', job_id, 'state', 'running')::text)
    )
    SELECT (SELECT count(*) FROM head) AS head, (SELECT count(*) FROM rest) AS rest,
           next.job_id, next.user_id, next.session_id, next.user_message_id,
           next.assistant_message_id, next.attempts
      FROM (SELECT 1) one LEFT JOIN next ON true
"""

GET_JOB = f"SELECT {_JOB_COLUMNS} FROM memory_jobs WHERE job_id = $1"

# A person's "retry" of a failed job: pending and due again, attempts reset;
# the last error stays until a success turns it into "succeeded after: ...".
RETRY_FAILED_JOB = f"""
UPDATE memory_jobs
   SET status = 'pending', attempts = 0, worker = NULL, lease_until = NULL,
       run_after = clock_timestamp(), finished_at = NULL
 WHERE job_id = (SELECT job_id FROM memory_jobs WHERE user_id = $1
                  ORDER BY job_id DESC LIMIT 1)
   AND status = 'failed'
RETURNING {_JOB_COLUMNS}, pg_notify($2, json_build_object(
    'user_id', user_id, 'job_id', job_id, 'state', 'pending')::text)
"""

JOB_FOR_REPLY = f"SELECT {_JOB_COLUMNS} FROM memory_jobs WHERE assistant_message_id = $1"

LIST_JOBS = f"""
    SELECT {_JOB_COLUMNS} FROM memory_jobs WHERE user_id = $1
     ORDER BY job_id DESC LIMIT $2
"""

OPEN_JOB_COUNT = """
    SELECT count(*) FROM memory_jobs WHERE user_id = $1
       AND status IN ('pending', 'running')
"""

JOB_STATE = """
    SELECT EXISTS (SELECT 1 FROM memory_jobs
                    WHERE user_id = $1 AND status = 'running') AS running,
           newest.status, newest.last_error
      FROM (SELECT 1) one
      LEFT JOIN LATERAL (SELECT status, last_error FROM memory_jobs WHERE user_id = $1
                          ORDER BY job_id DESC LIMIT 1) newest ON true
"""

# -- named queries: the queue functions (worker login, Database.queue()) -------

CLAIM_JOBS = "SELECT * FROM memchat_claim_jobs($1, $2, $3)"
REQUEUE_EXPIRED = "SELECT memchat_requeue_expired_jobs()"
JOB_COUNTS = "SELECT * FROM memchat_job_counts()"


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a settled job records besides its status: usage, mode, a note."""

    note: str | None = None
    extraction: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class TurnMessages:
    """One turn a job run extracts from: the job it was queued as and its messages
    (None when deleted since)."""

    job_id: int
    user_message: Message | None
    reply: Message | None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """What a claim hands the dispatcher: enough to run the job."""

    job_id: int
    user_id: str
    session_id: uuid.UUID | None
    user_message_id: int | None
    assistant_message_id: int | None
    attempts: int

    @classmethod
    def of(cls, job: MemoryJob) -> ClaimedJob:
        return cls(
            job.job_id,
            job.user_id,
            job.session_id,
            job.user_message_id,
            job.assistant_message_id,
            job.attempts,
        )


class JobQueue:
    """Every ``memory_jobs`` statement: per user in a scope, across users via the queue login."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- across users (Database.queue()) -----------------------------------

    async def claim(self, worker: str, lease_seconds: float, limit: int) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs, each the head of some user's queue."""
        async with self.db.queue() as conn:
            rows = await conn.fetch(CLAIM_JOBS, worker, lease_seconds, limit)
        return [ClaimedJob(**row) for row in rows]

    async def requeue_expired(self) -> int:
        """Give jobs whose worker was lost (lease expired) back to the queue."""
        async with self.db.queue() as conn:
            requeued: int = await conn.fetchval(REQUEUE_EXPIRED)
        return requeued

    async def counts(self) -> JobCounts:
        """Jobs by status across all users (no user content)."""
        async with self.db.queue() as conn:
            row = await conn.fetchrow(JOB_COUNTS)
        assert row is not None  # memchat_job_counts() returns one row
        return JobCounts(**row)

    # -- within one user's scope -------------------------------------------

    @staticmethod
    def with_reply(user_message: Message) -> FollowUp:
        """The turn's job, queued by the very statement that stores its reply
        (``UserScope.append_message``): one round trip, not two."""
        return FollowUp(ENQUEUE_WITH_REPLY, ENQUEUED_JOB, (user_message.message_id, JOB_CHANNEL))

    @staticmethod
    async def claim_head_job(
        scope: UserScope, worker: str, lease_seconds: float
    ) -> MemoryJob | None:
        """Claim this user's oldest open job if it is pending and due.

        For a process that must run only its own user's jobs (``memchat chat``):
        the same head-of-queue rule as the dispatcher's claim, within this
        user's scope, so it never sees or takes another user's work.
        """
        row = await scope.conn.fetchrow(
            CLAIM_HEAD_JOB, scope.user_id, worker, lease_seconds, JOB_CHANNEL
        )
        return MemoryJob(**row) if row is not None else None

    @staticmethod
    async def settle(
        scope: UserScope,
        job_id: int,
        worker: str,
        status: JobStatus,
        *,
        error: str | None = None,
        retry_in: float | None = None,
        outcome: JobOutcome | None = None,
        absorbed: Sequence[int] = (),
    ) -> bool:
        """Record a job's outcome, if this worker still holds it.

        False means the lease was lost (another worker took the job over): the
        caller must roll back what it did, so the job's effect happens once.
        A job that ends ``done`` keeps no error of an earlier attempt. The
        ``absorbed`` jobs (only with ``done``) end ``done`` in the same
        statement, noted as coalesced into this one; False if any was lost.
        """
        args = _settle_args(job_id, worker, status, error, retry_in, outcome or JobOutcome())
        if absorbed:
            if status != "done":
                raise ValueError("only a job that ends done settles the jobs it took along")
            row = await scope.conn.fetchrow(
                SETTLE_WITH_ABSORBED, *args, list(absorbed), f"coalesced into job {job_id}"
            )
            assert row is not None  # the statement's aggregates always return a row
            settled: bool = row["head"] == 1 and row["rest"] == len(absorbed)
            return settled
        return await scope.conn.fetchrow(SETTLE, *args) is not None

    @staticmethod
    async def settle_and_claim_next(
        scope: UserScope,
        job_id: int,
        worker: str,
        lease_seconds: float,
        *,
        outcome: JobOutcome,
        absorbed: Sequence[int] = (),
    ) -> tuple[bool, ClaimedJob | None]:
        """Settle a job ``done`` (with the jobs it took along) and claim its user's
        next head in the same statement: (still held, the claimed job or None).

        Nothing is claimed when the job was no longer held; the caller rolls
        back then, as after ``settle``.
        """
        row = await scope.conn.fetchrow(
            SETTLE_AND_CLAIM_NEXT,
            *_settle_args(job_id, worker, "done", None, None, outcome),
            list(absorbed),
            f"coalesced into job {job_id}",
            lease_seconds,
        )
        assert row is not None  # one row: FROM (SELECT 1) LEFT JOIN next
        if row["head"] != 1 or row["rest"] != len(absorbed):
            return False, None
        if row["job_id"] is None:
            return True, None
        return True, ClaimedJob(
            row["job_id"],
            row["user_id"],
            row["session_id"],
            row["user_message_id"],
            row["assistant_message_id"],
            row["attempts"],
        )

    @staticmethod
    async def absorb_turns(
        scope: UserScope, job: ClaimedJob, worker: str, lease_seconds: float, limit: int
    ) -> list[TurnMessages]:
        """The held ``job``'s turn, then up to ``limit`` later due jobs of its user,
        taken along (running, under ``worker``), oldest first, with their messages."""
        rows = await scope.conn.fetch(
            ABSORB_TURNS,
            scope.user_id,
            job.job_id,
            worker,
            lease_seconds,
            limit,
            job.user_message_id,
            job.assistant_message_id,
            JOB_CHANNEL,
        )
        found: dict[int, dict[int, Message]] = {}
        for row in rows:
            messages = found.setdefault(row["turn_job_id"], {})
            if row["message_id"] is not None:
                fields = {k: v for k, v in row.items() if k != "turn_job_id"}
                messages[row["message_id"]] = Message(**fields)
        turns = []
        for job_id, messages in found.items():
            users = [m for m in messages.values() if m.role == "user"]
            replies = [m for m in messages.values() if m.role != "user"]
            turns.append(
                TurnMessages(job_id, users[0] if users else None, replies[0] if replies else None)
            )
        return turns

    @staticmethod
    async def release_absorbed(scope: UserScope, job_ids: Sequence[int], worker: str) -> int:
        """Give back jobs taken along with a head that did not end ``done``."""
        rows = await scope.conn.fetch(RELEASE_ABSORBED, list(job_ids), worker, JOB_CHANNEL)
        return len(rows)

    @staticmethod
    async def release(scope: UserScope, job_id: int, worker: str) -> bool:
        """Give an unfinished job back (shutdown): pending again, this attempt not counted."""
        row = await scope.conn.fetchrow(RELEASE, job_id, worker, JOB_CHANNEL)
        return row is not None

    @staticmethod
    async def extend_lease(
        scope: UserScope, job_ids: Sequence[int], worker: str, seconds: float
    ) -> bool:
        """Extend the lease of a held job (and the jobs it took along); False if all are lost."""
        status = await scope.conn.execute(EXTEND_LEASE, list(job_ids), worker, seconds)
        return status != "UPDATE 0"

    @staticmethod
    async def get_job(scope: UserScope, job_id: int) -> MemoryJob | None:
        row = await scope.conn.fetchrow(GET_JOB, job_id)
        return MemoryJob(**row) if row is not None else None

    @staticmethod
    async def retry_failed_job(scope: UserScope) -> MemoryJob | None:
        """Queue this user's newest job again if it failed; None when it did not."""
        row = await scope.conn.fetchrow(RETRY_FAILED_JOB, scope.user_id, JOB_CHANNEL)
        if row is None:
            return None
        return MemoryJob(**{k: v for k, v in row.items() if k != "pg_notify"})

    @staticmethod
    async def job_for_reply(scope: UserScope, reply_id: int) -> MemoryJob | None:
        """The memory job queued with a stored reply, if any."""
        row = await scope.conn.fetchrow(JOB_FOR_REPLY, reply_id)
        return MemoryJob(**row) if row is not None else None

    @staticmethod
    async def list_jobs(scope: UserScope, limit: int = 100) -> list[MemoryJob]:
        """This user's jobs, newest first."""
        rows = await scope.conn.fetch(LIST_JOBS, scope.user_id, limit)
        return [MemoryJob(**row) for row in rows]

    @staticmethod
    async def open_job_count(scope: UserScope) -> int:
        count: int = await scope.conn.fetchval(OPEN_JOB_COUNT, scope.user_id)
        return count

    @staticmethod
    async def job_state(scope: UserScope) -> tuple[SidebarJobState, str | None]:
        """What the sidebar shows: running while a job runs, else failed if the newest failed."""
        row = await scope.conn.fetchrow(JOB_STATE, scope.user_id)
        assert row is not None  # JOB_STATE selects FROM (SELECT 1), so it returns one row
        if row["running"]:
            return "running", None
        if row["status"] == "failed":
            return "failed", row["last_error"]
        return "idle", None


def _settle_args(
    job_id: int,
    worker: str,
    status: JobStatus,
    error: str | None,
    retry_in: float | None,
    outcome: JobOutcome,
) -> tuple[object, ...]:
    """SETTLE's parameters, $1 to $10."""
    return (
        job_id,
        worker,
        status,
        stored_error(error),
        retry_in,
        JOB_CHANNEL,
        storable(outcome.note) if outcome.note is not None else None,
        outcome.extraction,
        outcome.usage.prompt_tokens if outcome.usage else None,
        outcome.usage.completion_tokens if outcome.usage else None,
    )
