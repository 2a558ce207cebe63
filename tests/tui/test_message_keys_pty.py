"""Message actions as bytes: the real `memchat` in a pty (offline model, the test's database).

shift+tab is ESC [ Z, the arrows ESC [ A/B, Home/End ESC [ H/F, ctrl+c the
byte 0x03 and Enter CR in every xterm-compatible terminal; a copy reaches the
terminal as an OSC 52 sequence, which tmux, xterm, kitty, WezTerm and
Alacritty put on the system clipboard.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator

import asyncpg
import pytest

from tests.tui.terminal import Terminal, start_memchat

pytestmark = [pytest.mark.db]

USER = "ann@example.com"
SHIFT_TAB = b"\x1b[Z"
UP = b"\x1b[A"
HOME = b"\x1b[H"
END = b"\x1b[F"
CTRL_C = b"\x03"


def osc52(text: str) -> bytes:
    return b"\x1b]52;c;" + base64.b64encode(text.encode()) + b"\x07"


@pytest.fixture
def term(database_dsn: str) -> Iterator[Terminal]:
    terminal = start_memchat(database_dsn, [USER])
    try:
        terminal.wait_for(f"Say hi as {USER}")
        terminal.send("hello there", "enter")
        terminal.wait_for("assistant · ")
        yield terminal
    finally:
        terminal.close()


def _copied(term: Terminal, text: str) -> bool:
    with term.lock:
        return osc52(text) in term.output


def test_each_message_shows_who_and_when(term: Terminal) -> None:
    screen = term.text()
    assert re.search(rf"{re.escape(USER)} · \d\d:\d\d", screen), screen
    assert re.search(r"assistant · \d\d:\d\d", screen), screen


def test_shift_tab_then_arrows_and_ctrl_c_copy_through_osc52(
    term: Terminal, database_dsn: str
) -> None:
    term.send(SHIFT_TAB)
    term.wait_for("Actions")  # the footer lists the list's keys
    term.send(UP, CTRL_C)
    term.wait_for("Copied 11 characters")
    assert _copied(term, "hello there")
    reply = _stored_reply(database_dsn)
    term.send(END, CTRL_C)
    term.wait_for(lambda _screen: _copied(term, reply))


def _stored_reply(dsn: str, within: float = 20.0) -> str:
    """The reply, once stored complete (the screen may show it a moment before)."""

    async def read() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            deadline = asyncio.get_running_loop().time() + within
            while True:
                reply = await conn.fetchval(
                    "SELECT content FROM messages WHERE role = 'assistant' AND status = 'complete'"
                )
                if reply is not None:
                    return str(reply)
                assert asyncio.get_running_loop().time() < deadline, "no complete reply stored"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    return asyncio.run(read())


def test_enter_r_shows_the_raw_text_and_esc_comes_back(term: Terminal) -> None:
    term.send(SHIFT_TAB, HOME, "enter")
    term.wait_for("Copy the message")
    term.send("r")
    term.wait_for("Raw Markdown")
    term.send("escape")
    term.wait_for(lambda screen: "Raw Markdown" not in screen)
    # Esc again: back in the prompt, where letters are text again.
    term.send("escape")
    term.wait_for(lambda screen: "Actions" not in screen)
    term.send("typed")
    term.wait_for("typed")


def test_letters_in_the_message_list_go_to_the_prompt(term: Terminal) -> None:
    term.send(SHIFT_TAB)
    term.wait_for("Actions")
    # "c", "r", "e" act only in the menu Enter opens; here they are text.
    term.send("cree")
    term.wait_for("cree")
    assert "Copied" not in term.text() and "Raw Markdown" not in term.text()
    with term.lock:
        assert b"\x1b]52;" not in term.output
