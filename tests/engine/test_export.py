"""`memchat export` and engine/export.py: a session as Markdown, read through the user's scope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import NotFound
from engine.export import export_session, file_name, write_new_file
from engine.store import Store
from tests.conftest import Run

pytestmark = pytest.mark.db

REPLY = "Here:\n\n```python\nprint('hi')\n```\n"


async def _session_with_messages(store: Store, user: str) -> str:
    async with store.scope(user) as s:
        await s.ensure_user()
        session = await s.create_session("Trip to Paris")
        await s.append_message(session.session_id, "user", "Show me \x1b]52;c;aGk=\x07 code")
        await s.append_message(session.session_id, "assistant", REPLY)
        await s.append_message(session.session_id, "user", "And in shell?")
        await s.append_message(session.session_id, "assistant", "half", status="cancelled")
    return str(session.session_id)


async def test_export_holds_every_message_in_order_with_who_and_outcome(store: Store) -> None:
    session_id = await _session_with_messages(store, "alice")
    exported = await export_session(store, "alice", session_id)
    text = exported.markdown
    assert text.startswith("# Trip to Paris\n")
    assert f"- session: {session_id}" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(" · ")[0] for h in headings] == [
        "## alice",
        "## assistant",
        "## alice",
        "## assistant",
    ]
    assert headings[3].endswith("(cancelled)")
    # The file holds the text as written: it is a document, not a terminal.
    assert "\x1b]52;c;aGk=\x07" in text
    assert text.index("Show me") < text.index("print('hi')") < text.index("half")
    assert exported.summary == "4 messages"


async def test_export_pages_through_long_sessions(store: Store) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        session = await s.create_session("long")
        for n in range(1203):
            await s.append_message(session.session_id, "user", f"line {n}")
    exported = await export_session(store, "bob", session.session_id)
    assert len(exported.messages) == 1203
    assert exported.markdown.count("\n## bob · ") == 1203


async def test_another_users_session_is_not_found(store: Store) -> None:
    session_id = await _session_with_messages(store, "alice")
    async with store.scope("mallory") as s:
        await s.ensure_user()
    with pytest.raises(NotFound):
        await export_session(store, "mallory", session_id)
    with pytest.raises(NotFound, match="no user nobody"):
        await export_session(store, "nobody", session_id)


def test_new_files_never_replace_an_earlier_export(tmp_path: Path) -> None:
    first = write_new_file(tmp_path, "x.md", "one")
    second = write_new_file(tmp_path, "x.md", "two")
    assert (first.name, second.name) == ("x.md", "x-2.md")
    assert first.read_text() == "one" and second.read_text() == "two"
    (tmp_path / "y.md").symlink_to(tmp_path / "elsewhere.md")
    assert write_new_file(tmp_path, "y.md", "three").name == "y-2.md"
    assert not (tmp_path / "elsewhere.md").exists()


async def test_file_names_keep_only_safe_characters(store: Store) -> None:
    async with store.scope("carol@example.com") as s:
        await s.ensure_user()
        session = await s.create_session("../../etc/passwd; rm -rf ~")
    name = file_name(session)
    assert "/" not in name and " " not in name and ";" not in name
    assert name.startswith("memchat-carol@example.com-etc-passwd-rm-rf")
    assert name.endswith(f"-{str(session.session_id)[:8]}.md")


# -- the command, as a real process ---------------------------------------------


def _memchat_in(cwd: Path, database_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMCHAT_DATABASE__URL": database_dsn, "MEMCHAT_CONFIG": os.devnull}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def _chat(memchat: Run) -> str:
    done = memchat("chat", "--user", "alice", "--json", "Remember: I like tea.")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["session_id"])


def test_export_writes_a_new_file_here_and_says_where(
    memchat: Run, database_dsn: str, tmp_path: Path
) -> None:
    session_id = _chat(memchat)
    work = tmp_path / "work"
    work.mkdir()
    result = _memchat_in(work, database_dsn, "export", "--user", "alice", "--session", session_id)
    assert result.returncode == 0, result.stderr
    (written,) = work.iterdir()
    assert result.stdout == f"exported 2 messages to {written}\n"
    text = written.read_text()
    assert "## alice · " in text and "Remember: I like tea." in text
    assert "## assistant · " in text
    again = _memchat_in(work, database_dsn, "export", "--user", "alice", "--session", session_id)
    assert again.returncode == 0
    assert len(list(work.iterdir())) == 2  # the first export is kept


def test_export_to_a_file_and_to_stdout(memchat: Run, tmp_path: Path) -> None:
    session_id = _chat(memchat)
    target = tmp_path / "chat.md"
    result = memchat("export", "--user", "alice", "--session", session_id, "-o", str(target))
    assert result.returncode == 0, result.stderr
    stdout = memchat("export", "--user", "alice", "--session", session_id, "--output", "-")
    assert stdout.returncode == 0
    assert stdout.stdout == target.read_text()
    assert stdout.stdout.startswith("# Remember: I like tea.")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--user", "nobody", "--session", "{sid}"], 3, "no user nobody"),
        (["--user", "alice", "--session", "00000000-0000-0000-0000-000000000000"], 3, "no session"),
        (["--user", "alice", "--session", "not-a-uuid"], 2, "session"),
        (["--user", "", "--session", "{sid}"], 2, "user"),
        (
            ["--user", "alice", "--session", "{sid}", "-o", "/nonexistent/dir/x.md"],
            2,
            "cannot write",
        ),
    ],
)
def test_export_refuses_with_one_line_and_the_right_exit_code(
    memchat: Run, args: list[str], code: int, message: str
) -> None:
    session_id = _chat(memchat)
    result = memchat("export", *(a.replace("{sid}", session_id) for a in args))
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_stdout_shows_escape_sequences_instead_of_obeying_them(
    memchat: Run, store_session: str
) -> None:
    result = memchat("export", "--user", "alice", "--session", store_session, "-o", "-")
    assert result.returncode == 0
    assert "\x1b" not in result.stdout and "\\x1b]52;c;aGk=\\x07" in result.stdout


@pytest.fixture
async def store_session(store: Store) -> str:
    return await _session_with_messages(store, "alice")
