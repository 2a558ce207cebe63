"""CLI behaviour at the edges of a pipeline (issue 14, bug 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Run

pytestmark = pytest.mark.db


def test_a_closed_pipe_is_not_a_traceback(memchat: Run, database_dsn: str, tmp_path: Path) -> None:
    """`memchat users | head -3` printed a BrokenPipeError traceback."""
    for n in range(3):
        assert memchat("memory", "add", "--user", f"u{n}@example.com", "Likes tea").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before memchat writes a byte
    config = tmp_path / "none.toml"
    config.touch()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "engine.cli", "users"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "MEMCHAT_DATABASE__URL": database_dsn,
                "MEMCHAT_CONFIG": str(config),
            },
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0


def test_text_from_stdin_loses_its_trailing_newline(memchat: Run) -> None:
    result = memchat("chat", "--user", "ann@example.com", "--json", "-", stdin="hello there\n")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)["session_id"]
    history = memchat("history", "--user", "ann@example.com", "--session", session, "--json")
    assert '"hello there"' in history.stdout, history.stdout
