"""The memory dispatcher: background workers over the durable job queue (engine/queue.py).

One dispatcher per process claims claimable jobs in batches
(``memchat_claim_jobs``: each the head of some user's queue, so one job per
user at a time across every process), up to ``memory.concurrency`` running at
once, each in its own task: read the turn in the user's scope, ask the model
(no transaction held), then apply the tool calls and settle the job in one
scoped transaction. Settling checks that this worker still holds the job; if its
lease ran out and another worker took over, the transaction is rolled back,
so a job's effect happens exactly once.

Coalesced extraction: a job run takes its user's later due jobs along
(``JobQueue.absorb_turns``, up to ``memory.coalesce_turns`` turns in all) and
asks the model about all those turns in one call; each change is recorded
with the turn it came from, and the absorbed jobs settle with the head
(``done``, "coalesced into job N") or are given back with it. A user who
types faster than extraction keeps up therefore costs one model call per
job run, not one per turn.

How many jobs run at once: up to ``memory.concurrency`` (256 by default: a
job holds a connection only for its two short transactions, never during the
model call, so the pool bounds the database work by itself). An endpoint
that answers 429 (after the client's own retries) halves that for this
process, and each job that succeeds gives one back (additive increase,
multiplicative decrease), so a rate-limited endpoint sets the pace.

Failures are retried with exponential backoff up to ``memory.max_attempts``,
then the job stays ``failed`` with its error. A crashed process's job is
requeued when its lease expires (any live process does that periodically).
``stop()`` lets running jobs finish within ``memory.drain_timeout`` and gives
back the ones that could not, so the next start resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from engine.admin import AdminReader
from engine.config import MemorySettings
from engine.consolidate import Consolidator
from engine.db import Database
from engine.embeddings import Embedder
from engine.errors import MemchatError
from engine.memory import ApplyResult, MemoryManager, Turn
from engine.models import ModelError, ModelRateLimited
from engine.optimize_policy import OptimizePolicy
from engine.priority import ReplyPriority
from engine.queue import ClaimedJob, JobOutcome, JobQueue, TurnMessages
from engine.recall import extraction_memories, turn_vector
from engine.records import JobCounts, JobStatus, Memory, MemoryJob
from engine.store import Store, UserScope
from engine.vectors import embed_missing

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 1.0
REQUEUE_EVERY_SECONDS = 5.0
RECOUNT_SECONDS = 0.02
OWN_JOB_POLL_SECONDS = 0.1


class OutOfTime(Exception):
    """A caller's deadline came during the model call; the job goes back, unchanged."""


class LeaseLost(Exception):
    """Another worker took this job over; what we did must be rolled back."""


class _Held:
    """The jobs one run holds: the claimed head, and the later ones it took along."""

    def __init__(self, job: ClaimedJob) -> None:
        self.job = job
        self.absorbed: list[int] = []

    @property
    def job_ids(self) -> list[int]:
        return [self.job.job_id, *self.absorbed]


@dataclass(frozen=True, slots=True)
class _Read:
    """What a run reads before its model call: its turns (the jobs it took along
    are held from then on) and the memories the prompt shows."""

    found: list[TurnMessages]
    absorbed: list[int]
    texts: list[str]
    memories: list[Memory] | None
    """None: to be picked by similarity, once the turns' vector is known."""


@dataclass(frozen=True, slots=True)
class _Chained:
    """The user's next job, claimed by the transaction that settled the last one,
    with what it reads already read there (None: read after gathering)."""

    job: ClaimedJob
    read: _Read | None


async def job_counts(db: Database) -> JobCounts:
    """Jobs by status across all users."""
    return await JobQueue(db).counts()


