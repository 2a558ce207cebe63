"""Snapshot tests: what the app looks like, pixel for pixel (SVG), deterministic.

Deterministic because: the offline model (no delay), a fresh database per
test, no ids on screen, every message's time from a fixed clock, no cursor
blink, no spinner animation, no "new" highlight timers, notifications
cleared, and every stream and memory job finished before the picture is
taken. Textual is pinned in pyproject.

Update after an intended change: ``pytest tests/tui/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from textual.pilot import Pilot

from bench.fake_openai import FakeOpenAI
from engine.config import Settings
from tests.tui.conftest import AppFactory, wait_until
from tui.app import MemchatApp
from tui.widgets.messages import FixedClock

# The status bar names the database server; the pictures are of the embedded one.
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MEMCHAT_TEST_DSN")),
    reason="snapshots are taken against the embedded PostgreSQL",
)

DEFAULT_USERS = ["user_1@example.com", "user_2@example.com", "user_3@example.com"]
FAKE_PORT = 47321

RunBefore = Callable[[Pilot[Any]], Awaitable[None]]

# Every message's label shows this time, whenever the picture is taken.
SNAPSHOT_CLOCK = FixedClock(datetime(2026, 1, 1, 9, 41, tzinfo=UTC))


@pytest.fixture
def make_app(make_app: AppFactory) -> AppFactory:
    def factory(users: list[str] | None = None, **options: object) -> MemchatApp:
        return make_app(users, **{"clock": SNAPSHOT_CLOCK, **options})

    return factory


async def settle(pilot: Pilot[Any]) -> None:
    """Wait until nothing on screen is still changing."""
    app = pilot.app
    assert isinstance(app, MemchatApp)
    await app.ready.wait()
    if app.demo.running:
        await app.demo.finished.wait()
    turns = [w for w in app.workers if w.group == "turn"]
    if turns:
        await app.workers.wait_for_complete(turns)
    runtime = app.runtime
    assert runtime is not None
    assert await runtime.dispatcher.wait_idle(within=60)

    async def sidebars_current() -> bool:
        for pane in app.panes:
            async with runtime.store.scope(pane.user_id) as s:
                stored = [m.content for m in await s.list_memories()]
            shown = [m.content for m in pane.sidebar._memories]
            if stored != shown or pane.sidebar.job_state == "running":
                return False
        return app.running_jobs == 0

    await wait_until(sidebars_current)
    app.clear_notifications()
    await pilot.pause()


def press_then_settle(*keys: str) -> RunBefore:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press(*keys)
        await settle(pilot)

    return run_before


def send_then_settle(user_id: str, text: str) -> RunBefore:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, MemchatApp)
        await settle(pilot)
        pane = app.pane_of(user_id)
        assert pane is not None
        worker = pane.send(text)
        assert worker is not None
        await worker.wait()
        await settle(pilot)

    return run_before


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_start_screen(snap_compare: Any, make_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(make_app(DEFAULT_USERS), terminal_size=size, run_before=settle)


def test_after_the_seed_conversation(snap_compare: Any, make_app: AppFactory) -> None:
    app = make_app(None, play="seed")
    assert snap_compare(app, terminal_size=(160, 48), run_before=settle)


def test_focus_layout_with_full_sidebar(snap_compare: Any, make_app: AppFactory) -> None:
    app = make_app(None, play="seed")
    assert snap_compare(app, terminal_size=(160, 48), run_before=press_then_settle("f2"))


def test_inspector_after_the_seed(
    snap_compare: Any, make_app: AppFactory, tui_settings: Settings
) -> None:
    # Token counts depend on the prompts; with memories in the prompt they would
    # depend on whether a memory job ended before the next turn began.
    tui_settings.memory.add_to_context = False
    app = make_app(None, play="seed")

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("f3")
        loads = [w for w in pilot.app.workers if w.group == "inspector-load"]
        if loads:  # it may have finished already
            await pilot.app.workers.wait_for_complete(loads)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(160, 48), run_before=run_before)


def test_reply_with_markdown_and_an_escape_sequence(
    snap_compare: Any, make_app: AppFactory
) -> None:
    app = make_app(DEFAULT_USERS[:2])
    text = "Look: **bold** `code` [red]markup[/red] \x1b[2J\x1b]0;title\x07 end"
    assert snap_compare(
        app, terminal_size=(120, 30), run_before=send_then_settle(DEFAULT_USERS[0], text)
    )


def test_failed_turn(snap_compare: Any, make_app: AppFactory, tui_settings: Settings) -> None:
    try:
        fake = FakeOpenAI(port=FAKE_PORT).start()
    except OSError:
        pytest.skip(f"port {FAKE_PORT} is taken; the picture shows the server's address")
    try:
        tui_settings.model.provider = "openai"
        tui_settings.model.base_url = fake.base_url
        tui_settings.model.max_retries = 0
        fake.fail_next("500", count=5)
        app = make_app(DEFAULT_USERS[:1])
        assert snap_compare(
            app, terminal_size=(120, 30), run_before=send_then_settle(DEFAULT_USERS[0], "hello")
        )
    finally:
        fake.stop()


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_prompt_with_three_lines(
    snap_compare: Any, make_app: AppFactory, size: tuple[int, int]
) -> None:
    """The prompt grows with its text and names the user typing."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press(*"first line", "ctrl+j", *"second line", "ctrl+j", *"third line")
        await pilot.pause()

    assert snap_compare(make_app(DEFAULT_USERS), terminal_size=size, run_before=run_before)


