"""Chaos: model faults, PostgreSQL going away, processes killed, a pool too small.

Every scenario ends with ``engine.audit.audit_invariants``: acknowledged
messages stored, every turn with exactly one outcome, every memory job settled
once, no user's rows in another's scope, no duplicate memories, RLS on.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import InternalClientError

from bench.fake_openai import FAULT_KINDS, FakeOpenAI
from engine.agent import (
    Agent,
    TurnCancelled,
    TurnCompleted,
    TurnEnd,
    TurnFailed,
    TurnStarted,
)
from engine.audit import InvariantReport, audit_invariants
from engine.config import Settings
from engine.db import Database
from engine.errors import DatabaseError
from engine.events import MemoryChanged, Resync
from engine.jobs import job_counts
from engine.queue import JobQueue
from engine.records import Message
from engine.runtime import Runtime, memory_job_with_reply, open_runtime
from engine.scenarios import run_load
from engine.store import FollowUp, UserScope
from tests.conftest import make_settings

pytestmark = [pytest.mark.db, pytest.mark.slow]

# Every wait below is bounded; these are the bounds, not pauses.
IDLE_WITHIN = 60.0
EVENT_WITHIN = 15.0


# -- helpers -------------------------------------------------------------------


@dataclass
class Tally:
    """What callers got back from the engine during a load."""

    acknowledged: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    ends: dict[str, TurnEnd] = field(default_factory=dict)
    """By the turn's text (unique per turn)."""
    raised: dict[str, tuple[BaseException, bool]] = field(default_factory=dict)
    """By the turn's text: what the turn raised, and whether it had been acknowledged."""

    @property
    def started(self) -> int:
        return sum(len(ids) for ids in self.acknowledged.values())

    def raised_kinds(self) -> Counter[str]:
        return Counter(
            f"{type(exc).__name__} {'after' if acked else 'before'} ack"
            for exc, acked in self.raised.values()
        )


async def _turn(rt: Runtime, user_id: str, sid: str, text: str, tally: Tally) -> None:
    acked = False
    try:
        async for event in rt.agent.stream(user_id, sid, text):
            if isinstance(event, TurnStarted):
                acked = True
                tally.acknowledged[user_id].append(event.user_message.message_id)
            elif isinstance(event, TurnCompleted | TurnFailed | TurnCancelled):
                tally.ends[text] = event
                tally.acknowledged[user_id].append(event.reply.message_id)
    except DatabaseError as exc:
        tally.raised[text] = (exc, acked)
    except InternalClientError as exc:
        # Not the engine's contract (DatabaseError): the known leak, see
        # test_connection_lost_at_release_is_a_database_error.
        tally.raised[text] = (exc, acked)


async def _new_session(rt: Runtime, user_id: str) -> str:
    async with rt.store.scope(user_id) as s:
        return str((await s.create_session()).session_id)


def _text(user: int, turn: int) -> str:
    return f"I am chaos{user}t{turn} and I like tea number {user}."


_TEXT_KEY = re.compile(r"chaos\d+t\d+")


