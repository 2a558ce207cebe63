"""Property tests: awkward input either works or is one clean error, never half-written.

Every user-facing entry point (user ids, session titles, messages, memories,
the `memchat chat` command, the settings file) is fed empty, blank, huge,
NUL, lone-surrogate, bidi, combining, emoji, Rich-markup, ANSI/OSC and
SQL-looking text, and mixes of them. Each input must either be accepted and
stored exactly as README "Bad input" says, or be refused with a
``MemchatError`` whose message is one printable line, leaving no rows behind.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.admin import AdminReader
from engine.agent import Agent, TurnCompleted
from engine.config import Settings, load_settings
from engine.db import Database
from engine.errors import ConfigError, InvalidInput, MemchatError
from engine.models import OfflineChatModel
from engine.store import Store
from engine.validation import REPLACEMENT, storable

pytestmark = pytest.mark.db

DB_PROPERTY = hsettings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PURE_PROPERTY = hsettings(max_examples=60, deadline=None, derandomize=True)

# -- the awkward text ----------------------------------------------------------

OSC8_LINK = "\x1b]8;;http://x\x1b\\text\x1b]8;;\x1b\\"
SPECIALS = [
    "",
    " ",
    " \t\r\n\x0b\x0c ",
    "\u00a0\u2028\u2029\u3000",  # Unicode spaces and line separators
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\u202eevil\u202c",
    "e\u0301",
    "\u0301",
    "👩\u200d👩\u200d👧 🎉",
    "\ufeff\u200b",
    "[bold]x[/bold]",
    "[link=http://x]y[/link]",
    "[/]",
    "[@click=app.quit]quit[/]",
    "\x1b[2J",
    "\x1b]0;title\x07",
    OSC8_LINK,
    "\x07\x08\x7f\x85\x9b",
    "line one\rline two",
    "'; DROP TABLE messages; --",
    "Robert'); DELETE FROM memories WHERE ('1'='1",
    "$1 %s {0} \\x00 \\",
    "My name is [bold]Bob[/bold].",
]
# Built once, sampled as they are: generating megabytes would be far too slow.
LONG = [
    "x" * 1_000_000,
    " " * 1_000_000,
    "\x00" * 100_001,
    "a" * 100_000,
    "a" * 100_001,
    "é" * 500,
    "é" * 501,
    "\ud800" * 300,
    "\x1b[2J" * 5_000,
]

any_char = st.characters(codec=None, exclude_categories=())  # surrogates and controls too
atoms = st.one_of(st.sampled_from(SPECIALS), st.text(any_char, max_size=12))
mixed = st.lists(atoms, max_size=6).map("".join)
awkward_text = st.one_of(
    st.sampled_from(SPECIALS), st.sampled_from(LONG), mixed, st.text(any_char, max_size=40)
)

valid_user_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,40}", fullmatch=True)
user_id_text = st.one_of(
    valid_user_ids,
    valid_user_ids.map(lambda u: f"  {u}\t"),
    st.just("a" * 128),
    st.just("a" * 129),
    st.just("x" * 1_000_000),
    st.builds(lambda u, junk: u + junk, valid_user_ids, atoms),
    awkward_text,
)

_fresh = itertools.count()


def fresh_user() -> str:
    """A user id no other example has used (the database lives for the whole test)."""
    return f"prop{next(_fresh)}@example.com"


def is_control(ch: str) -> bool:
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


def assert_one_clean_line(exc: BaseException) -> None:
    """A refusal is a MemchatError whose message can be printed as it is, on one line."""
    assert isinstance(exc, MemchatError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip()
    assert not any(is_control(ch) for ch in message), repr(message)
    assert "\u2028" not in message and "\u2029" not in message, repr(message)
    message.encode("utf-8")  # no lone surrogates: it must be printable at all


def replaced(text: str) -> str:
    """README's storage rule, independently: NUL and lone surrogates become U+FFFD."""
    return "".join(
        REPLACEMENT if ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text
    )


# -- pure oracle ---------------------------------------------------------------


@PURE_PROPERTY
@given(text=awkward_text)
def test_storable_replaces_only_nul_and_surrogates(text: str) -> None:
    stored = storable(text)
    assert stored == replaced(text)
    assert len(stored) == len(text)
    stored.encode("utf-8")


