"""The app, driven with Pilot against the real engine (offline model, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncpg
import pytest
from textual.widgets import ListView

from bench.fake_openai import FakeOpenAI
from engine.config import Settings, load_settings
from engine.records import Memory
from tests.tui.conftest import AppFactory, wait_until
from tui.app import MemchatApp, StatusBar
from tui.screens.dialogs import PromptDialog, SessionPicker
from tui.screens.help import HelpScreen
from tui.widgets.messages import (
    AssistantMessage,
    EmptyHint,
    OlderMessages,
    TurnError,
    UserMessage,
)
from tui.widgets.pane import UserPane

pytestmark = pytest.mark.db

USERS = ["alice@example.com", "bob@example.com", "carol@example.com"]


def pane(app: MemchatApp, user_id: str) -> UserPane:
    found = app.pane_of(user_id)
    assert found is not None, user_id
    return found


def sidebar_texts(p: UserPane) -> list[str]:
    return [m.content for m in p.sidebar._memories]


def replies(p: UserPane) -> list[AssistantMessage]:
    return list(p.query(AssistantMessage))


async def finish_turns(app: MemchatApp) -> None:
    turns = [w for w in app.workers if w.group == "turn"]
    if turns:  # an empty list would mean "every worker", the endless ones too
        await app.workers.wait_for_complete(turns)


async def test_start_shows_a_pane_per_user_and_focuses_the_first_input(
    make_app: AppFactory,
) -> None:
    app = make_app(USERS)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        assert [p.user_id for p in app.panes] == USERS
        assert app.focused is pane(app, USERS[0]).input
        status = str(app.query_one(StatusBar).render())
        assert "offline model" in status and "PostgreSQL" in status
        assert "memory jobs running: 0" in status
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_two_panes_stream_at_once_and_both_complete(
    make_app: AppFactory, tui_settings
) -> None:
    # A reply lasts seconds, so the two overlap even on a loaded machine
    # (400 ms a token was not enough with the cores busy elsewhere).
    tui_settings.model.offline_token_delay_ms = 900
    app = make_app(USERS[:2])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice, bob = pane(app, USERS[0]), pane(app, USERS[1])
        alice.input.value = "My name is Alice."
        await pilot.press("enter")
        assert alice.busy, (alice.input.value, replies(alice))
        await pilot.press("f9")
        assert app.focused is bob.input
        bob.input.value = "My name is Bob."
        await pilot.press("enter")
        assert alice.busy and bob.busy, "both replies stream at the same time"
        await finish_turns(app)
        assert "Alice" in replies(alice)[-1].source
        assert "Bob" in replies(bob)[-1].source
        await wait_until(lambda: "Name is Alice" in sidebar_texts(alice))
        await wait_until(lambda: "Name is Bob" in sidebar_texts(bob))
        assert "Name is Bob" not in sidebar_texts(alice)


async def test_switching_users_by_key(make_app: AppFactory) -> None:
    app = make_app(USERS)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("alt+3")
        assert app.focused is pane(app, USERS[2]).input
        await pilot.press("f9")
        assert app.focused is pane(app, USERS[0]).input
        await pilot.press("f8")
        assert app.focused is pane(app, USERS[2]).input
        await pilot.press("f2")
        assert app.layout_mode == "focus"
        assert [p.display for p in app.panes] == [False, False, True]
        await pilot.press("f2")
        assert all(p.display for p in app.panes)


async def test_add_and_close_a_user(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, PromptDialog)
        await pilot.press(*"dave@example.com")
        await pilot.press("enter")
        await wait_until(lambda: app.pane_of("dave@example.com") is not None)
        dave = pane(app, "dave@example.com")
        await dave.ready.wait()
        assert app.focused is dave.input
        await pilot.press("ctrl+n")
        await pilot.press(*"bad id!")
        await pilot.press("enter")
        assert app.pane_of("bad id!") is None
        await app.action_close_pane()
        assert [p.user_id for p in app.panes] == [USERS[0]]


async def test_sessions_new_rename_switch(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        first = alice.session
        await pilot.press(*"first session words")
        await pilot.press("enter")
        await finish_turns(app)
        await pilot.press("ctrl+t")
        await wait_until(lambda: alice.session is not None and alice.session != first)
        assert replies(alice) == []
        await pilot.press("f6")
        assert isinstance(app.screen, PromptDialog)
        await pilot.press(*"Renamed")
        await pilot.press("enter")
        await wait_until(lambda: alice.session is not None and alice.session.title == "Renamed")
        await pilot.press("ctrl+o")
        await wait_until(lambda: isinstance(app.screen, SessionPicker))
        picker = app.screen
        assert isinstance(picker, SessionPicker)
        assert [s.title for s in picker.sessions] == ["Renamed", "first session words"]
        await pilot.press("down", "enter")
        await wait_until(lambda: alice.session is not None and alice.session.title != "Renamed")
        await alice.ready.wait()
        await wait_until(lambda: len(replies(alice)) == 1)


async def test_empty_pane_says_how_to_start_until_its_first_message(
    make_app: AppFactory,
) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        hint = alice.query_one(EmptyHint)
        await wait_until(lambda: hint.display)
        assert f"Say hi as {USERS[0]}" in str(hint.render())
        assert "F4 plays the demo" in str(hint.render())
        await pilot.press(*"hello there", "enter")
        assert not hint.display, "the first message takes the hint away at once"
        await finish_turns(app)
        assert not hint.display
        await pilot.press("ctrl+t")  # a new, empty session: the hint is back
        await wait_until(lambda: replies(alice) == [] and hint.display)
        await pilot.press("ctrl+o")
        await wait_until(lambda: isinstance(app.screen, SessionPicker))
        await pilot.press("down", "enter")  # the older session, with its messages
        await wait_until(lambda: len(replies(alice)) == 1)
        await wait_until(lambda: not hint.display)


async def test_escape_cancels_a_streaming_reply(make_app: AppFactory, tui_settings) -> None:
    tui_settings.model.offline_token_delay_ms = 200
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        await pilot.press(*"Tell me a long story please")
        await pilot.press("enter")
        await wait_until(lambda: bool(replies(alice)) and bool(replies(alice)[-1].source))
        await pilot.press("escape")
        await finish_turns(app)
        assert not alice.busy
        assert replies(alice)[-1].has_class("-cancelled")
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            stored = await s.last_messages(alice.session.session_id, 5)  # type: ignore[union-attr]
        assert [m.status for m in stored] == ["complete", "cancelled"]


async def test_sidebar_follows_changes_made_outside_the_app(
    make_app: AppFactory, database_dsn: str
) -> None:
    app = make_app(USERS[:2])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        env = {**os.environ, "MEMCHAT_DATABASE__URL": database_dsn, "MEMCHAT_CONFIG": os.devnull}
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engine.cli", "memory", "add", "--user", USERS[1], "Likes tea"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        bob = pane(app, USERS[1])
        await wait_until(lambda: sidebar_texts(bob) == ["Likes tea"])
        assert sidebar_texts(pane(app, USERS[0])) == []


async def test_delete_memory_from_the_sidebar_asks_first(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            memory = await s.add_memory("Likes chess")
        assert isinstance(memory, Memory)
        await wait_until(lambda: sidebar_texts(alice) == ["Likes chess"])
        alice.sidebar.query_one("ListView").focus()
        await pilot.press("delete")
        await pilot.press("escape")  # no: nothing happens
        assert sidebar_texts(alice) == ["Likes chess"]
        await pilot.press("delete")
        await pilot.press("shift+tab", "enter")  # the Forget button, deliberately
        await wait_until(lambda: sidebar_texts(alice) == [])


async def test_reply_text_is_shown_literally(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        alice = pane(app, USERS[0])
        worker = alice.send("\x1b[2J\x1b]0;pwned\x07 [bold]hi[/bold] `code`")
        assert worker is not None
        await worker.wait()
        user = alice.query(UserMessage).last()
        shown = str(user.render())
        assert "\\x1b[2J" in shown and "[bold]hi[/bold]" in shown
        assert "\x1b" not in shown and "\x07" not in shown
        reply = replies(alice)[-1].source
        assert "\x1b" not in reply and "[bold]hi[/bold]" in reply


async def test_failed_turn_shows_error_and_retries(make_app: AppFactory, tui_settings) -> None:
    with FakeOpenAI() as fake:
        tui_settings.model.provider = "openai"
        tui_settings.model.base_url = fake.base_url
        tui_settings.model.max_retries = 0
        app = make_app(USERS[:1])
        async with app.run_test(size=(160, 48)) as pilot:
            await app.ready.wait()
            alice = pane(app, USERS[0])
            fake.fail_next("500")
            await pilot.press(*"hello")
            await pilot.press("enter")
            await finish_turns(app)
            assert alice.query(TurnError)
            assert replies(alice)[-1].has_class("-failed")
            await pilot.press("ctrl+r")
            await finish_turns(app)
            assert replies(alice)[-1].source == "Echo: hello"
            # Regenerated in place (bug 13): the message once, one reply, no error line.
            assert [str(m.render()) for m in alice.query(UserMessage)] == ["hello"]
            assert len(replies(alice)) == 1 and not alice.query(TurnError)


async def test_long_session_mounts_only_its_end(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        alice = pane(app, USERS[0])
        assert alice.session is not None
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            await s.conn.execute(
                "INSERT INTO messages (session_id, user_id, role, content) "
                "SELECT $1, $2, CASE WHEN i % 2 = 0 THEN 'user' ELSE 'assistant' END, "
                "'message ' || i FROM generate_series(1, 2000) i",
                alice.session.session_id,
                USERS[0],
            )
        alice.ready.clear()
        alice.load_session(alice.session.session_id)
        await alice.ready.wait()
        shown = len(alice.query(".message"))
        assert shown == 50
        marker = alice.query_one(OlderMessages)
        assert marker.count == 1950
        await alice.load_older()
        assert len(alice.query(".message")) == 100 and marker.count == 1900
        first = alice.messages.children[1]
        assert isinstance(first, UserMessage | AssistantMessage)


async def test_demo_mode_plays_the_seed_into_three_panes(make_app: AppFactory) -> None:
    app = make_app(None, play="seed")
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        await app.demo.finished.wait()
        assert app.runtime is not None
        assert await app.runtime.dispatcher.wait_idle(within=30)
        mark = pane(app, "seed-1@example.com")
        await wait_until(lambda: "Name is Mark Gonzales" in sidebar_texts(mark))
        jane = pane(app, "seed-3@example.com")
        await wait_until(lambda: "Name is Jane Smith" in sidebar_texts(jane))
        assert not any("Mark" in m for m in sidebar_texts(jane))


async def test_input_keeps_text_when_refused(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("space", "enter")
        alice = pane(app, USERS[0])
        assert not alice.busy and replies(alice) == []
        assert pane(app, USERS[0]).input.value == " "


async def test_quit_drains_and_exits(make_app: AppFactory) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press(*"My name is Quinn.")
        await pilot.press("enter")
        await finish_turns(app)
        runtime = app.runtime
        assert runtime is not None
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_demo_can_be_paused_resumed_and_stopped(make_app: AppFactory) -> None:
    app = make_app(None, play="seed", demo_char_delay=0.01)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        assert app.demo.running
        await pilot.press("f4")
        assert app.demo.paused
        typed = [p.input.value for p in app.panes]
        await pilot.pause()
        assert [p.input.value for p in app.panes] == typed, "nothing is typed while paused"
        await pilot.press("f4")
        assert not app.demo.paused
        await pilot.press("shift+f4")
        await app.demo.finished.wait()
        assert not app.demo.running


async def test_title_follows_the_first_message_and_f7_names_it(make_app: AppFactory) -> None:
    """Bug 9: the title stayed "New session"; F7 asked about "this session"."""
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        await pilot.press(*"Plans for the weekend", "enter")
        await finish_turns(app)
        await wait_until(lambda: alice.session is not None and alice.session.title is not None)
        assert "Plans for the weekend" in str(alice.query_one(".pane-title").render())
        await pilot.press("f7")
        await wait_until(lambda: app.screen.__class__.__name__ == "ConfirmDialog")
        assert "Plans for the weekend" in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("y")  # a letter never confirms
        assert app.screen.__class__.__name__ == "ConfirmDialog"
        await pilot.press("escape")


async def test_pane_keys_do_nothing_behind_a_dialog(make_app: AppFactory) -> None:
    """Bug 7: F2 under a dialog switched the layout behind it; focus was lost after."""
    app = make_app(USERS[:2])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("f1")
        await pilot.press("f2", "f9")
        assert app.layout_mode == "grid"
        await pilot.press("escape")
        assert app.focused is pane(app, USERS[0]).input
        await pilot.press("f3")
        await pilot.press("f2")
        assert app.layout_mode == "grid"


async def test_a_session_deleted_elsewhere_does_not_strand_the_pane(
    make_app: AppFactory,
) -> None:
    """Bug 8: every send failed with "no session …", and ctrl+r repeated it."""
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        assert alice.session is not None
        gone = alice.session.session_id
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            await s.delete_session(gone)
        await pilot.press(*"still here", "enter")
        await wait_until(lambda: alice.session is not None and alice.session.session_id != gone)
        await wait_until(lambda: any(m.source for m in replies(alice)) and not alice.busy)
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            stored = await s.last_messages(alice.session.session_id, 5)  # type: ignore[union-attr]
        assert [m.content for m in stored if m.role == "user"] == ["still here"]


async def test_job_status_row_hidden_until_a_job_and_outcome_labels_show(
    make_app: AppFactory, tui_settings
) -> None:
    """Bug 11 (blank row under "Memories") and bug 12 (no "cancelled" label)."""
    tui_settings.model.offline_token_delay_ms = 200
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        assert not alice.sidebar.query_one(".job-status").display
        await pilot.press(*"Tell me a long story please", "enter")
        await wait_until(lambda: bool(replies(alice)) and bool(replies(alice)[-1].source))
        await pilot.press("escape")
        await finish_turns(app)
        reply = replies(alice)[-1]
        assert reply.border_subtitle == "cancelled"
        assert reply.styles.border_bottom[0] != "", "the label needs a bottom border to show"


async def test_f7_while_streaming_says_why(make_app: AppFactory, tui_settings) -> None:
    """Bug 15: F7 during a reply did nothing, without a word."""
    tui_settings.model.offline_token_delay_ms = 200
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press(*"Tell me a long story please", "enter")
        await pilot.press("f7")
        await wait_until(lambda: any("deleting" in str(n.message) for n in app._notifications))
        await pilot.press("escape")
        await finish_turns(app)


async def test_stopping_the_demo_leaves_no_half_typed_line(make_app: AppFactory) -> None:
    """Bug 15: shift+F4 left the demo's half-typed line in the prompt."""
    app = make_app(None, play="seed", demo_char_delay=0.05)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await wait_until(lambda: any(p.input.value for p in app.panes))
        await pilot.press("shift+f4")
        await app.demo.finished.wait()
        assert [p.input.value for p in app.panes] == ["", "", ""]


