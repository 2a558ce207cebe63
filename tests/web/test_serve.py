"""`memchat serve` end to end without a browser: the real server process, its real app
processes and worker, real PostgreSQL; the websocket spoken as textual.js does, the screen
read with pyte."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import asyncpg
import psutil
import pytest

from tests.web.client import Page, Served, parse_links

pytestmark = [pytest.mark.db, pytest.mark.slow]

ALICE, BOB = "alice@example.com", "bob@example.com"
ADMIN = "admin (all users)"


def start_serve(database_dsn: str, tmp_path: Path, **env: str) -> Served:
    config = tmp_path / "none.toml"
    config.touch()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--users", f"{ALICE},{BOB}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_CONFIG": str(config),
            **env,
        },
    )
    assert process.stdout is not None
    lines = []
    while len(lines) < 5:  # the heading, the note, three links
        line = process.stdout.readline()
        if not line:
            process.wait(10)
            assert process.stderr is not None
            raise AssertionError(f"serve ended: {''.join(lines)}{process.stderr.read()}")
        lines.append(line)
    output = "".join(lines)
    base = output.split()[2]
    return Served(process, base, parse_links(output))


@pytest.fixture
def served(database_dsn: str, tmp_path: Path) -> Iterator[Served]:
    server = start_serve(database_dsn, tmp_path, MEMCHAT_SERVE__MAX_SESSIONS="2")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(10)


def memories_shown(text: str) -> str:
    return text.split("Memories", 1)[-1]


async def test_two_users_each_see_only_their_own_and_the_refusals_hold(served: Served) -> None:
    assert set(served.links) == {ALICE, BOB, ADMIN}
    alice, bob, intruder, third = (Page(served.base) for _ in range(4))
    try:
        assert await alice.open_link(served.links[ALICE]) == 200
        assert await bob.open_link(served.links[BOB]) == 200
        await asyncio.gather(alice.connect(), bob.connect())
        await asyncio.gather(
            alice.wait_for(lambda t: f"Say hi as {ALICE}" in t),
            bob.wait_for(lambda t: f"Say hi as {BOB}" in t),
        )
        # Both type at once; each reply streams into its own page only.
        await asyncio.gather(
            alice.type("My name is Alice and I like kites.\r"),
            bob.type("My name is Bob and I like chess.\r"),
        )
        await asyncio.gather(
            alice.wait_for(lambda t: "Nice to meet you, Alice" in t),
            bob.wait_for(lambda t: "Nice to meet you, Bob" in t),
        )
        # Memories come from serve's one worker process, live, to each page.
        await asyncio.gather(
            alice.wait_for(lambda t: "kites" in memories_shown(t)),
            bob.wait_for(lambda t: "chess" in memories_shown(t)),
        )
        for page, own, other in ((alice, ALICE, BOB), (bob, BOB, ALICE)):
            everything = "\n".join(page.seen)
            assert other not in everything and own in everything
            assert "inspector" not in everything.lower()
        assert "kites" not in "\n".join(bob.seen) and "Alice" not in "\n".join(bob.seen)
        assert "chess" not in "\n".join(alice.seen) and "Bob" not in "\n".join(alice.seen)

        # The cap (2): a third tab is refused, page and websocket alike.
        assert await third.open_link(served.links[ADMIN]) == 200
        status, text = await third.get("/")
        assert status == 503 and "All 2 memchat sessions are in use" in text
        with pytest.raises(Exception, match="503"):
            await third.connect()

        # No link, a wrong token, another origin, another Host: refused.
        assert (await intruder.get("/"))[0] == 403
        assert await intruder.open_link(served.base + "/u/not-a-token") == 403
        with pytest.raises(Exception, match="403"):
            await intruder.connect()
        assert await intruder.open_link(served.links[BOB]) == 200
        with pytest.raises(Exception, match="403"):
            await intruder.connect(origin="http://evil.example")
        status, _ = await intruder.get("/", Host="evil.example")
        assert status == 421
    finally:
        for page in (alice, bob, intruder, third):
            await page.close()


def read_until(stream: IO[str], text: str) -> None:
    while text not in (line := stream.readline()):
        assert line, f"never said {text!r}"


async def database_backends(dsn: str) -> int:
    """Client connections to this test's database, but this one."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_tabs_are_small_and_stopping_is_prompt(served: Served, database_dsn: str) -> None:
    page = Page(served.base)
    try:
        # The worker says so once its pools are open: from then on, new backends are the tab's.
        assert served.process.stderr is not None
        await asyncio.to_thread(read_until, served.process.stderr, "Ctrl-C to stop")
        before = await database_backends(database_dsn)
        assert await page.open_link(served.links[ALICE]) == 200
        await page.connect()
        await page.wait_for(lambda t: f"Say hi as {ALICE}" in t)
        tabs = [
            p
            for p in psutil.Process(served.process.pid).children(recursive=True)
            if "--as-user" in p.cmdline()
        ]
        assert len(tabs) == 1
        rss_mb = tabs[0].memory_info().rss / 2**20
        after = await database_backends(database_dsn)
        tab_connections = after - before
        print(f"tab process: RSS {rss_mb:.0f} MB, {tab_connections} database connections")
        assert rss_mb < 200
        # The pool's minimum (1) and the LISTEN connection; at most pool_max_size (3) + 1.
        assert 1 <= tab_connections <= 4
        started = time.monotonic()
        served.process.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(served.process.wait, 30)
        took = time.monotonic() - started
        print(f"serve stopped in {took:.1f} s")
        assert code == 0
        assert took < 5.0 + 5.0  # serve.shutdown_timeout, and a margin for a loaded machine
        assert not tabs[0].is_running()
        assert served.process.stdout is not None and served.process.stderr is not None
        output = served.process.stdout.read() + served.process.stderr.read()
        assert "stopping" in output
        assert "/u/" not in output  # tokens are printed once, never logged
    finally:
        await page.close()


def test_a_killed_serve_takes_its_memory_worker_along(database_dsn: str, tmp_path: Path) -> None:
    # SIGKILL (an OOM kill, a CI timeout) gives serve no chance to stop its
    # worker: the worker must not live on, claiming jobs with nobody to stop it.
    server = start_serve(database_dsn, tmp_path)
    workers = [
        p for p in psutil.Process(server.process.pid).children() if p.cmdline()[-1:] == ["worker"]
    ]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    server.process.kill()
    server.process.wait(10)
    _gone, alive = psutil.wait_procs(workers, timeout=30)
    for process in alive:
        process.kill()
    assert alive == [], "the worker outlived serve"