def _turn_key(body: dict[str, Any]) -> str | None:
    """The turn a model request belongs to (chat or extraction), by its unique token."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            found = _TEXT_KEY.search(str(message.get("content")))
            return found.group(0) if found else None
    return None


async def _terminate_backends(superuser_dsn: str) -> int:
    """Kill every other connection to this database: PostgreSQL 'goes away'."""
    conn = await asyncpg.connect(superuser_dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()) t"
        )
    finally:
        await conn.close()


def _report(name: str, report: InvariantReport) -> None:
    print(f"\n[{name}] audit: {report.summary()}")
    for line in report.problems:
        print(f"  {line}")


def _cli(dsn: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args],
        env={
            **os.environ,
            "MEMCHAT_DATABASE__URL": dsn,
            "MEMCHAT_CONFIG": os.devnull,
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- 1. model faults -------------------------------------------------------------


async def test_model_faults_at_twenty_percent_lose_nothing(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 20},
        model={
            "provider": "openai",
            "base_url": fake.base_url,
            "api_key": None,
            "max_retries": 1,
            "timeout": 1.0,
        },
        memory={"max_attempts": 3, "retry_delay": 0.01, "concurrency": 8, "drain_timeout": 10},
    )
    # Tally every fault the server injects: (kind, on an extraction request?, turn).
    injected: list[tuple[str, bool, str | None]] = []
    record = fake._record

    def recording(body: dict[str, Any]) -> Any:
        number, fault, queued = record(body)
        if fault is not None:
            injected.append((fault.kind, bool(body.get("tools")), _turn_key(body)))
        return number, fault, queued

    monkeypatch.setattr(fake, "_record", recording)
    fake.fault_rate(0.2, kinds=FAULT_KINDS)

    users, turns = 100, 2
    tally = Tally()
    async with open_runtime(settings) as rt:

        async def converse(i: int) -> None:
            user_id = f"chaos{i}@example.com"
            sid = await _new_session(rt, user_id)
            for t in range(turns):
                await _turn(rt, user_id, sid, _text(i, t), tally)

        await asyncio.gather(*(converse(i) for i in range(users)))
        assert await rt.dispatcher.wait_idle(within=IDLE_WITHIN)
        fake.fault_rate(0.0)
        report = await audit_invariants(rt.db, acknowledged=tally.acknowledged)
        async with rt.db.admin() as conn:
            jobs = await conn.fetch(
                "SELECT m.content, j.status, j.last_error FROM memory_jobs j "
                "JOIN messages m ON m.message_id = j.user_message_id"
            )
            stored = {
                r["content"]
                for r in await conn.fetch("SELECT content FROM messages WHERE role = 'user'")
            }
    _report("model faults", report)

    # Every turn was acknowledged, ended completed or failed, and failures say why.
    assert tally.raised == {}
    assert len(tally.ends) == users * turns
    for text, end in tally.ends.items():
        assert isinstance(end, TurnCompleted | TurnFailed), (text, end)
        if isinstance(end, TurnFailed):
            assert end.error.strip() and end.reply.status == "failed"
            assert (end.reply.error or "").strip() == end.error.strip()
    assert stored == set(tally.ends), "every user message is stored"
    # Every job done, or failed with its error.
    job_by_turn = {}
    for row in jobs:
        key = _TEXT_KEY.search(row["content"])
        assert key is not None
        job_by_turn[key.group(0)] = row
        assert row["status"] == "done" or (row["status"] == "failed" and row["last_error"])
    report.assert_ok()

    # The table: each fault, how often, where it landed, and what was lost.
    lost: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    on_jobs: Counter[str] = Counter()
    for kind, extraction, key in injected:
        kinds[kind] += 1
        on_jobs[kind] += extraction
        text = next((t for t in tally.ends if t.startswith(f"I am {key} ")), None)
        if text is None or text not in stored:
            lost[kind] += 1  # a turn (or job) we cannot find stored
        elif extraction and (
            key not in job_by_turn
            or job_by_turn[key]["status"] not in ("done", "failed")
            or (job_by_turn[key]["status"] == "failed" and not job_by_turn[key]["last_error"])
        ):
            lost[kind] += 1
    failed_turns = sum(isinstance(e, TurnFailed) for e in tally.ends.values())
    failed_jobs = sum(r["status"] == "failed" for r in jobs)
    empty = sum(isinstance(e, TurnCompleted) and not e.reply.content for e in tally.ends.values())
    print(
        f"\n{fake.request_count} model requests, {len(injected)} faults injected; "
        f"{users * turns} turns ({failed_turns} failed, error kept), "
        f"{len(jobs)} jobs ({failed_jobs} failed, error kept); "
        f"{empty} turns completed with an empty reply"
    )
    print(f"{'fault':<14}{'injected':>9}{'on turns':>10}{'on jobs':>9}{'lost':>6}")
    for kind in FAULT_KINDS:
        print(
            f"{kind:<14}{kinds[kind]:>9}{kinds[kind] - on_jobs[kind]:>10}"
            f"{on_jobs[kind]:>9}{lost[kind]:>6}"
        )
    assert set(kinds) == set(FAULT_KINDS), f"every kind was injected: {kinds}"
    assert sum(lost.values()) == 0


# -- 2. PostgreSQL goes away mid-run ----------------------------------------------


async def test_database_connections_killed_mid_load_recover(
    tmp_path: Path, database_dsn: str
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 20},
        model={"provider": "offline", "offline_latency_ms": 20, "offline_token_delay_ms": 1},
        memory={"retry_delay": 0.01, "lease_seconds": 2, "drain_timeout": 10},
    )
    users, turns = 60, 4
    tally = Tally()
    half = asyncio.Event()
    async with open_runtime(settings) as rt:
        sessions = {i: await _new_session(rt, f"pg{i}@example.com") for i in range(users)}
        async with rt.store.scope("probe") as s:
            await s.ensure_user()
        probe = rt.events.subscribe("probe")

        async def converse(i: int) -> None:
            for t in range(turns):
                await _turn(rt, f"pg{i}@example.com", sessions[i], _text(i, t), tally)
                if tally.started >= users * turns:  # half the turns' messages + replies
                    half.set()

        async def outage() -> int:
            await half.wait()
            return await _terminate_backends(database_dsn)

        load = asyncio.gather(*(converse(i) for i in range(users)))
        killed = await outage()
        await load
        assert killed > 0

        # The event hub noticed, reconnected and told its subscriber to re-read.
        async with asyncio.timeout(EVENT_WITHIN):
            async for event in probe:
                if isinstance(event, Resync):
                    break
        # A change made after the outage arrives.
        async with rt.store.scope("probe") as s:
            memory = await s.add_memory("Likes resilience")
        assert memory is not None
        async with asyncio.timeout(EVENT_WITHIN):
            async for event in probe:
                if isinstance(event, MemoryChanged) and event.memory_id == memory.memory_id:
                    break
        probe.close()

        # The pool recovered: new turns succeed.
        after = Tally()
        await asyncio.gather(
            *(
                _turn(rt, f"pg{i}@example.com", sessions[i], _text(i, turns), after)
                for i in range(0, users, 3)
            )
        )
        assert len(after.ends) == len(range(0, users, 3))
        assert all(isinstance(e, TurnCompleted) for e in after.ends.values())

        # Jobs cut off by the outage are retried (lease expiry) and end done.
        assert await rt.dispatcher.wait_idle(within=IDLE_WITHIN)
        counts = await job_counts(rt.db)
        for user, ids in after.acknowledged.items():
            tally.acknowledged[user].extend(ids)
        report = await audit_invariants(rt.db, acknowledged=tally.acknowledged)
        async with rt.db.admin() as conn:
            orphan_contents = await conn.fetchval(
                "SELECT coalesce(array_agg(content), '{}') FROM messages "
                "WHERE message_id = ANY($1::bigint[])",
                [mid for _, mid in report.orphaned_turns],
            )
    _report("postgres outage", report)
    failed = sum(isinstance(e, TurnFailed) for e in tally.ends.values())
    print(
        f"{killed} backends terminated; of {users * turns} turns {len(tally.ends)} ended "
        f"({failed} failed), {len(tally.raised)} raised: {dict(tally.raised_kinds())}; "
        f"jobs {counts}"
    )
    assert len(tally.ends) + len(tally.raised) == users * turns, "every turn ended or raised"
    assert (counts.pending, counts.running, counts.failed) == (0, 0, 0)
    # The one thing allowed to be missing: the outcome of a turn whose caller got a
    # DatabaseError before the reply could be stored twice over (the agent retries once).
    assert set(orphan_contents) <= set(tally.raised), (orphan_contents, tally.raised)
    others = [p for p in report.problems if not p.startswith("turn without an outcome")]
    assert others == [], others
    assert report.unstored_acknowledged == 0


async def test_reply_write_hitting_a_dropped_connection_still_records_an_outcome(
    settings: Settings, database_dsn: str
) -> None:
    async with open_runtime(settings, run_workers=False) as rt:
        storing = asyncio.Event()
        go_on = asyncio.Event()

        async def hook(scope: UserScope, user_message: Message) -> FollowUp:
            # Inside the transaction that stores the reply: hold it while PostgreSQL
            # drops every connection, then carry on as the runtime's hook does.
            storing.set()
            await go_on.wait()
            return await memory_job_with_reply(scope, user_message)

        agent = Agent(rt.store, rt.model, rt.settings, with_reply=hook)
        sid = await _new_session(rt, "alice")
        turn = asyncio.create_task(agent.run("alice", sid, "Hello there."))
        await storing.wait()
        assert await _terminate_backends(database_dsn) > 0
        go_on.set()
        try:
            end: TurnEnd | None = await turn
        except DatabaseError:
            end = None
        report = await audit_invariants(rt.db)
    _report("reply write on a dropped connection", report)
    # The pool reconnects at once, so the outcome could have been stored.
    assert report.turns_without_outcome == 0, report.problems
    assert end is not None


async def test_connection_lost_at_release_is_a_database_error(
    db: Database, database_dsn: str
) -> None:
    # The window is one event-loop turn wide; a few rounds make missing it negligible.
    errors: list[BaseException] = []
    for _ in range(5):
        errors += await _release_killed_connections(db, database_dsn)
        if not all(isinstance(e, DatabaseError) for e in errors):
            break
    print(f"\nreleasing killed connections raised {Counter(type(e).__name__ for e in errors)}")
    # The engine promises DatabaseError (or nothing: the work was done) for a lost
    # connection; anything else kills callers that only expect MemchatError.
    assert all(isinstance(e, DatabaseError) for e in errors), errors


async def _release_killed_connections(db: Database, superuser_dsn: str) -> list[BaseException]:
    # Ten connections, used and idle, as between a claim and its release.
    holds = [db.unscoped() for _ in range(10)]
    conns = [await hold.__aenter__() for hold in holds]
    for conn in conns:
        assert await conn.fetchval("SELECT 1") == 1
    superuser = await asyncpg.connect(superuser_dsn)
    errors: list[BaseException] = []
    try:
        await superuser.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        # Not a wait for anything: this models an event loop busy for a moment under
        # load, so that each killed backend's goodbye (an error message, then end of
        # stream) is already in its socket when the loop next reads.
        time.sleep(0.3)  # noqa: ASYNC251
        # One loop turn reads the error messages; in the next, before the end of
        # stream is seen, the first connection goes back to the pool.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for hold in holds:
            try:
                await hold.__aexit__(None, None, None)
            except Exception as exc:
                errors.append(exc)
    finally:
        await superuser.close()
    return errors


# -- 3. processes killed with SIGKILL ----------------------------------------------


async def test_cli_killed_mid_turn_leaves_exactly_one_turn_without_outcome(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    env = {"OPENAI_BASE_URL": fake.base_url, "MEMCHAT_MODEL__MAX_RETRIES": "0"}
    fake.first_token_latency = 60.0  # the reply never comes before the kill
    proc = _cli(database_dsn, "chat", "--user", "victim", "Remember that I like kites.", env=env)
    try:
        assert await asyncio.to_thread(fake.wait_for_requests, 1, 60), "no chat request"
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.communicate)
    assert proc.returncode == -signal.SIGKILL

    settings = make_settings(tmp_path, database={"url": database_dsn, "pool_max_size": 5})
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope("victim") as s:
            (session,) = await s.list_sessions()
            messages = await s.last_messages(session.session_id, 10)
        assert [(m.role, m.content) for m in messages] == [
            ("user", "Remember that I like kites.")
        ], "the user message was stored before the model was asked"
        crashed = messages[0].message_id
        report = await audit_invariants(rt.db, acknowledged={"victim": [crashed]})
    _report("killed mid-turn", report)
    assert report.orphaned_turns == (("victim", crashed),)
    assert report.turns_without_outcome == 1 and len(report.problems) == 1, report.problems

    # Restarted: the next process works, and the crash is still the only finding.
    fake.first_token_latency = 0.0
    again = _cli(database_dsn, "chat", "--user", "victim", "I also like tea.", env=env)
    out, err = await asyncio.to_thread(again.communicate)
    assert again.returncode == 0, err
    assert "Echo: I also like tea." in out
    async with open_runtime(settings, run_workers=False) as rt:
        assert await rt.dispatcher.wait_idle(["victim"], within=IDLE_WITHIN)
        async with rt.store.scope("victim") as s:
            memories = sorted(m.content for m in await s.list_memories())
        report = await audit_invariants(rt.db, acknowledged={"victim": [crashed]})
    _report("after restart", report)
    assert memories == ["I also like tea."]
    assert report.orphaned_turns == (("victim", crashed),)
    assert len(report.problems) == 1, report.problems


async def test_worker_killed_mid_job_then_restarted_keeps_invariants(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    # The kill itself is test_memory_jobs.py::test_worker_killed_mid_job_is_retried_exactly_once;
    # here the whole audit runs over the result.
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 5},
        memory={"retry_delay": 0.01, "lease_seconds": 1, "concurrency": 1},
    )
    tally = Tally()
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _new_session(rt, "alice")
        await _turn(rt, "alice", sid, "My name is Alice and I like tea.", tally)
        fake.first_token_latency = 60.0
        proc = _cli(
            database_dsn,
            "worker",
            env={"OPENAI_BASE_URL": fake.base_url, "MEMCHAT_MEMORY__LEASE_SECONDS": "1"},
        )
        try:
            assert await asyncio.to_thread(fake.wait_for_requests, 1, 60), "no extraction"
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.communicate)
        # The dead worker's lease (1 s) runs out; requeue it as any live process would.
        # A bounded poll: expiry is a clock, not an event.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            async with rt.db.queue() as conn:
                if await conn.fetchval("SELECT memchat_requeue_expired_jobs()"):
                    break
            assert loop.time() < deadline, "the dead worker's lease never expired"
            await asyncio.sleep(0.1)
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(["alice"], within=IDLE_WITHIN)
        async with rt.store.scope("alice") as s:
            (job,) = await JobQueue.list_jobs(s)
        report = await audit_invariants(rt.db, acknowledged=tally.acknowledged)
    _report("worker killed mid-job", report)
    assert (job.status, job.attempts) == ("done", 2)
    report.assert_ok()


# -- 4. more users than connections -----------------------------------------------


async def test_five_hundred_users_on_ten_connections(tmp_path: Path, database_dsn: str) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 10},
        memory={"retry_delay": 0.01, "drain_timeout": 10},
    )
    async with open_runtime(settings) as rt:
        result = await run_load(rt, users=500, sessions=1, turns=2, wait_within=IDLE_WITHIN)
        counts = await job_counts(rt.db)
        report = await audit_invariants(rt.db)
    _report("500 users / 10 connections", report)
    print(f"500 users x 2 turns on 10 connections: {result.wall_s:.1f}s")
    assert result.runs == 1000 and result.failed_turns == 0
    assert (result.leaks, result.lost, result.duplicates, result.failed_jobs) == (0, 0, 0, 0)
    assert (counts.pending, counts.running, counts.failed, counts.done) == (0, 0, 0, 1000)
    assert report.messages == 2000 and report.users == 500
    report.assert_ok()