def test_small_terminal_shows_one_user_and_the_list(
    snap_compare: Any, make_app: AppFactory
) -> None:
    """Below the minimum size: one pane, the users listed, no memory panel."""
    app = make_app(DEFAULT_USERS)
    assert snap_compare(
        app, terminal_size=(60, 15), run_before=send_then_settle(DEFAULT_USERS[0], "hello")
    )


CODE_REPLY = (
    "Two ways to greet:\n\n```python\nprint('hello')\n```\n\nor in a shell:\n\n"
    "```sh\necho hello\n```\n\n**Both** print one line. [red]not markup[/red]"
)


async def _stored_conversation(pilot: Pilot[Any]) -> None:
    """A question and a reply with two code blocks, shown as a reader opens them."""
    app = pilot.app
    await settle(pilot)
    assert isinstance(app, MemchatApp) and app.runtime is not None
    pane = app.pane_of(DEFAULT_USERS[0])
    assert pane is not None and pane.session is not None
    async with app.runtime.store.scope(pane.user_id) as s:
        await s.append_message(pane.session.session_id, "user", "How do I print hello?")
        await s.append_message(pane.session.session_id, "assistant", CODE_REPLY)
    pane.ready.clear()
    pane.load_session(pane.session.session_id)
    await pane.ready.wait()
    await settle(pilot)


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_highlighted_message(
    snap_compare: Any, make_app: AppFactory, size: tuple[int, int]
) -> None:
    """shift+tab from the prompt, then ↑: the question is highlighted; the footer lists the keys."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _stored_conversation(pilot)
        await pilot.press("shift+tab", "up")
        await pilot.pause()

    assert snap_compare(make_app(DEFAULT_USERS), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_message_action_menu(
    snap_compare: Any, make_app: AppFactory, size: tuple[int, int]
) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _stored_conversation(pilot)
        await pilot.press("shift+tab", "enter")
        await pilot.pause()

    assert snap_compare(make_app(DEFAULT_USERS), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_raw_markdown_view(snap_compare: Any, make_app: AppFactory, size: tuple[int, int]) -> None:
    """The reply as written: fences, ** and [red] literal."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await _stored_conversation(pilot)
        await pilot.press("shift+tab", "enter", "r")
        await pilot.pause()

    assert snap_compare(make_app(DEFAULT_USERS), terminal_size=size, run_before=run_before)