# -- user ids -------------------------------------------------------------------


async def user_ids(db: Database) -> set[str]:
    return {u.user_id for u in await AdminReader(db).list_users()}


@DB_PROPERTY
@given(uid=user_id_text)
@example(uid="[/]").via("markup")
@example(uid="\x1b]0;title\x07").via("escape sequence")
@example(uid="alice\x00").via("NUL")
@example(uid="\ud800").via("surrogate")
@example(uid="'; DROP TABLE users; --").via("SQL")
async def test_user_id_works_or_creates_nothing(store: Store, db: Database, uid: str) -> None:
    before = await user_ids(db)
    try:
        async with store.scope(uid) as s:
            user = await s.ensure_user()
    except Exception as exc:
        assert_one_clean_line(exc)
        assert isinstance(exc, InvalidInput)
        assert await user_ids(db) == before
    else:
        assert user.user_id == uid.strip().lower()  # ids are case-insensitive
        assert len(user.user_id) <= 128
        assert await user_ids(db) == before | {user.user_id}


# -- session titles -------------------------------------------------------------


def assert_clean_title(title: str | None) -> None:
    assert title, repr(title)
    assert title == title.strip()
    assert len(title.splitlines()) == 1, repr(title)
    assert not any(is_control(ch) for ch in title), repr(title)
    assert "\x00" not in title
    title.encode("utf-8")


@DB_PROPERTY
@given(title=awkward_text)
@example(title="\x1b]0;title\x07").via("OSC title")
@example(title="a\nb\r\nc\u2028d").via("line breaks")
@example(title="\x00\ud800").via("unstorable")
@example(title=" \t ").via("blank")
async def test_session_title_is_one_clean_line_or_nothing_changes(store: Store, title: str) -> None:
    uid = fresh_user()
    async with store.scope(uid) as s:
        base = await s.create_session("base")

    try:
        async with store.scope(uid) as s:
            created = await s.create_session(title)
    except Exception as exc:
        assert_one_clean_line(exc)
        async with store.scope(uid) as s:
            assert [x.session_id for x in await s.list_sessions()] == [base.session_id]
    else:
        async with store.scope(uid) as s:
            assert len(await s.list_sessions()) == 2
            stored = await s.get_session(created.session_id)
        assert stored.title == created.title
        if title:
            assert_clean_title(stored.title)
        else:
            assert stored.title is None  # no title yet: the first message names it

    try:
        async with store.scope(uid) as s:
            renamed = await s.rename_session(base.session_id, title)
    except Exception as exc:
        assert_one_clean_line(exc)
        async with store.scope(uid) as s:
            assert (await s.get_session(base.session_id)).title == "base"
    else:
        assert_clean_title(renamed.title)
        # Only spacing changes: controls are spaces, runs of space collapse.
        spaced = "".join(" " if is_control(c) else c for c in replaced(title))
        assert renamed.title == " ".join(spaced.split())
        async with store.scope(uid) as s:
            assert (await s.get_session(base.session_id)).title == renamed.title


# -- messages ---------------------------------------------------------------------


@DB_PROPERTY
@given(text=awkward_text)
@example(text="[/]").via("markup")
@example(text=OSC8_LINK).via("hyperlink")
@example(text="\x00\ud800\udfff").via("unstorable only")
@example(text="a" * 100_000).via("exactly the limit")
@example(text="a" * 100_001).via("one over the limit")
async def test_message_round_trips_exactly_or_is_refused_unwritten(
    store: Store, settings: Settings, text: str
) -> None:
    uid = fresh_user()
    async with store.scope(uid) as s:
        session = await s.create_session()
    agent = Agent(store, OfflineChatModel(), settings)

    try:
        end = await agent.run(uid, session.session_id, text)
    except Exception as exc:
        assert_one_clean_line(exc)
        assert isinstance(exc, InvalidInput)
        async with store.scope(uid) as s:
            assert await s.count_messages(session.session_id) == 0
            assert (await s.get_session(session.session_id)).title is None
        return

    assert isinstance(end, TurnCompleted), end  # the offline model handles any text
    async with store.scope(uid) as s:
        messages = await s.last_messages(session.session_id, 10)
        title = (await s.get_session(session.session_id)).title
    assert [m.role for m in messages] == ["user", "assistant"]
    assert [m.status for m in messages] == ["complete", "complete"]
    user_message = messages[0]
    assert user_message.content == storable(text)
    assert user_message.content == replaced(text)  # everything else is kept exactly
    assert messages[1].content == end.reply.content
    assert_clean_title(title)


