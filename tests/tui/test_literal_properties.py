"""Property tests: text from users and models is shown literally in the TUI.

No Rich/Textual markup is interpreted ("[bold]" stays "[bold]") and no control
character reaches the terminal raw: escape sequences, BEL and friends are
shown as visible ``\\xNN`` escapes (``engine.terminal.terminal_safe``).

The widget properties run Hypothesis in a worker thread while one small app
runs on the test's event loop, so the app is started once per test and each
example is mounted into it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.notifications import Notification
from textual.widgets import Input
from textual.widgets._markdown import MarkdownBlock

from engine.terminal import terminal_safe
from tests.tui.conftest import AppFactory, wait_until
from tui.screens.dialogs import PromptDialog
from tui.widgets.messages import AssistantMessage, UserMessage

PROPERTY = hsettings(max_examples=30, deadline=None, derandomize=True)

OSC8_LINK = "\x1b]8;;http://x\x1b\\text\x1b]8;;\x1b\\"
MARKUP = [
    "[bold]x[/bold]",
    "[link=http://x]y[/link]",
    "[/]",
    "[@click=app.quit]quit[/]",
    "[red on blue]",
    "$variable [$accent]",
]
SPECIALS = [
    *MARKUP,
    "",
    "   ",
    "\x00\x01\x08",
    "\x1b[2J",
    "\x1b]0;title\x07",
    OSC8_LINK,
    "\x7f\x85\x9b",
    "a\rb",
    "\u202eevil\u202c",
    "e\u0301",
    "👩\u200d👩\u200d👧 🎉",
    "'; DROP TABLE messages; --",
    "# heading\n\n- item `code` *em*",
]
control_chars = st.characters(codec=None, categories=["Cc"])
any_char = st.characters(codec=None, exclude_categories=["Cs"])  # stored text has no surrogates
atoms = st.one_of(st.sampled_from(SPECIALS), st.text(any_char, max_size=8))
awkward_text = st.one_of(
    st.sampled_from(SPECIALS),
    st.lists(atoms, max_size=5).map("".join),
    st.text(any_char, max_size=30),
)

RAW = {chr(c) for c in range(0x00, 0x09)} | {"\x1b", "\x07", "\x7f"}


def is_c0_c1(ch: str) -> bool:
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


# Invisible characters that reorder text or hide in it (finding 13 of issue 12).
INVISIBLE = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
INVISIBLE |= set("\u200b\u200c\u2060\u2061\u2062\u2063\u2064\ufeff")


def is_shown_escaped(ch: str) -> bool:
    return (is_c0_c1(ch) and ch not in "\n\t") or ch in INVISIBLE


def visible_escape(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) <= 0xFF else f"\\u{ord(ch):04x}"


def expected_safe(text: str) -> str:
    return "".join(visible_escape(c) if is_shown_escaped(c) else c for c in text)


# -- terminal_safe (pure) ---------------------------------------------------------


@PROPERTY
@given(text=awkward_text | st.text(st.characters(codec=None), max_size=40))
@example(text="\x1b[2J\x1b]0;title\x07" + OSC8_LINK)
@example(text="\x00\t\n\r\x0b\x0c\x7f\x80\x9f")
@example(text="invoice\u202egpj.exe \u2067x\u2069 pay\u200bpal \ufeff")
def test_terminal_safe_leaves_only_newline_and_tab(text: str) -> None:
    safe = terminal_safe(text)
    assert not any(is_shown_escaped(c) for c in safe), repr(safe)
    assert safe == expected_safe(text)  # everything else is kept as it is


@PROPERTY
@given(a=control_chars, b=control_chars)
def test_terminal_safe_shows_each_control_character_distinctly(a: str, b: str) -> None:
    if a in "\n\t":
        assert terminal_safe(a) == a
    else:
        assert terminal_safe(a) == visible_escape(a)
    assert (terminal_safe(a) == terminal_safe(b)) == (a == b)


def test_bidi_overrides_and_zero_width_characters_are_shown() -> None:
    assert terminal_safe("invoice\u202egpj.exe") == "invoice\\u202egpj.exe"
    assert terminal_safe("pay\u200bpal\u2066") == "pay\\u200bpal\\u2066"
    # Emoji sequences keep their joiner: it cannot reorder or hide text.
    assert terminal_safe("👩\u200d👧") == "👩\u200d👧"


# -- widgets, mounted in one running app ------------------------------------------


class Harness(App[None]):
    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")


async def run_property_in_app(check: Callable[[App[None], str], Awaitable[None]], prop) -> None:
    """Run ``prop`` (a Hypothesis test taking ``run``) in a thread; ``run(text)`` checks
    one example on the running app's event loop."""
    app = Harness()
    async with app.run_test(size=(200, 40)):
        loop = asyncio.get_running_loop()

        checked: list[str] = []

        def run(text: str) -> None:
            asyncio.run_coroutine_threadsafe(check(app, text), loop).result(timeout=30)
            checked.append(text)

        await asyncio.to_thread(prop, run)
        assert len(checked) >= PROPERTY.max_examples  # Hypothesis really ran them here


