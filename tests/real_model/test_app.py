"""The app (headless, driven with Pilot) against a real small model.

Type a message, see the reply stream into the pane and be stored, and wait
(on state, not on time) for the memory job to settle and the sidebar to
show what the database holds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import make_settings
from tests.real_model.conftest import DRAIN_TIMEOUT_S, Report, model_env, require_real_model
from tests.real_model.drive import SETTLED, audit
from tests.real_model.harness import LlamaServer
from tests.tui.conftest import wait_until
from tui.app import MemchatApp
from tui.widgets.messages import AssistantMessage

require_real_model()

pytestmark = [pytest.mark.real_model, pytest.mark.db]

USER = "alice@example.com"
TEXT = "My name is Alice and I like kites."
MODES = [("fc", "auto"), ("plain", "json")]


async def _rows(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("server", "extraction"), MODES, indirect=["server"], ids=[f"{s}-{m}" for s, m in MODES]
)
async def test_app_streams_a_reply_and_its_memory_job_settles(
    server: LlamaServer,
    extraction: str,
    database_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    report: Report,
) -> None:
    for name, value in model_env(server, extraction).items():
        monkeypatch.setenv(name, value)
    settings = make_settings(tmp_path, database={"url": database_dsn})
    assert settings.model.base_url == server.base_url  # the environment was read
    app = MemchatApp(
        settings, [USER], animate=False, highlight_seconds=0, demo_char_delay=0, tune_gc=False
    )
    timings: dict[str, float | None] = {}
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        pane = app.pane_of(USER)
        assert pane is not None
        assert app.focused is pane.input
        await pilot.press(*TEXT)
        assert pane.input.value == TEXT
        started = time.monotonic()
        await pilot.press("enter")

        def replies() -> list[AssistantMessage]:
            return list(pane.query(AssistantMessage))

        # Streaming: text shows while the turn is still running.
        streamed_while_busy = False

        def some_text() -> bool:
            nonlocal streamed_while_busy
            found = replies()
            if found and found[-1].source.strip():
                streamed_while_busy = pane.busy
                return True
            return False

        await wait_until(some_text, within=DRAIN_TIMEOUT_S, step=0.01)
        timings["first_text_s"] = round(time.monotonic() - started, 2)
        await wait_until(lambda: not pane.busy, within=DRAIN_TIMEOUT_S)
        timings["reply_s"] = round(time.monotonic() - started, 2)
        shown = replies()[-1].source

        async def job_settled() -> bool:
            jobs = await _rows(database_dsn, "SELECT status FROM memory_jobs")
            return bool(jobs) and all(job["status"] in SETTLED for job in jobs)

        await wait_until(job_settled, within=DRAIN_TIMEOUT_S, step=0.2)
        timings["job_settled_s"] = round(time.monotonic() - started, 2)
        jobs = await _rows(database_dsn, "SELECT * FROM memory_jobs ORDER BY job_id")
        memories = await _rows(database_dsn, "SELECT content FROM memories ORDER BY created_at")
        stored = [m["content"] for m in memories]
        # The sidebar follows the database (through NOTIFY), and the job spinner stops.
        sidebar_ok = True
        try:
            await wait_until(
                lambda: (
                    sorted(m.content for m in pane.sidebar._memories) == sorted(stored)
                    and pane.sidebar.job_state != "running"
                ),
                within=30,
            )
        except AssertionError:
            sidebar_ok = False
        sidebar = [m.content for m in pane.sidebar._memories]
        job_state = pane.sidebar.job_state
        job_error = pane.sidebar.job_error
        await asyncio.sleep(0)
    messages = await _rows(
        database_dsn, "SELECT role, content, status, error FROM messages ORDER BY message_id"
    )
    report.add(
        kind="tui",
        server=server.name,
        extraction=extraction,
        turns=[{"text": TEXT, **timings}],
        replies=[dict(m) for m in messages if m["role"] == "assistant"],
        job_states=[job["status"] for job in jobs],
        jobs=[
            {
                k: job[k]
                for k in ("job_id", "status", "attempts", "extraction", "last_error", "note")
            }
            for job in jobs
        ],
        memories=stored,
        sidebar={"memories": sidebar, "job_state": job_state, "job_error": job_error},
        problems=None,
    )

    problems = []
    if not streamed_while_busy:
        problems.append("the reply's text appeared only after the turn ended (not streamed)")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if len(assistant) != 1 or assistant[0]["status"] != "complete":
        problems.append(f"stored replies: {[dict(m) for m in assistant]}")
    elif assistant[0]["content"].strip() != shown.strip():
        problems.append(
            f"stored reply {assistant[0]['content']!r} differs from the shown {shown!r}"
        )
    if len(jobs) != 1:
        problems.append(f"{len(jobs)} memory jobs for one turn")
    for job in jobs:
        if job["status"] == "failed" and not (job["last_error"] or "").strip():
            problems.append(f"job {job['job_id']} failed without an error")
        if job["status"] == "failed" and job_state != "failed":
            problems.append(f"job {job['job_id']} failed but the sidebar shows {job_state!r}")
    problems += await audit(database_dsn, tmp_path)
    if not sidebar_ok:
        problems.append(f"sidebar shows {sidebar} (job {job_state!r}), the database holds {stored}")
    report.runs[-1]["problems"] = problems or None
    report.write()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("server", ["fc"], indirect=True)
async def test_two_panes_at_once_on_the_single_slot_server(
    server: LlamaServer,
    database_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    report: Report,
) -> None:
    """Two users send at once to a server that answers one request at a time
    (--interrupt_requests False): both replies complete, neither is cut off by the
    other, and both memory jobs settle (held while a reply streams)."""
    for name, value in model_env(server, "auto").items():
        monkeypatch.setenv(name, value)
    settings = make_settings(tmp_path, database={"url": database_dsn})
    users = ["alice@example.com", "bob@example.com"]
    texts = ["My name is Alice and I like kites.", "My name is Bob and I play the cello."]
    app = MemchatApp(
        settings, users, animate=False, highlight_seconds=0, demo_char_delay=0, tune_gc=False
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        panes = [app.pane_of(user) for user in users]
        assert all(panes)
        started = time.monotonic()
        for index, (pane, text) in enumerate(zip(panes, texts, strict=True)):
            assert pane is not None
            if index:
                await pilot.press("f9")  # the next user (ctrl+right now moves by word)
            assert app.focused is pane.input
            pane.input.value = text
            await pilot.press("enter")
        both_busy = all(p is not None and p.busy for p in panes)
        await wait_until(
            lambda: not any(p is not None and p.busy for p in panes), within=DRAIN_TIMEOUT_S
        )
        replies_s = round(time.monotonic() - started, 2)

        async def jobs_settled() -> bool:
            jobs = await _rows(database_dsn, "SELECT status FROM memory_jobs")
            return len(jobs) >= 2 and all(job["status"] in SETTLED for job in jobs)

        settled = True
        try:
            await wait_until(jobs_settled, within=DRAIN_TIMEOUT_S, step=0.2)
        except AssertionError:
            settled = False
        settled_s = round(time.monotonic() - started, 2)
    messages = await _rows(
        database_dsn, "SELECT user_id, role, status, error FROM messages ORDER BY message_id"
    )
    jobs = await _rows(database_dsn, "SELECT * FROM memory_jobs ORDER BY job_id")
    memories = await _rows(database_dsn, "SELECT user_id, content FROM memories")
    problems = []
    if not both_busy:
        problems.append("the two turns did not overlap (the first ended before the second began)")
    for user in users:
        replies = [m for m in messages if m["user_id"] == user and m["role"] == "assistant"]
        if len(replies) != 1 or replies[0]["status"] != "complete":
            problems.append(f"{user}: replies {[dict(r) for r in replies]}")
    if not settled:
        problems.append(f"jobs not settled: {[(j['job_id'], j['status']) for j in jobs]}")
    problems += await audit(database_dsn, tmp_path)
    report.add(
        kind="tui2",
        server=server.name,
        extraction="auto",
        turns=[{"text": " / ".join(texts), "reply_s": replies_s, "job_settled_s": settled_s}],
        job_states=[job["status"] for job in jobs],
        jobs=[
            {k: job[k] for k in ("job_id", "user_id", "status", "attempts", "note", "last_error")}
            for job in jobs
        ],
        memories=[f"{m['user_id']}: {m['content']}" for m in memories],
        problems=problems or None,
    )
    assert not problems, "\n".join(problems)