async def test_screenshot_without_a_downloads_directory(
    make_app: AppFactory, tmp_path, monkeypatch
) -> None:
    """Bug 17: the screenshot failed without a reason when ~/Downloads was missing."""
    monkeypatch.setenv("XDG_DOWNLOAD_DIR", str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    app = make_app(USERS[:1])
    async with app.run_test(size=(100, 30)):
        await app.ready.wait()
        app.action_screenshot()
        assert list(tmp_path.glob("*.svg"))
        await wait_until(lambda: any("Screenshot saved" in n.message for n in app._notifications))


async def test_scrolling_up_keeps_loading_and_keeps_the_place(make_app: AppFactory) -> None:
    """Bug 5: older messages stalled after one page; the view jumped to its top."""
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        assert alice.session is not None
        async with app.runtime.store.scope(USERS[0]) as s:  # type: ignore[union-attr]
            await s.conn.execute(
                "INSERT INTO messages (session_id, user_id, role, content) "
                "SELECT $1, $2, CASE WHEN i % 2 = 0 THEN 'user' ELSE 'assistant' END, "
                "'message ' || i FROM generate_series(1, 300) i",
                alice.session.session_id,
                USERS[0],
            )
        alice.ready.clear()
        alice.load_session(alice.session.session_id)
        await alice.ready.wait()
        marker = alice.query_one(OlderMessages)
        assert marker.count == 250
        await pilot.pause()
        alice.messages.scroll_home(animate=False, immediate=True)
        await wait_until(lambda: marker.count == 200)
        await wait_until(lambda: alice.messages.scroll_y > 0)  # still where the reader was
        alice.messages.scroll_home(animate=False, immediate=True)
        await wait_until(lambda: marker.count == 150)


async def test_second_f4_says_the_demo_ran_and_types_nothing(make_app: AppFactory) -> None:
    """Bug 15: F4 after the demo appended the whole seed script again to its sessions."""
    app = make_app(None, play="seed", demo_char_delay=0.001)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await app.demo.finished.wait()
        await finish_turns(app)
        assert app.runtime is not None

        async def counts() -> dict[str, int]:
            assert app.runtime is not None
            totals = {}
            for p in app.panes:
                async with app.runtime.store.scope(p.user_id) as s:
                    totals[p.user_id] = sum((await s.message_counts()).values())
            return totals

        before = await counts()
        assert all(before.values())
        await pilot.press("f4")
        await pilot.pause()
        assert not app.demo.running
        await wait_until(lambda: any("already ran" in str(n.message) for n in app._notifications))
        await finish_turns(app)
        assert await counts() == before


async def _fail_newest_job(dsn: str, user_id: str, error: str) -> int:
    """What a job that ran out of attempts leaves, announced as a worker would."""
    conn = await asyncpg.connect(dsn)
    try:
        job_id = await conn.fetchval(
            "UPDATE memory_jobs SET status = 'failed', last_error = $2, attempts = 3 "
            "WHERE job_id = (SELECT max(job_id) FROM memory_jobs WHERE user_id = $1) "
            "RETURNING job_id",
            user_id,
            error,
        )
        payload = json.dumps({"user_id": user_id, "job_id": job_id, "state": "failed"})
        await conn.execute("SELECT pg_notify('memchat_jobs', $1)", payload)
        return job_id
    finally:
        await conn.close()


async def _job_status(dsn: str, job_id: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT status FROM memory_jobs WHERE job_id = $1", job_id)
    finally:
        await conn.close()


def _footer_keys(app: MemchatApp) -> set[str]:
    return {b.description for (_, b, enabled, _) in app.screen.active_bindings.values() if enabled}


async def test_failed_memory_job_can_be_retried_from_the_sidebar(
    make_app: AppFactory, database_dsn: str
) -> None:
    """Bug 16: a failed memory job stayed red with no way to retry or dismiss it."""
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        await pilot.press(*"My name is Alice.", "enter")
        await finish_turns(app)
        assert app.runtime is not None
        assert await app.runtime.dispatcher.wait_idle(within=30)
        job_id = await _fail_newest_job(database_dsn, USERS[0], "the model was down")
        await wait_until(lambda: alice.sidebar.shows_failure)
        alice.sidebar.query_one(ListView).focus()
        await pilot.pause()
        assert "Retry memory job" in _footer_keys(app)
        await pilot.press("f5")
        await wait_until(lambda: any("queued again" in str(n.message) for n in app._notifications))
        assert await app.runtime.dispatcher.wait_idle(within=30)
        assert await _job_status(database_dsn, job_id) == "done"
        await wait_until(lambda: alice.sidebar.job_state == "idle")
        assert not alice.sidebar.query_one(".job-status").display
        assert "Retry memory job" not in _footer_keys(app)


async def test_failed_memory_job_line_can_be_dismissed(
    make_app: AppFactory, database_dsn: str
) -> None:
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        alice = pane(app, USERS[0])
        await pilot.press(*"My name is Alice.", "enter")
        await finish_turns(app)
        assert app.runtime is not None
        assert await app.runtime.dispatcher.wait_idle(within=30)
        job_id = await _fail_newest_job(database_dsn, USERS[0], "the model was down")
        await wait_until(lambda: alice.sidebar.shows_failure)
        status = alice.sidebar.query_one(".job-status")
        assert status.display
        alice.sidebar.query_one(ListView).focus()
        await pilot.pause()
        assert "Dismiss failure" in _footer_keys(app)
        await pilot.press("shift+f5")
        await pilot.pause()
        assert not status.display and not alice.sidebar.shows_failure
        assert await _job_status(database_dsn, job_id) == "failed", "dismissing changes nothing"
        # A newer failure shows again.
        await _fail_newest_job(database_dsn, USERS[0], "another error")
        await wait_until(lambda: alice.sidebar.shows_failure)
        assert status.display


async def test_picked_theme_is_saved_in_the_users_settings_and_applied_at_start(
    make_app: AppFactory, tui_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.config import user_config_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    mine = user_config_path()
    mine.parent.mkdir(parents=True)
    mine.write_text("[history]\nmax_messages = 7\n")
    tui_settings.config_file, tui_settings.config_how = mine, "user config dir"
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        assert app.theme != "nord"
        app.theme = "nord"  # what ctrl+p, Change theme, nord does
        await pilot.pause()
        assert any("saved in" in str(n.message) for n in app._notifications)
    assert tomllib.loads(mine.read_text()) == {
        "history": {"max_messages": 7},
        "ui": {"theme": "nord"},
    }
    tui_settings.ui.theme = load_settings(mine).ui.theme
    again = make_app(USERS[:1])
    async with again.run_test(size=(160, 48)):
        await again.ready.wait()
        assert again.theme == "nord"


async def test_picked_theme_is_never_written_to_an_implicit_config_toml(
    make_app: AppFactory, tui_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert tui_settings.config_file is not None
    here = tui_settings.config_file
    before = here.read_text()
    tui_settings.config_how = "current directory"
    app = make_app(USERS[:1])
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        app.theme = "nord"
        await pilot.pause()
        assert any("for this run only" in str(n.message) for n in app._notifications)
    assert here.read_text() == before
    assert not (tmp_path / "xdg").exists()
