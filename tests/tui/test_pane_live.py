"""The pane over the conversation service: regenerate in place, live messages from
another process, retry feedback, the inspector refreshing itself.

Pilot against the real engine: real PostgreSQL, the offline model or the real
openai client over HTTP to the fake server, and `memchat chat` as a real
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine.config import Settings
from engine.errors import MemchatError
from engine.store import MESSAGE_CHANNEL
from tests.tui.conftest import AppFactory, wait_until
from tui.app import MemchatApp
from tui.screens.inspector import InspectorScreen
from tui.widgets.messages import AssistantMessage, TurnError, UserMessage
from tui.widgets.pane import UserPane

pytestmark = pytest.mark.db

USER = "alice@example.com"


def pane(app: MemchatApp) -> UserPane:
    found = app.pane_of(USER)
    assert found is not None
    return found


def texts(p: UserPane) -> list[tuple[str, str]]:
    """What the transcript shows, in order: (kind, text)."""
    shown: list[tuple[str, str]] = []
    for child in p.messages.children:
        if isinstance(child, UserMessage):
            shown.append(("user", str(child.render())))
        elif isinstance(child, AssistantMessage):
            shown.append(("assistant", child.source))
        elif isinstance(child, TurnError):
            shown.append(("error", str(child.render())))
    return shown


async def finish_turns(app: MemchatApp) -> None:
    turns = [w for w in app.workers if w.group == "turn"]
    if turns:
        await app.workers.wait_for_complete(turns)


async def stored(app: MemchatApp) -> list[tuple[int, str, str, str]]:
    p = pane(app)
    assert app.runtime is not None and p.session is not None
    async with app.runtime.store.scope(USER) as s:
        rows = await s.last_messages(p.session.session_id, 100)
    return [(m.message_id, m.role, m.status, m.content) for m in rows]


async def test_ctrl_r_regenerates_the_last_reply_in_place(
    make_app: AppFactory, tui_settings: Settings
) -> None:
    """Bug 13: ctrl+r sent the message again as a new turn (shown and stored twice)."""
    with FakeOpenAI() as fake:
        tui_settings.model.provider = "openai"
        tui_settings.model.base_url = fake.base_url
        tui_settings.model.max_retries = 0
        app = make_app([USER])
        async with app.run_test(size=(160, 48)) as pilot:
            await app.ready.wait()
            alice = pane(app)
            await pilot.press(*"hello", "enter")
            await finish_turns(app)
            before = await stored(app)
            assert [(r, c) for _, r, _, c in before] == [
                ("user", "hello"),
                ("assistant", "Echo: hello"),
            ]
            # The memory job asks the same server: let it finish before the fault.
            assert app.runtime is not None
            assert await app.runtime.dispatcher.wait_idle(within=30)
            fake.fail_next("500")
            await pilot.press("ctrl+r")
            await finish_turns(app)
            # The failed regeneration replaced the reply; ctrl+r again answers anew.
            assert [k for k, _ in texts(alice)] == ["user", "assistant", "error"]
            await pilot.press("ctrl+r")
            await finish_turns(app)
            assert await app.runtime.dispatcher.wait_idle(within=30)
            after = await stored(app)
            assert [(r, s, c) for _, r, s, c in after] == [
                ("user", "complete", "hello"),
                ("assistant", "complete", "Echo: hello"),
            ]
            assert after[0][0] == before[0][0], "the same user message"
            assert after[1][0] not in (before[1][0],), "a new reply in place of the old"
            assert texts(alice) == [("user", "hello"), ("assistant", "Echo: hello")]
            assert alice.query(AssistantMessage).last().message_id == after[1][0]
            # Every chat request asked the same question, never with the message twice.
            for request in fake.requests:
                if request.get("stream"):
                    users = [m["content"] for m in request["messages"] if m["role"] == "user"]
                    assert users == ["hello"], request


async def test_a_message_written_by_another_process_appears_in_the_open_pane(
    make_app: AppFactory, database_dsn: str, tmp_path: Path
) -> None:
    """Bug 14: messages written by the CLI appeared only after reopening the session."""
    app = make_app([USER])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        alice = pane(app)
        assert alice.session is not None
        config = tmp_path / "cli.toml"
        config.write_text("")
        env = {
            **os.environ,
            "MEMCHAT_CONFIG": str(config),
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__PROVIDER": "offline",
            "MEMCHAT_MODEL__OFFLINE_TOKEN_DELAY_MS": "0",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.cli",
            "chat",
            "--user",
            USER,
            "--session",
            str(alice.session.session_id),
            "written by the CLI",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        await wait_until(lambda: len(texts(alice)) == 2)
        shown = texts(alice)
        assert shown[0] == ("user", "written by the CLI")
        assert shown[1][0] == "assistant" and shown[1][1].strip() == out.decode().strip()
        # The session got its title from that first message: the pane says so.
        await wait_until(
            lambda: alice.session is not None and alice.session.title == "written by the CLI"
        )
        # And the pane's own turn still shows each message once.
        worker = alice.send("and one from the pane")
        assert worker is not None
        await worker.wait()
        await asyncio.sleep(0)  # let the NOTIFYs of this turn arrive too
        await wait_until(lambda: not alice._sync_wanted)
        kinds = [k for k, _ in texts(alice)]
        assert kinds == ["user", "assistant", "user", "assistant"], texts(alice)


async def test_retries_show_in_the_pane_title(make_app: AppFactory, tui_settings: Settings) -> None:
    """Retry feedback: while the client retries, the title says so."""
    with FakeOpenAI(first_token_latency=1.5) as fake:
        tui_settings.model.provider = "openai"
        tui_settings.model.base_url = fake.base_url
        tui_settings.model.max_retries = 2
        app = make_app([USER])
        async with app.run_test(size=(160, 48)) as pilot:
            await app.ready.wait()
            alice = pane(app)
            fake.fail_next("500", retry_after=0.01)
            await pilot.press(*"anyone there", "enter")
            title = alice.query_one(".pane-title")
            await wait_until(lambda: "retrying 1/2…" in str(title.render()))
            await finish_turns(app)
            assert "retrying" not in str(title.render())
            assert texts(alice)[-1] == ("assistant", "Echo: anyone there")


async def test_a_failed_pane_read_is_one_toast_from_the_app(make_app: AppFactory) -> None:
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app)
        alice.post_message(UserPane.WorkerFailed(alice, MemchatError("the database went away")))
        await pilot.pause()
        toasts = [n for n in app._notifications if "went away" in str(n.message)]
        assert len(toasts) == 1 and toasts[0].title == USER


async def test_the_inspector_refreshes_itself(make_app: AppFactory) -> None:
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("f3")
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        await wait_until(lambda: screen.overview is not None)
        assert app.runtime is not None
        async with app.runtime.store.scope(USER) as s:
            await s.add_memory("Plays the oboe")

        def shows_it() -> bool:
            users = screen.overview or []
            return any("Plays the oboe" in m.content for u in users for m in u.memories)

        await wait_until(shows_it)  # no r pressed


async def test_forged_message_notifications_change_nothing_shown(
    make_app: AppFactory, database_dsn: str
) -> None:
    """A NOTIFY only says "look again": the pane believes what the user's scope reads."""
    app = make_app([USER])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        alice = pane(app)
        worker = alice.send("hello")
        assert worker is not None
        await worker.wait()
        assert alice.session is not None
        sid = str(alice.session.session_id)
        reply_id = alice.query(AssistantMessage).last().message_id
        forger = await asyncpg.connect(database_dsn)
        try:
            for payload in (
                {"user_id": USER, "session_id": sid, "message_id": reply_id, "op": "delete"},
                {
                    "user_id": USER,
                    "session_id": sid,
                    "message_id": 10**9,
                    "op": "insert",
                    "content": "EVIL",
                },
            ):
                await forger.execute(
                    "SELECT pg_notify($1, $2)", MESSAGE_CHANNEL, json.dumps(payload)
                )
        finally:
            await forger.close()
        # A real message written after the forged ones: once it shows, they were handled.
        assert app.runtime is not None
        async with app.runtime.store.scope(USER) as s:
            await s.append_message(sid, "user", "a real one")
        await wait_until(lambda: ("user", "a real one") in texts(alice))
        shown = texts(alice)
        assert [k for k, _ in shown] == ["user", "assistant", "user"], shown
        assert alice.query(AssistantMessage).last().message_id == reply_id
        assert not any("EVIL" in text for _, text in shown)
