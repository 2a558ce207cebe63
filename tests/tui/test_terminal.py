"""Keys as bytes: the real `memchat` in a pty, its screen read by a terminal emulator.

Pilot presses keys by name, so it cannot see what a terminal really sends
(alt+3 is ESC 3, a paste is ESC[200~…ESC[201~, tmux send-keys is one burst).
These tests send those bytes to the real process (offline model, the test's
database) and check the screen and the stored rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from tests.tui.terminal import Terminal, paste, start_memchat

pytestmark = [pytest.mark.db]

USERS = ["ann@example.com", "ben@example.com", "cat@example.com"]


def stored(dsn: str) -> list[tuple[str, str, str]]:
    """(user, role, content) of every message, oldest first (as the owner)."""

    async def read() -> list[tuple[str, str, str]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT user_id, role, content FROM messages ORDER BY message_id"
            )
        finally:
            await conn.close()
        return [(r["user_id"], r["role"], r["content"]) for r in rows]

    return asyncio.run(read())


def user_messages(dsn: str) -> list[tuple[str, str]]:
    return [(user, content) for user, role, content in stored(dsn) if role == "user"]


def by_user(sent: list[tuple[str, str]]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for user, content in sent:
        result.setdefault(user, []).append(content)
    return result


def wait_stored(dsn: str, count: int, within: float = 20.0) -> list[tuple[str, str]]:
    """The user messages, once there are ``count`` of them and every reply is in."""
    deadline = time.monotonic() + within
    while True:
        rows = stored(dsn)
        users = [(u, c) for u, role, c in rows if role == "user"]
        replies = [r for r in rows if r[1] == "assistant"]
        if len(users) >= count and len(replies) >= len(users):
            return users
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} messages, stored: {rows}")
        time.sleep(0.05)


@pytest.fixture
def term(database_dsn: str) -> Iterator[Terminal]:
    terminal = start_memchat(database_dsn, USERS)
    try:
        terminal.wait_for("Say hi as ann@example.com")
        terminal.wait_for("Say hi as cat@example.com")
        yield terminal
    finally:
        terminal.close()


def test_alt_digit_and_function_keys_switch_users_and_type_nothing(
    term: Terminal, database_dsn: str
) -> None:
    # alt+3 is ESC 3: Textual made it "£" in the current (first) user's prompt.
    term.send("alt+3", "My name is Tom", "enter")
    assert wait_stored(database_dsn, 1) == [(USERS[2], "My name is Tom")]
    term.send("f8", "from ben", "enter")  # previous user
    term.send("f9", "from cat", "enter")  # next user
    term.send("alt+1", "from ann", "enter")
    term.send("alt+2", "again ben", "enter")
    sent = wait_stored(database_dsn, 5)
    # Panes store concurrently: compare each user's messages, in order.
    assert by_user(sent) == {
        USERS[0]: ["from ann"],
        USERS[1]: ["from ben", "again ben"],
        USERS[2]: ["My name is Tom", "from cat"],
    }
    assert not any(c in content for _, content in sent for c in "¡™£¢∞§¶•ª")


def test_a_burst_of_two_messages_stays_two_messages(term: Terminal, database_dsn: str) -> None:
    # What `tmux send-keys 'alpha one' Enter 'beta two' Enter` writes: one burst.
    term.send("alpha one", "enter", "beta two", "enter", "alt+2", "to ben", "enter")
    assert by_user(wait_stored(database_dsn, 3)) == {
        USERS[0]: ["alpha one", "beta two"],
        USERS[1]: ["to ben"],
    }


def test_bracketed_paste_and_ctrl_j_keep_every_line(term: Terminal, database_dsn: str) -> None:
    term.send(paste("line one\nline two\nline three"))
    screen = term.wait_for("line three")
    assert "line one" in screen and "line two" in screen
    term.send("enter")
    term.send("first", "ctrl+j", "second", "enter")
    assert wait_stored(database_dsn, 2) == [
        (USERS[0], "line one\nline two\nline three"),
        (USERS[0], "first\nsecond"),
    ]


def test_ctrl_w_deletes_a_word_and_ctrl_arrows_move_by_word(
    term: Terminal, database_dsn: str
) -> None:
    term.send("one two three")
    term.wait_for("one two three")
    term.send("ctrl+w")
    term.wait_for(lambda s: "one two three" not in s and "one two" in s)
    assert "ann@example.com ›" in term.text(), "the pane and its draft are still there"
    term.send("four")
    term.wait_for("four")
    term.send("ctrl+left")
    term.send("X")
    term.wait_for("Xfour")
    term.send("enter")
    # TextArea's delete-word takes "three" (and, by its rule, the space).
    assert wait_stored(database_dsn, 1)[0][1].replace(" ", "") == "onetwoXfour"


def test_typing_a_word_in_the_memory_list_forgets_nothing(
    term: Terminal, database_dsn: str
) -> None:
    term.send("My name is Tom", "enter")
    term.wait_for("Name is Tom")
    # Tab moves to the memory list; "today" has a d and a y in it.
    term.send("tab")
    term.send("today", "enter")
    sent = wait_stored(database_dsn, 2)
    assert sent[1] == (USERS[0], "today")

    async def memories() -> list[str]:
        conn = await asyncpg.connect(database_dsn)
        try:
            return [r["content"] for r in await conn.fetch("SELECT content FROM memories")]
        finally:
            await conn.close()

    assert "Name is Tom" in asyncio.run(memories())


def test_small_terminals_keep_the_chat(term: Terminal, database_dsn: str) -> None:
    term.send("hello there", "enter")
    wait_stored(database_dsn, 1)
    term.wait_for(lambda s: s.count("hello there") >= 2)  # title and message
    for cols, rows in ((80, 24), (60, 15)):
        term.resize(cols, rows)
        screen = term.wait_for(
            lambda s, cols=cols: (
                "ann@example.com ›" in s
                and "1 ann@example.com" in s
                and "cat@example.com ›" not in s
                and max(len(line) for line in s.splitlines()) <= cols
            ),
            within=10,
        )
        if rows >= 24:
            assert screen.count("hello there") >= 2, screen
        assert "cat@example.com ›" not in screen, "one pane at a time"
    # The user list names the others; F9 shows the next one.
    term.send("f9")
    term.wait_for("ben@example.com ›")
    term.resize(80, 24)

    def footer(screen: str) -> str:
        return ([line for line in screen.splitlines() if line.strip()] or [""])[-1]

    # The whole frame, not its first half: a resize redraws top to bottom.
    screen = term.wait_for(lambda s: "ben@example.com ›" in s and "Help" in footer(s))
    assert "Help" in footer(screen), "the footer keeps F1"


def test_ctrl_q_quits(term: Terminal) -> None:
    term.send("ctrl+q")
    assert term.wait_exit() == 0


def test_ctrl_r_regenerates_the_reply_in_place(term: Terminal, database_dsn: str) -> None:
    """Bug 13: ctrl+r (byte 0x12) sent the message again; the transcript showed it twice."""
    term.send("regenerate me", "enter")
    wait_stored(database_dsn, 1)
    # The turn is over on screen too (ctrl+r while a reply streams is refused).
    term.wait_for(lambda s: "Tell me more" in s and "replying" not in s)
    before = stored(database_dsn)
    term.send(b"\x12")  # ctrl+r, as every terminal sends it

    def replaced() -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = stored_with_ids(database_dsn)
            replies = [r for r in rows if r[1] == "assistant"]
            if replies and replies[0][0] != before_ids[1]:
                return [(u, role, c) for _, role, u, c in rows]
            time.sleep(0.05)
        raise AssertionError(f"the reply was not replaced: {stored(database_dsn)}")

    before_ids = [row[0] for row in stored_with_ids(database_dsn)]
    after = replaced()
    assert after == before, "one user message, one reply: the same text, regenerated"
    # On screen one reply (a second copy of the turn would show two), the message
    # once (the title and the reply quote it too; a narrow reply may wrap it).
    screen = term.wait_for(lambda s: "replying" not in s and "Tell me more" in s)
    assert screen.count("Tell me more") == 1, screen
    assert screen.count("regenerate me") <= 3, screen


def stored_with_ids(dsn: str) -> list[tuple[int, str, str, str]]:
    """(message_id, role, user, content) of every message, oldest first."""

    async def read() -> list[tuple[int, str, str, str]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT message_id, role, user_id, content FROM messages ORDER BY message_id"
            )
        finally:
            await conn.close()
        return [(r["message_id"], r["role"], r["user_id"], r["content"]) for r in rows]

    return asyncio.run(read())