def assert_shown_literally(text: str, shown: str) -> None:
    assert not RAW & set(shown), repr(shown)
    for markup in MARKUP:
        if markup in text:
            assert markup in shown, (markup, shown)


async def check_user_message(app: App[None], text: str) -> None:
    widget = UserMessage(text)
    await app.query_one("#log").mount(widget)
    try:
        rendered = widget.render()
        plain = rendered.plain if isinstance(rendered, Content) else str(rendered)
        assert plain == terminal_safe(text)
        assert_shown_literally(text, plain)
        lines = widget.render_lines(widget.content_region.reset_offset)
        assert not RAW & set("".join(strip.text for strip in lines))
    finally:
        await widget.remove()


async def check_assistant_message(app: App[None], text: str) -> None:
    widget = AssistantMessage(text)
    await app.query_one("#log").mount(widget)
    try:
        expected = terminal_safe(text)
        for _ in range(100):  # the document is set when the widget's Mount is handled
            if widget.source == expected:
                break
            await asyncio.sleep(0.01)
        async with widget.lock:  # and its blocks are mounted once the update lets go
            pass
        assert widget.source == expected
        assert_shown_literally(text, widget.source)
        for block in widget.query(MarkdownBlock):
            rendered = block.render()
            shown = rendered.plain if isinstance(rendered, Content) else str(rendered)
            assert not RAW & set(shown), repr(shown)
    finally:
        await widget.remove()


async def test_user_message_is_shown_literally() -> None:
    @PROPERTY
    @given(text=awkward_text)
    @example(text="[bold]x[/bold] [/] \x1b[2J\x1b]0;title\x07")
    @example(text=OSC8_LINK)
    def prop(run: Callable[[str], None], text: str) -> None:
        run(text)

    await run_property_in_app(check_user_message, prop)


async def test_assistant_message_source_is_literal() -> None:
    @PROPERTY
    @given(text=awkward_text)
    @example(text="**[bold]x[/bold]** [/] `\x1b[2J` \x1b]0;title\x07")
    @example(text=OSC8_LINK)
    def prop(run: Callable[[str], None], text: str) -> None:
        run(text)

    await run_property_in_app(check_assistant_message, prop)


# -- an error that quotes the user's text, shown as a notification ------------------


def shown_as_toast(notification: Notification) -> str:
    """What Textual's Toast.render shows for a notification (Textual 8.2)."""
    if notification.markup:
        return Content.from_markup(notification.message).plain
    return Content(notification.message).plain


@pytest.mark.db
@pytest.mark.parametrize("user_id", ["[/]", "[bold]x[/bold]"])
async def test_invalid_user_id_error_is_shown_literally(make_app: AppFactory, user_id: str) -> None:
    app = make_app(["alice@example.com"])
    # Toasts off: with them on, '[/]' crashes the app (MarkupError from Toast.render)
    # and its shutdown takes ~10 s; the notification the app posted is checked instead.
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, PromptDialog)
        app.screen.query_one(Input).value = user_id
        await pilot.press("enter")
        await wait_until(lambda: bool(list(app._notifications)), within=10)
        [notification] = list(app._notifications)
        assert notification.severity == "error"
        shown = shown_as_toast(notification)
        assert "invalid user id" in shown
        assert user_id in shown, shown


async def test_a_reply_link_shows_its_target_and_is_not_a_link() -> None:
    """Finding 13: ``[text](url)`` in a reply must not hide where it points."""
    target = "http://evil.example/steal?x=1"
    source = f"See [the docs]({target}) and ![logo]({target}).\n\n[ref]: {target}"
    app = Harness()
    async with app.run_test() as pilot:
        widget = AssistantMessage(source)
        await app.query_one("#log").mount(widget)
        await pilot.pause()
        async with widget.lock:
            pass
        shown = []
        for block in widget.query(MarkdownBlock):
            rendered = block.render()
            content = rendered if isinstance(rendered, Content) else Content(str(rendered))
            shown.append(content.plain)
            # No span of the rendered text carries a link (clickable target).
            assert not any("link" in str(span.style) for span in content.spans), content.spans
        text = "\n".join(shown)
        assert text.count(target) == 3, text
        assert "[the docs]" in text
