"""Red team against `memchat export` and the app's export (issue 14): real `memchat`
processes, real PostgreSQL, real files, symlinks and modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.export import file_name
from engine.store import Store

pytestmark = [pytest.mark.db, pytest.mark.slow]

ALICE, BOB = "alice@example.com", "bob@example.com"
HOSTILE_TITLE = "../../../etc/cron.d/x\x1b]0;pwned\x07\u202egpj.md"


def export(cwd: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    config = cwd / "none.toml"
    config.touch()
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "export", *args],
        cwd=cwd,
        capture_output=True,
        env={**os.environ, "MEMCHAT_DATABASE__URL": dsn, "MEMCHAT_CONFIG": str(config)},
        timeout=120,
        # A umask that lets others read: what most shells have.
        preexec_fn=lambda: os.umask(0o022),
    )


def _exports(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.md"))


async def _session(store: Store, user: str, title: str, *said: str) -> str:
    async with store.scope(user) as s:
        sid = (await s.create_session(title)).session_id
        for n, text in enumerate(said):
            await s.append_message(sid, "user" if n % 2 == 0 else "assistant", text)
    return str(sid)


async def test_another_users_session_and_bad_ids_are_one_line(
    store: Store, database_dsn: str, tmp_path: Path
) -> None:
    """Attack: Alice's export names Bob's session id; ids with path parts, NUL,
    escapes. Held: one line each, exit 1/2, no file, nothing of Bob's printed."""
    bobs = await _session(store, BOB, "bob's trip", "BOB-SECRET-41")
    await _session(store, ALICE, "mine", "hello")
    for session in (bobs, "../../etc/passwd", "\x1b]0;x\x07", "00000000-0000-0000-0000-0"):
        done = export(tmp_path, database_dsn, "--user", ALICE, "--session", session)
        assert done.returncode != 0, session
        assert b"BOB-SECRET" not in done.stdout + done.stderr
        assert b"Traceback" not in done.stderr and b"\x1b" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _exports(tmp_path) == []


async def test_hostile_title_planted_symlink_and_escapes(
    store: Store, database_dsn: str, tmp_path: Path
) -> None:
    """Attack: a session titled with path traversal, an OSC escape and a bidi override;
    a symlink planted where the export's file name will be (pointing at a file the
    attacker wants overwritten); escapes in the messages, exported to stdout.
    Held: the file lands in the current directory under a cleaned name, the symlink
    and its target are untouched; stdout shows escapes, never emits them."""
    sid = await _session(store, ALICE, HOSTILE_TITLE, "hi \x1b]52;c;cm0gLXJm\x07", "ok")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    async with store.scope(ALICE) as s:
        planted = tmp_path / file_name(await s.get_session(sid))
    planted.symlink_to(victim)
    done = export(tmp_path, database_dsn, "--user", ALICE, "--session", sid)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious" and planted.is_symlink()
    written = [p for p in _exports(tmp_path) if not p.is_symlink()]
    assert [p.parent for p in written] == [tmp_path]
    assert all(c.isalnum() or c in "._@-" for c in written[0].name), written[0].name
    assert written[0].name == planted.name.removesuffix(".md") + "-2.md"
    shown = export(tmp_path, database_dsn, "--user", ALICE, "--session", sid, "--output", "-")
    assert shown.returncode == 0
    assert b"\x1b" not in shown.stdout and b"\x07" not in shown.stdout
    assert b"\\x1b]52;c;" in shown.stdout


async def test_an_exported_chat_is_private_to_its_owner(
    store: Store, database_dsn: str, tmp_path: Path
) -> None:
    """Attack: another OS user reads exported chats. memchat keeps chats in a 0700
    data dir (credentials 0600), but an export was written with the umask's mode
    (0644 under the usual 022), readable by every local user; a `memchat serve` tab's
    export lands on the server's disk (Downloads or serve's current directory), where
    that web user cannot even see it. Finding E1 (fixed in engine/export.py): new
    export files are 0600, whatever the umask."""
    sid = await _session(store, ALICE, "private", "my diagnosis is ...")
    done = export(tmp_path, database_dsn, "--user", ALICE, "--session", sid)
    assert done.returncode == 0, done.stderr
    (written,) = _exports(tmp_path)
    assert written.stat().st_mode & 0o777 == 0o600