# -- memories ---------------------------------------------------------------------


@DB_PROPERTY
@given(text=awkward_text)
@example(text="[/]").via("markup")
@example(text="\x1b[2J  I like\ttea \x00").via("escapes and spacing")
@example(text="é" * 500).via("at the limit")
@example(text="é" * 501).via("over the limit")
@example(text="...").via("only punctuation")
async def test_memory_is_stored_as_one_line_or_nothing_is_added(store: Store, text: str) -> None:
    uid = fresh_user()
    async with store.scope(uid) as s:
        await s.ensure_user()

    try:
        async with store.scope(uid) as s:
            memory = await s.add_memory(text)
    except Exception as exc:
        assert_one_clean_line(exc)
        assert isinstance(exc, InvalidInput)
        async with store.scope(uid) as s:
            assert await s.list_memories() == []
            assert await s.memory_events() == []
        return

    expected = " ".join(storable(text).split())
    assert memory is not None
    assert memory.content == expected
    async with store.scope(uid) as s:
        assert [m.content for m in await s.list_memories()] == [expected]
        events = await s.memory_events()
    assert [(e.op, e.before, e.after) for e in events] == [("add", None, expected)]


# -- the command line ---------------------------------------------------------------

CLI_MESSAGES = [
    pytest.param("[bold]x[/bold] [link=http://x]y[/link] [/]", id="markup"),
    pytest.param("\x1b[2J\x1b]0;title\x07 hi " + OSC8_LINK, id="ansi-osc"),
    pytest.param(
        "'; DROP TABLE messages; -- e\u0301 \u202eevil\u202c 👩\u200d👧", id="sql-unicode"
    ),
    pytest.param("My name is \x1b[31mRed\x1b[0m.", id="escape-in-a-fact"),
    pytest.param("\udcff\udcfe", id="undecodable-argv"),  # arrives as surrogateescape
    pytest.param("   ", id="blank"),
    pytest.param("a" * 100_001, id="too-long"),
    pytest.param("-x", id="looks-like-an-option"),
]


def run_cli(dsn: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "MEMCHAT_DATABASE__URL": dsn,
        "MEMCHAT_CONFIG": "/dev/null",
        "PYTHONIOENCODING": "utf-8",
    }
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        env=env,
        input=stdin,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def assert_cli_outcome(result: subprocess.CompletedProcess[bytes], as_json: bool) -> None:
    stdout = result.stdout.decode("utf-8")
    stderr = result.stderr.decode("utf-8")
    assert "Traceback" not in stderr, stderr
    assert result.returncode in (0, 2), (result.returncode, stderr)
    if result.returncode == 2:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("memchat: "), stderr
        assert "\x1b" not in stderr
        assert stdout == ""
        return
    if as_json:
        payload = json.loads(stdout)
        assert payload["status"] == "complete"
        assert isinstance(payload["reply"], str)
    else:
        assert stdout.strip()
        assert "\x1b" not in stdout and "\x07" not in stdout, repr(stdout)


@pytest.mark.slow
@pytest.mark.parametrize("text", CLI_MESSAGES)
def test_cli_chat_json_is_valid_or_one_error_line(database_dsn: str, text: str) -> None:
    result = run_cli(database_dsn, "chat", "--user", "u", "--json", text)
    assert_cli_outcome(result, as_json=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [p for p in CLI_MESSAGES if p.id in ("ansi-osc", "escape-in-a-fact")],
)
def test_cli_chat_text_never_prints_raw_escapes(database_dsn: str, text: str) -> None:
    result = run_cli(database_dsn, "chat", "--user", "u", text)
    assert_cli_outcome(result, as_json=False)