class MemoryDispatcher:
    def __init__(
        self,
        db: Database,
        store: Store,
        manager: MemoryManager,
        settings: MemorySettings,
        *,
        name: str | None = None,
        priority: ReplyPriority | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.db = db
        # Vectors: the turns' to pick related memories, the memories' after a job.
        self.embedder = embedder
        self.queue = JobQueue(db)
        self.priority = priority
        self.store = store
        self.manager = manager
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._settled = asyncio.Condition()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._running_users: dict[int, str] = {}
        """Whose job each running task serves, until the task has finished."""
        self._stopping = False
        self._gathering = 0
        """Running jobs waiting for their user's next turn (_gather): they hold no slot."""
        self._resuming = 0
        """Jobs whose wait ended, waiting for a slot: served before new claims."""
        self._last_requeue = 0.0
        self._rate_limit: float | None = None
        """A ceiling below memory.concurrency learnt from the endpoint's 429s."""
        self.optimizer = OptimizePolicy(Consolidator(store, manager), settings.optimize_threshold)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._dispatcher is not None:
            return
        self._stopping = False
        self._dispatcher = asyncio.create_task(self._dispatch(), name="memory-dispatcher")

    def wake(self) -> None:
        """New work may be there (a turn finished here, or a NOTIFY arrived)."""
        self._wake.set()

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    @property
    def _active(self) -> int:
        """Jobs holding one of the memory.concurrency slots (not waiting for a turn)."""
        return len(self._running) - self._gathering - self._resuming

    @property
    def concurrency(self) -> int:
        """Jobs this process runs at once now: the setting, or less after 429s."""
        ceiling = self.settings.concurrency
        if self._rate_limit is None:
            return ceiling
        return max(1, min(ceiling, int(self._rate_limit)))

    def _rate_limited(self) -> None:
        before = self.concurrency
        self._rate_limit = max(1.0, min(before, max(len(self._running), 1)) / 2)
        if self.concurrency < before:
            log.warning(
                "the memory model's endpoint is rate limited: %d job(s) at once now, not %d",
                self.concurrency,
                before,
            )

    def _succeeded(self) -> None:
        if self._rate_limit is not None:
            self._rate_limit += 1
            if self._rate_limit >= self.settings.concurrency:
                self._rate_limit = None

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Finish running jobs within the timeout; give back the rest. Pending jobs stay."""
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        self._stopping = True
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout)
        unfinished = list(self._running.values())
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        await self.optimizer.stop()

    # -- waiting -----------------------------------------------------------

    async def wait_idle(self, user_ids: Iterable[str] | None = None, within: float = 60.0) -> bool:
        """Wait until the given users (or everyone) have no open job; False on timeout."""
        users = list(user_ids) if user_ids is not None else None
        wanted = set(users) if users is not None else None
        deadline = time.monotonic() + within
        while True:
            counted = time.monotonic()
            # A job settled here counts as done once its task has finished (the
            # background consolidation it may queue, its vectors): not at COMMIT.
            if await self._open_jobs(users) == 0 and not self._finishing(wanted):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Settles here wake us at once; jobs run by other processes are polled.
            async with self._settled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), min(remaining, 0.25))
            # Hundreds of jobs settle per second under load: count at most
            # every RECOUNT_SECONDS rather than once per settle.
            pause = RECOUNT_SECONDS - (time.monotonic() - counted)
            if pause > 0:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    def _finishing(self, users: set[str] | None) -> bool:
        running = self._running_users.values()
        return bool(running) if users is None else any(u in users for u in running)

    async def _open_jobs(self, users: list[str] | None) -> int:
        if users is None:
            return (await job_counts(self.db)).open
        if len(users) == 1:
            async with self.store.scope(users[0]) as s:
                return await self.queue.open_job_count(s)
        # Many users: one read-only count across them, not one scope each.
        return await AdminReader(self.db).open_job_count(users)

    # -- the dispatcher --------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping:
            free = self.concurrency - self._active - self._resuming
            if free <= 0:
                await self._idle()  # a finishing job wakes us
                continue
            try:
                await self._maybe_requeue_expired()
                jobs = await self._claim_shielded(free)
            except MemchatError as exc:
                log.warning("memory workers: %s", exc.message)
                await self._idle()
                continue
            except Exception:
                # The dispatcher must outlive any one failure; a claimed job we
                # did not get to see is requeued when its lease expires.
                log.exception("memory workers: claim failed")
                await self._idle()
                continue
            for job in jobs:
                self._running_users[job.job_id] = job.user_id
                self._running[job.job_id] = asyncio.create_task(
                    self._run(job), name=f"memory-job-{job.job_id}"
                )
            if len(jobs) < free:
                # Nothing more is claimable now: wait for a new job, a finished
                # one (its user's next job becomes the head), or the poll.
                await self._idle()

    async def _run(self, job: ClaimedJob) -> None:
        current = job
        read: _Read | None = None
        # The chained job once its claim committed, so a cancel gives it back too.
        claimed: list[_Chained] = []
        try:
            while True:
                # Settling a job claims its user's next one in the same statement
                # (not while stopping), read in the same transaction: a chained
                # job costs no claim and no transaction of its own to begin.
                _, chained = await self._run_job(
                    current, read=read, chain=claimed if not self._stopping else None
                )
                claimed.clear()
                if chained is None:
                    break
                async with self._settled:
                    self._settled.notify_all()  # wait_idle counts again
                current, read = chained.job, chained.read
        except asyncio.CancelledError:
            # stop() ran out of drain time: hand the job back for the next start.
            await self._give_back(current)
            for chained in claimed:
                await self._give_back(chained.job)
                if chained.read is not None and chained.read.absorbed:
                    taken = _Held(chained.job)
                    taken.absorbed = chained.read.absorbed
                    await self._release_absorbed(taken)
            raise
        finally:
            self._running.pop(job.job_id, None)
            self._running_users.pop(job.job_id, None)
            self._wake.set()
            async with self._settled:
                self._settled.notify_all()

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
        self._wake.clear()

    async def _claim_shielded(self, limit: int) -> list[ClaimedJob]:
        # A cancel (shutdown) must not land between the claim's commit and our
        # seeing its result, or the jobs would sit "running" until their lease ends.
        claim = asyncio.create_task(self._claim(limit))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            jobs: list[ClaimedJob] = []
            with contextlib.suppress(Exception):
                jobs = await claim
            for job in jobs:
                await self._give_back(job)
            raise

    async def _claim(self, limit: int) -> list[ClaimedJob]:
        return await self.queue.claim(self.name, self.settings.lease_seconds, limit)

    async def _maybe_requeue_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_requeue < REQUEUE_EVERY_SECONDS:
            return
        self._last_requeue = now
        requeued = await self.queue.requeue_expired()
        if requeued:
            log.warning("requeued %d memory job(s) whose worker was lost", requeued)

    async def run_own_jobs(self, user_id: str, job_id: int, within: float) -> MemoryJob | None:
        """Run ``user_id``'s queued jobs, oldest first, until ``job_id`` has settled.

        For a process that serves one user's turn (``memchat chat``): it never
        claims another user's job. Returns the job as it stands at the end
        (still open when ``within`` ran out or another process holds it), or
        None when it is gone.
        """
        deadline = time.monotonic() + within
        while True:
            async with self.store.scope(user_id) as s:
                claimed = await self.queue.claim_head_job(s, self.name, self.settings.lease_seconds)
                current = await self.queue.get_job(s, job_id)
            if claimed is not None:
                if not await self._process(ClaimedJob.of(claimed), deadline=deadline):
                    # Out of time mid-job (a slow or trickling model): it was
                    # given back, pending, for a dispatcher or the next run.
                    async with self.store.scope(user_id) as s:
                        return await self.queue.get_job(s, job_id)
                continue
            if current is None or current.status in ("done", "failed"):
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return current
            # Not claimable yet: a retry waits for its run_after, or another
            # process holds the head of this user's queue.
            await asyncio.sleep(min(remaining, OWN_JOB_POLL_SECONDS))

    async def run_once(self) -> bool:
        """Claim and process one job in the calling task (for tests and scripts)."""
        jobs = await self._claim(1)
        if not jobs:
            return False
        await self._process(jobs[0])
        return True

    # -- one job -----------------------------------------------------------

    async def _process(self, job: ClaimedJob, *, deadline: float | None = None) -> bool:
        """Run one job to its outcome; False when ``deadline`` (``time.monotonic()``)
        came during the model call and the job was given back, pending."""
        done, _ = await self._run_job(job, deadline=deadline)
        return done

    async def _run_job(
        self,
        job: ClaimedJob,
        *,
        deadline: float | None = None,
        read: _Read | None = None,
        chain: list[_Chained] | None = None,
    ) -> tuple[bool, _Chained | None]:
        """``_process``, and the user's next job when ``chain`` is given: the settle
        claims it, and it is put in ``chain`` as soon as that commits.

        ``read``: what the transaction that claimed this job already read for it.
        """
        held = _Held(job)
        if read is not None:
            held.absorbed = read.absorbed
        chained: _Chained | None = None
        heartbeat: asyncio.Task[None] | None = None
        try:
            if job.attempts > self.settings.max_attempts:
                await self._settle(job, "failed", error="gave up: the worker running it was lost")
                return True, None
            heartbeat = asyncio.create_task(self._heartbeat(held))
            result, chained = await self._extract_and_apply(held, deadline, read, chain)
        except OutOfTime:
            await self._give_back(job)
            return False, None
        except LeaseLost:
            # Its lease ran out and another worker took it, or its user was deleted.
            log.warning("memory job %s is no longer ours; its changes were rolled back", job.job_id)
            return True, None
        except ModelError as exc:
            if isinstance(exc, ModelRateLimited):
                self._rate_limited()
            await self._fail_or_retry(job, exc.message, permanent=exc.permanent)
            return True, None
        except MemchatError as exc:
            await self._fail_or_retry(job, exc.message)
            return True, None
        except Exception as exc:
            log.exception("memory job %s failed unexpectedly", job.job_id)
            await self._fail_or_retry(job, f"internal error: {type(exc).__name__}: {exc}")
            return True, None
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if held.absorbed:
                # The head did not end done (retry, failure, lease lost, shutdown):
                # the jobs it took along run again on their own, none is lost.
                await self._release_absorbed(held)
        self._succeeded()
        if result is not None and result.memory_count is not None and self._dispatcher is not None:
            # Only a running dispatcher (worker, app) consolidates in the background.
            self.optimizer.consider(job.user_id, result.memory_count)
        if result is not None and result.rejected:
            log.info("memory job %s rejected: %s", job.job_id, "; ".join(result.rejected))
        if self.embedder is not None:
            # After settling, outside any transaction; bounded and never failing
            # the job: vectors are an index, full text finds a memory without one.
            await embed_missing(self.store, self.embedder, job.user_id)
        return True, chained

    def _gathers(self, job: ClaimedJob) -> bool:
        """Whether a run of this job now waits for a later turn of its user under way."""
        return (
            self.settings.coalesce_wait_ms > 0
            and self.priority is not None
            and self.priority.turns_after(job.user_id, job.user_message_id) > 0
        )

    async def _gather(self, job: ClaimedJob) -> None:
        """Wait, bounded, for the user's later turn under way here to be stored (its
        job then queued), so that this run takes it along: one model call for both."""
        if not (self._gathers(job) and self.priority is not None):
            return
        # The wait gives its slot back: another user's job must not queue behind
        # a turn that may take long to end (red-team G1, memory.concurrency = 1).
        self._gathering += 1
        self._wake.set()
        async with self._settled:
            self._settled.notify_all()  # a job waiting to resume may take the slot
        try:
            await self.priority.wait_turns_after(
                job.user_id, job.user_message_id, self.settings.coalesce_wait_ms / 1000
            )
        finally:
            self._gathering -= 1
        # A slot again before the model is asked, ahead of new claims.
        self._resuming += 1
        try:
            while self._active >= self.concurrency:
                async with self._settled:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._settled.wait(), IDLE_POLL_SECONDS)
        finally:
            self._resuming -= 1

    async def _read(self, s: UserScope, job: ClaimedJob) -> _Read:
        """The job's turn and the later ones it takes along, and (without vectors)
        the memories related to them, in the caller's transaction."""
        found = await self.queue.absorb_turns(
            s, job, self.name, self.settings.lease_seconds, self.settings.coalesce_turns - 1
        )
        absorbed = [t.job_id for t in found if t.job_id != job.job_id]
        # Related to every turn the run covers, plus the newest (engine/recall.py).
        texts = [m.content for t in found for m in (t.user_message, t.reply) if m is not None]
        by_similarity = self.embedder is not None and self.embedder.usable and bool(texts)
        memories = None if by_similarity else await extraction_memories(s, self.settings, *texts)
        return _Read(found, absorbed, texts, memories)

    async def _extract_and_apply(
        self,
        held: _Held,
        deadline: float | None = None,
        read: _Read | None = None,
        chain: list[_Chained] | None = None,
    ) -> tuple[ApplyResult | None, _Chained | None]:
        job = held.job
        if read is None:
            await self._gather(job)
            async with self.store.scope(job.user_id) as s:
                read = await self._read(s, job)
                held.absorbed = read.absorbed
        memories = read.memories
        if memories is None:
            # The turns' vector is asked for with no transaction open, then the
            # memories are picked in a second one (only when embeddings are on).
            near = await turn_vector(self.embedder, *read.texts)
            async with self.store.scope(job.user_id) as s:
                memories = await extraction_memories(s, self.settings, *read.texts, near=near)
        turns = _turns(read.found)
        if not turns:
            # The session was deleted meanwhile: nothing left to learn from.
            outcome = JobOutcome(note="its turn was deleted")
            async with self.store.scope(job.user_id) as s:
                if not await self.queue.settle(
                    s, job.job_id, self.name, "done", outcome=outcome, absorbed=held.absorbed
                ):
                    raise LeaseLost
            held.absorbed = []
            return None, None
        if self.settings.pause_while_streaming and self.priority is not None:
            await self.priority.wait_until_quiet()
        if deadline is None:
            plan = await self.manager.plan(memories, turns)
        else:
            # Only the model call is cut short: no transaction is open during it.
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    plan = await self.manager.plan(memories, turns)
            except TimeoutError:
                raise OutOfTime from None
        chained: _Chained | None = None
        async with self.store.scope(job.user_id) as s:
            result = await self.manager.apply(s, plan, turns)
            notes = [n for n in (plan.note, result.note(self.settings)) if n]
            if held.absorbed:
                notes.append(f"extracted with job(s) {', '.join(map(str, held.absorbed))}")
            outcome = JobOutcome("; ".join(notes) or None, plan.extraction, plan.usage)
            if chain is not None:
                held_still, following = await self.queue.settle_and_claim_next(
                    s,
                    job.job_id,
                    self.name,
                    self.settings.lease_seconds,
                    outcome=outcome,
                    absorbed=held.absorbed,
                )
                if following is not None:
                    # A turn of the user under way: read once it is stored (_gather),
                    # so that the next run takes it along; else read now, here.
                    read_now = not self._gathers(following)
                    chained = _Chained(
                        following, await self._read(s, following) if read_now else None
                    )
            else:
                held_still = await self.queue.settle(
                    s, job.job_id, self.name, "done", outcome=outcome, absorbed=held.absorbed
                )
            if not held_still:
                raise LeaseLost
        held.absorbed = []  # settled with the head
        if chain is not None and chained is not None:
            chain.append(chained)
        return result, chained

    async def _fail_or_retry(self, job: ClaimedJob, error: str, *, permanent: bool = False) -> None:
        if permanent or job.attempts >= self.settings.max_attempts:
            # A permanent error (rejected key, unknown model, refused request)
            # would come back unchanged: retrying only costs model calls.
            log.warning("memory job %s failed for good: %s", job.job_id, error)
            await self._settle(job, "failed", error=error)
        else:
            delay = min(self.settings.retry_delay * 2 ** (job.attempts - 1), 300.0)
            await self._settle(job, "pending", error=error, retry_in=delay)

    async def _settle(
        self,
        job: ClaimedJob,
        status: JobStatus,
        *,
        error: str | None = None,
        retry_in: float | None = None,
        outcome: JobOutcome | None = None,
    ) -> None:
        try:
            async with self.store.scope(job.user_id) as s:
                await self.queue.settle(
                    s,
                    job.job_id,
                    self.name,
                    status,
                    error=error,
                    retry_in=retry_in,
                    outcome=outcome,
                )
        except MemchatError as exc:
            # The lease will expire and the job be retried: nothing is lost.
            log.warning("could not settle memory job %s: %s", job.job_id, exc.message)

    async def _release_absorbed(self, held: _Held) -> None:
        try:
            async with self.store.scope(held.job.user_id) as s:
                await self.queue.release_absorbed(s, held.absorbed, self.name)
        except (MemchatError, asyncio.CancelledError):
            log.warning(
                "could not give back the jobs memory job %s took along; their leases will expire",
                held.job.job_id,
            )

    async def _give_back(self, job: ClaimedJob) -> None:
        try:
            async with self.store.scope(job.user_id) as s:
                await self.queue.release(s, job.job_id, self.name)
        except (MemchatError, asyncio.CancelledError):
            log.warning("could not give back memory job %s; its lease will expire", job.job_id)

    async def _heartbeat(self, held: _Held) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with self.store.scope(held.job.user_id) as s:
                    await self.queue.extend_lease(
                        s, held.job_ids, self.name, self.settings.lease_seconds
                    )
            except MemchatError as exc:
                log.warning(
                    "could not extend the lease of job %s: %s", held.job.job_id, exc.message
                )


def _turns(found: list[TurnMessages]) -> list[Turn]:
    """The turns still there (a deleted session takes its messages along), oldest first."""
    return [Turn(t.user_message, t.reply, t.job_id) for t in found if t.user_message is not None]
