"""`memchat serve`'s edges that need no server: the missing extra, bad options, kept links."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.web.access import Access


def run_serve(*args: str, hide_extra: bool = False) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None is how Python spells "not installed" to find_spec.
    hide = "sys.modules['textual_serve'] = None; " if hide_extra else ""
    code = f"import sys; {hide}from engine.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_the_web_extra_serve_says_how_to_get_it_in_one_line() -> None:
    result = run_serve(hide_extra=True)
    assert result.returncode == 2
    assert result.stderr == (
        "memchat: error: memchat serve needs the web extra: pip install 'memchat[web]'\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 needs --public-url"),
        (["--port", "70000"], "--port must be 0..65535"),
        (["--users", "a\x1b[31m@x"], "user id"),
        (["--users", " , "], "--users needs at least one user id"),
    ],
)
def test_bad_options_are_one_line(args: list[str], message: str) -> None:
    result = run_serve(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_links_are_kept_only_for_the_same_users(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    first = Access.fresh(["a@x", "b@y"])
    first.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = Access.kept(path, ["a@x", "b@y"])
    assert [link.token for link in kept.links] == [link.token for link in first.links]
    other = Access.kept(path, ["a@x"])
    assert {link.token for link in other.links}.isdisjoint(link.token for link in first.links)
    # A token opens its identity; a session id, not the token, is what the cookie holds.
    exchanged = kept.exchange(first.links[1].token)
    assert exchanged is not None
    identity, session = exchanged
    assert identity.user_id == "b@y" and session != first.links[1].token
    assert kept.session(session) == identity
    assert kept.exchange("wrong") is None and kept.session("wrong") is None
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the kept links"):
        Access.kept(path, ["a@x"])