@pytest.mark.slow
def test_cli_chat_stdin_with_nul_and_invalid_utf8(database_dsn: str) -> None:
    data = b"hi \x00 \xff\xfe \x1b[2J there"
    result = run_cli(database_dsn, "chat", "--user", "u", "--json", "-", stdin=data)
    assert_cli_outcome(result, as_json=True)
    assert result.returncode == 0
    history = run_cli(
        database_dsn, "history", "--user", "u", "--session",
        json.loads(result.stdout)["session_id"], "--json",
    )  # fmt: skip
    messages = json.loads(history.stdout)["messages"]
    assert messages[0]["content"] == "hi \ufffd \ufffd\ufffd \x1b[2J there"


# -- broken settings files ------------------------------------------------------------

_config_dir = Path(tempfile.mkdtemp(prefix="memchat-config-prop-"))
SECTIONS = ["database", "model", "agent", "history", "memory", "limits", "ui", "nonsense"]
KNOWN_KEYS = [
    "url",
    "pool_max_size",
    "provider",
    "name",
    "timeout",
    "max_messages",
    "max_message_chars",
    "users",
    "system_prompt",
    "add_to_context",
    "extra",
]
toml_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=20),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON escapes are valid TOML basic-string escapes
    return "[" + ", ".join(toml_literal(v) for v in value) + "]"


def toml_documents(keys: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    line = st.tuples(keys, toml_values).map(
        lambda kv: f"{json.dumps(kv[0])} = {toml_literal(kv[1])}"
    )
    table = st.tuples(st.sampled_from(SECTIONS), st.lists(line, max_size=3)).map(
        lambda t: "\n".join([f"[{t[0]}]", *t[1]])
    )
    return st.lists(st.one_of(line, table), max_size=3).map("\n".join)


def check_settings_file(data: bytes) -> None:
    path = _config_dir / "config.toml"
    path.write_bytes(data)
    try:
        settings = load_settings(path)
    except Exception as exc:
        assert isinstance(exc, ConfigError), f"{type(exc).__name__}: {exc}"
        assert_one_clean_line(exc)
        assert str(exc).startswith(f"{path}: "), str(exc)
        assert exc.exit_code == 2
    else:
        assert isinstance(settings, Settings)
        assert settings.config_file == path


@PURE_PROPERTY
@given(data=st.one_of(st.binary(max_size=200), st.text(any_char, max_size=200).map(
    lambda t: t.encode("utf-8", "surrogatepass"))))  # fmt: skip
@example(data=b"\xef\xbb\xbf[model]\nname = 'x'").via("BOM")
@example(data=b"[model]\nname = 'a\x00b'").via("NUL in a string")
@example(data=b"[[ui]]\n").via("array of tables")
def test_junk_settings_file_is_settings_or_one_config_error(data: bytes) -> None:
    check_settings_file(data)


@PURE_PROPERTY
@given(document=toml_documents(st.sampled_from(KNOWN_KEYS)))
def test_wrongly_typed_settings_are_one_config_error(document: str) -> None:
    check_settings_file(document.encode("utf-8"))


@PURE_PROPERTY
@given(document=toml_documents(st.text(any_char, max_size=12)))
@example(document='"a\\nb" = 1').via("top-level key with a newline")
@example(document='[model]\n"\\u001b]0;t\\u0007" = 1').via("section key with OSC title")
def test_settings_file_with_any_key_is_one_config_error(document: str) -> None:
    check_settings_file(document.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("a = " + "[" * 5000 + "]" * 5000, id="nested-arrays"),
        pytest.param("a = " + "{b = " * 2000 + "1" + "}" * 2000, id="nested-inline-tables"),
    ],
)
def test_deeply_nested_settings_are_one_config_error(content: str) -> None:
    check_settings_file(content.encode("utf-8"))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            "[model]\nname = \"\\u001b[2J\\u0007\"\n[limits]\nmax_memory_chars = 'x'",
            id="escape-in-an-accepted-value",
        ),
        pytest.param('[limits]\nmax_memory_chars = "\\u001b[2J\\n"', id="escape-in-bad-value"),
        pytest.param("[database]\npool_max_size = 1e400", id="huge-float"),
        pytest.param("model = 'offline'", id="section-as-scalar"),
        pytest.param("[ui]\nusers = [1, [2], {a = 3}]", id="nested-wrong-types"),
    ],
)
def test_settings_values_are_quoted_safely(content: str) -> None:
    check_settings_file(content.encode("utf-8"))
