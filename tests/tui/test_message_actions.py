"""Acting on messages with the keyboard (Pilot, real engine and PostgreSQL, offline model):
highlight, copy, copy a code block, raw view, export; the label and time on each message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.tui.conftest import AppFactory, wait_until
from tui.app import MemchatApp, StatusBar
from tui.screens.message_actions import ActionMenu, CodeBlockPicker, RawMarkdownScreen
from tui.widgets.messages import (
    AssistantMessage,
    FixedClock,
    MessageClock,
    MessageList,
    UserMessage,
)
from tui.widgets.pane import UserPane
from tui.widgets.prompt import Prompt

pytestmark = pytest.mark.db

USER = "alice@example.com"
REPLY = (
    "Two ways:\n\n```python\nprint('one')\n```\n\nor\n\n```sh\necho two\n```\n"
    "and [bold]not markup[/bold] \x1b[2J"
)


async def open_with_messages(app: MemchatApp, *messages: tuple[str, str]) -> UserPane:
    """Store messages in the pane's session, then show the session as a reader finds it."""
    await app.ready.wait()
    pane = app.pane_of(USER)
    assert pane is not None and pane.session is not None and app.runtime is not None
    async with app.runtime.store.scope(USER) as s:
        for role, content in messages:
            await s.append_message(pane.session.session_id, role, content)  # type: ignore[arg-type]
    pane.ready.clear()
    pane.load_session(pane.session.session_id)
    await pane.ready.wait()
    return pane


