"""Red team: a ``memchat worker`` process killed with SIGKILL in the middle of a chain.

Settling a job claims its user's next one in the same statement (engine/queue.py
SETTLE_AND_CLAIM_NEXT): the worker then holds a job no dispatcher claim ever
handed out. Killed while running it, that job must come back once its lease
ends (not be stranded "running"), run once more, and its user's later job
after it. A real process, the real HTTP fake server, real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI, Fault
from engine.admin import CHECK_RLS, AdminReader
from engine.audit import INVARIANT_CHECKS
from engine.models import OfflineChatModel
from engine.queue import JobQueue
from engine.runtime import open_runtime
from tests.conftest import make_settings

pytestmark = [pytest.mark.db, pytest.mark.slow]


def _worker(dsn: str, base_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker"],
        env={
            **os.environ,
            "MEMCHAT_DATABASE__URL": dsn,
            "MEMCHAT_CONFIG": os.devnull,
            "OPENAI_BASE_URL": base_url,
            "MEMCHAT_MODEL__PROVIDER": "openai",
            "MEMCHAT_MODEL__API_KEY": "sk-test-4f9a1c2e7b",
            "MEMCHAT_MODEL__TIMEOUT": "120",
            "MEMCHAT_MEMORY__EXTRACTION": "tools",
            "MEMCHAT_MEMORY__COALESCE_TURNS": "1",
            "MEMCHAT_MEMORY__LEASE_SECONDS": "1",
        },
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_worker_killed_mid_chain_strands_no_job(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second extraction (the chained job's) never gets an answer.
    record = fake._record
    extractions = 0

    def hang_the_second_extraction(body: dict[str, Any]) -> Any:
        nonlocal extractions
        number, fault, queued = record(body)
        if body.get("tools"):
            extractions += 1
            if extractions == 2:
                return number, Fault("timeout"), queued
        return number, fault, queued

    monkeypatch.setattr(fake, "_record", hang_the_second_extraction)
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={"provider": "offline"},
        memory={"extraction": "tools", "retry_delay": 0.01, "coalesce_turns": 1},
    )
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope("alice") as s:
            sid = (await s.create_session("chain")).session_id
        for text in ("My name is Alice.", "I like tea.", "I live in Lisbon."):
            await rt.agent.run("alice", sid, text)
        proc = _worker(database_dsn, fake.base_url)
        try:
            assert await asyncio.to_thread(fake.wait_for_requests, 2, 60), proc.stderr
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        async with rt.store.scope("alice") as s:
            killed = sorted(await JobQueue.list_jobs(s), key=lambda j: j.job_id)
        # The first settled, and its settle claimed the second (the chain): the
        # killed worker held it, the third waits behind it.
        assert [j.status for j in killed] == ["done", "running", "pending"]
        assert killed[1].worker == killed[0].worker
        # This process takes over once the dead worker's lease on it has ended.
        rt.dispatcher.manager.model = OfflineChatModel()
        rt.dispatcher._last_requeue = -1e9
        rt.dispatcher.start()
        assert await rt.dispatcher.wait_idle(["alice"], within=60)
        async with rt.store.scope("alice") as s:
            jobs = sorted(await JobQueue.list_jobs(s), key=lambda j: j.job_id)
        checks = [c for c in INVARIANT_CHECKS if c != CHECK_RLS]
        audit = await AdminReader(rt.db).run_checks(*checks)
    assert [j.status for j in jobs] == ["done"] * 3
    # The chained job: claimed by the chain, then once more after the kill.
    assert [j.attempts for j in jobs] == [1, 2, 1]
    assert extractions == 2, "the worker made no third call: it died holding the second"
    assert audit.ok, [str(f) for c in audit.failed for f in c.findings]


async def test_stop_cancelling_a_chained_job_gives_it_back_at_once(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() running out of drain time while the chain's job hangs in the model:
    that job (claimed by a settle, not by the dispatcher) is pending again at once,
    not "running" until its lease ends."""
    record = fake._record
    extractions = 0
    second = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hang_the_second_extraction(body: dict[str, Any]) -> Any:
        nonlocal extractions
        number, fault, queued = record(body)
        if body.get("tools") and not body.get("tool_choice"):
            extractions += 1
            if extractions == 2:
                loop.call_soon_threadsafe(second.set)
                return number, Fault("timeout"), queued
        return number, fault, queued

    monkeypatch.setattr(fake, "_record", hang_the_second_extraction)
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": "sk-test-4f9a1c2e7b"},
        memory={
            "extraction": "tools",
            "coalesce_turns": 1,
            "lease_seconds": 600,
            "drain_timeout": 0.5,
        },
    )
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope("alice") as s:
            sid = (await s.create_session("chain")).session_id
        for text in ("My name is Alice.", "I like tea.", "I live in Lisbon."):
            await rt.agent.run("alice", sid, text)
        rt.dispatcher.start()
        await asyncio.wait_for(second.wait(), timeout=60)
        await rt.dispatcher.stop()
        async with rt.store.scope("alice") as s:
            jobs = sorted(await JobQueue.list_jobs(s), key=lambda j: j.job_id)
    assert [j.status for j in jobs] == ["done", "pending", "pending"]