def notified(app: MemchatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_keys_move_the_highlight_and_ctrl_c_copies(make_app: AppFactory) -> None:
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        pane = await open_with_messages(
            app, ("user", "first question"), ("assistant", REPLY), ("user", "second")
        )
        listing = pane.messages
        await pilot.press("shift+tab")
        assert app.focused is listing
        shown = listing.shown_messages
        assert [type(m) for m in shown] == [UserMessage, AssistantMessage, UserMessage]
        assert listing.highlighted is shown[-1] and shown[-1].has_class("-highlight")
        await pilot.press("up")
        assert listing.highlighted is shown[1] and not shown[2].has_class("-highlight")
        await pilot.press("home")
        assert listing.highlighted is shown[0]
        await pilot.press("ctrl+c")
        assert app.clipboard == "first question"
        assert "Copied 14 characters" in notified(app)
        await pilot.press("down", "ctrl+c")
        # The reply as shown: the escape sequence made visible, not carried to the clipboard.
        assert app.clipboard == REPLY.replace("\x1b", "\\x1b")
        await pilot.press("end")
        assert listing.highlighted is shown[2]
        # Typing goes to the prompt (no letter ever acts on the list).
        await pilot.press("o", "k")
        assert app.focused is pane.input and pane.input.text == "ok"
        assert not shown[2].has_class("-highlight")
        await pilot.press("shift+tab")
        assert listing.highlighted is shown[2]  # remembered
        await pilot.press("escape")
        assert app.focused is pane.input


async def test_enter_offers_actions_copy_code_blocks_and_raw_view(make_app: AppFactory) -> None:
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        pane = await open_with_messages(app, ("user", "code please"), ("assistant", REPLY))
        await pilot.press("shift+tab", "enter")
        assert isinstance(app.screen, ActionMenu)
        await pilot.press("b")  # copy a code block: two, so it asks which
        assert isinstance(app.screen, CodeBlockPicker)
        await pilot.press("down", "enter")
        assert app.clipboard == "echo two\n"
        assert "Copied 9 characters (code block)" in notified(app)
        assert app.focused is pane.messages
        await pilot.press("enter", "r")
        raw = app.screen
        assert isinstance(raw, RawMarkdownScreen)
        shown = str(raw.query_one(".raw-text").render())
        # Literal: fences and [bold] as written, the escape sequence visible.
        assert "```python" in shown and "[bold]not markup[/bold]" in shown
        assert "\\x1b[2J" in shown and "\x1b" not in shown
        await pilot.press("ctrl+c")
        assert app.clipboard == REPLY.replace("\x1b", "\\x1b")
        await pilot.press("escape")
        assert not isinstance(app.screen, RawMarkdownScreen)
        await pilot.press("enter", "c")
        assert app.clipboard.startswith("Two ways:")
        await pilot.press("up", "enter")
        menu = app.screen
        assert isinstance(menu, ActionMenu)
        assert [a[1] for a in menu.actions] == ["copy", "raw", "export"]  # no code: no "b"
        await pilot.press("b")
        assert app.screen is menu
        await pilot.press("escape")
        assert app.focused is pane.messages


async def test_export_writes_the_session_and_says_where(
    make_app: AppFactory, tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    app = make_app([USER])
    app.export_directory = exports
    async with app.run_test(size=(160, 48)) as pilot:
        await open_with_messages(app, ("user", "Trip to Paris"), ("assistant", REPLY))
        await pilot.press("shift+tab", "enter", "e")
        await wait_until(lambda: any(n.startswith("Exported 2 messages") for n in notified(app)))
        (written,) = exports.iterdir()
        text = written.read_text()
        assert text.startswith("# Trip to Paris\n")
        assert f"## {USER} · " in text and "```sh\necho two\n```" in text
        assert str(written) in " ".join(notified(app))

        app.export_directory = exports / "missing"
        await pilot.press("enter", "e")
        await wait_until(lambda: any(n.startswith("Export not saved") for n in notified(app)))
        assert "No such file or directory" in " ".join(notified(app))


async def test_each_message_says_who_and_when(make_app: AppFactory) -> None:
    now = datetime(2026, 3, 4, 9, 41, tzinfo=UTC)
    app = make_app([USER], clock=MessageClock(lambda: now))
    async with app.run_test(size=(160, 48)) as pilot:
        pane = await open_with_messages(app, ("user", "hello"))
        (stored,) = pane.query(UserMessage)
        assert stored.created_at is not None
        # Stored by the database on another day than the clock's: the date shows too.
        assert stored.label == f"{USER} · " + stored.created_at.astimezone().strftime(
            "%Y-%m-%d %H:%M"
        )
        await pilot.press(*"hi", "enter")
        await wait_until(lambda: len(pane.query(AssistantMessage)) == 1)
        live_user = list(pane.query(UserMessage))[-1]
        assert live_user.label == f"{USER} · " + now.astimezone().strftime("%H:%M")
        assert pane.query_one(AssistantMessage).label.startswith("assistant · ")


def test_times_are_local_hh_mm_today_and_dated_before() -> None:
    now = datetime(2026, 3, 4, 23, 59).astimezone()
    clock = MessageClock(lambda: now)
    assert clock.label(now - timedelta(hours=2)) == (now - timedelta(hours=2)).strftime("%H:%M")
    yesterday = now - timedelta(days=1)
    assert clock.label(yesterday) == yesterday.strftime("%Y-%m-%d %H:%M")
    assert FixedClock(datetime(2026, 1, 1, 9, 41, tzinfo=UTC)).label(now) == "09:41"


async def test_the_job_count_stays_in_the_status_line_at_80_columns(
    make_app: AppFactory,
) -> None:
    app = make_app([USER])
    async with app.run_test(size=(80, 24)) as pilot:
        await app.ready.wait()
        await pilot.pause()
        line = str(app.query_one(StatusBar).render())
        assert line.rstrip().endswith("memory jobs running: 0")
        assert "…" in line  # the database name gave way, not the count
        assert app.query_one("Footer").compact
        await pilot.resize_terminal(160, 48)
        await pilot.pause()
        assert not app.query_one("Footer").compact


async def test_the_prompt_keeps_its_keys(make_app: AppFactory) -> None:
    # ↑ in the prompt recalls history, it never moves to the message list.
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        pane = await open_with_messages(app, ("user", "x"), ("assistant", "y"))
        await pilot.press("up", "down", "enter")
        assert isinstance(app.focused, Prompt)
        assert not any(isinstance(s, ActionMenu) for s in app.screen_stack)
        assert pane.messages.highlighted is None
        assert isinstance(pane.messages, MessageList)


async def test_up_on_the_first_message_loads_older_ones(make_app: AppFactory) -> None:
    app = make_app([USER])
    async with app.run_test(size=(160, 48)) as pilot:
        pane = await open_with_messages(app, *(("user", f"message {n}") for n in range(60)))
        listing = pane.messages
        assert len(listing.shown_messages) == 50  # one page
        await pilot.press("shift+tab", "home")
        first = listing.highlighted
        assert isinstance(first, UserMessage) and first.raw_text == "message 10"
        await pilot.press("up")
        await wait_until(lambda: len(listing.shown_messages) == 60)
        await pilot.press("up")
        assert listing.highlighted is not None
        assert listing.highlighted.raw_text == "message 9"


async def test_the_palette_exports_the_focused_users_session(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app = make_app([USER])
    app.export_directory = tmp_path / "palette"
    app.export_directory.mkdir()
    async with app.run_test(size=(160, 48)):
        await open_with_messages(app, ("user", "from the palette"))
        (command,) = [
            c for c in app.get_system_commands(app.screen) if c.title == f"Export session of {USER}"
        ]
        command.callback()
        await wait_until(lambda: any(n.startswith("Exported 1 message ") for n in notified(app)))
        (written,) = app.export_directory.iterdir()
        assert "from the palette" in written.read_text()
