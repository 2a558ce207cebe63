"""Red team against `memchat serve` (issue 16), as an attacker on the network or on the
machine would try it.

All real: the `memchat serve` process with its app processes and worker, PostgreSQL,
HTTP and websockets over TCP (raw bytes where a client library would tidy the request),
another OS user made with useradd (as root) reading /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest
from yarl import URL

from engine.store import Store
from engine.web.access import COOKIE
from tests.web.client import Page, Served
from tests.web.test_serve import ADMIN, ALICE, BOB, start_serve

pytestmark = [pytest.mark.db, pytest.mark.slow]

ATTACKER = "memchat-attacker"


@pytest.fixture
def served(database_dsn: str, tmp_path: Path) -> Iterator[Served]:
    server = start_serve(database_dsn, tmp_path, MEMCHAT_SERVE__MAX_SESSIONS="2")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(10)


def _port(served: Served) -> int:
    port = urlsplit(served.base).port
    assert port is not None
    return port


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send exactly these bytes; the status code (0: the server closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(65536), 30)
    finally:
        writer.close()
    if not head.startswith(b"HTTP/"):
        return 0, head
    return int(head.split(b" ", 2)[1]), head


def _tab_processes(served: Served) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(served.process.pid).children(recursive=True)
        if "tui.launch" in p.cmdline()
    ]


async def _session_cookie(served: Served, who: str) -> str:
    page = Page(served.base)
    try:
        assert await page.open_link(served.links[who]) == 200
        cookie = page.http.cookie_jar.filter_cookies(URL(served.base))[COOKIE].value
    finally:
        await page.close()
    return cookie


async def test_host_origin_cookie_and_path_tricks_are_refused(served: Served) -> None:
    """Attacks, each with a valid session cookie so that only the trick is tested:
    DNS rebinding Host variants (another name, our name as a prefix, another port, no
    port, no Host at all over HTTP/1.0, IPv6 forms with the wrong port), websocket
    Origins (none, "null", a look-alike suffix, userinfo, another scheme), forged and
    swapped cookies, the link token used as a cookie, POST, /static path traversal.
    Held: every one refused before any app process starts."""
    port = _port(served)
    cookie = await _session_cookie(served, ALICE)
    good = f"127.0.0.1:{port}".encode()

    def get(host: bytes | None, path: bytes = b"/", extra: bytes = b"") -> bytes:
        host_line = b"Host: " + host + b"\r\n" if host is not None else b""
        version = b"HTTP/1.1" if host is not None else b"HTTP/1.0"
        return (
            b"GET " + path + b" " + version + b"\r\n" + host_line
            + b"Cookie: " + COOKIE.encode() + b"=" + cookie.encode() + b"\r\n"
            + extra + b"Connection: close\r\n\r\n"
        )  # fmt: skip

    assert (await _raw(port, get(good)))[0] == 200  # the control: this request is served
    assert (await _raw(port, get(f"LOCALHOST:{port}".encode())))[0] == 200
    for host in (
        b"evil.example",
        f"evil.example:{port}".encode(),
        f"127.0.0.1:{port}.evil.example".encode(),
        f"127.0.0.1.evil.example:{port}".encode(),
        f"localhost.:{port}".encode(),
        f"127.0.0.1:{port + 1}".encode(),
        b"127.0.0.1",
        b"localhost",
        b"[::1]",
        f"[::1]:{port + 1}".encode(),
        f"127.0.0.1:{port}@evil.example".encode(),
        b"",
        None,
    ):
        status, _ = await _raw(port, get(host))
        assert status in (400, 421), (host, status)
    # A proxy's header does not stand in for Host (aiohttp reads Host alone).
    forwarded = get(b"evil.example", extra=b"X-Forwarded-Host: " + good + b"\r\n")
    assert (await _raw(port, forwarded))[0] == 421
    # An absolute request target names another site: the Host header is what counts.
    status, _ = await _raw(port, get(b"evil.example", path=f"http://{good.decode()}/".encode()))
    assert status in (400, 421)

    # Paths: nothing outside textual-serve's static folder, no directory listing.
    for path in (
        b"/static/../engine/config.py",
        b"/static/%2e%2e/%2e%2e/%2e%2e/engine/config.py",
        b"/static/..%2f..%2f..%2fengine%2fconfig.py",
        b"/static/",
        b"/static/js/",
        b"/u/",
        b"/u/%00",
        b"/ws/../",
    ):
        status, body = await _raw(port, get(good, path=path))
        assert status in (400, 403, 404), (path, status)
        assert b"pydantic" not in body and b"Index of" not in body

    # Only GET: a POST (a form on another site) is refused whatever it carries.
    post = get(good).replace(b"GET / HTTP/1.1", b"POST /u/x HTTP/1.1")
    assert (await _raw(port, post))[0] == 405

    # Cookies: forged, the token itself as a cookie, a session with a byte more.
    token = served.links[ALICE].rsplit("/", 1)[1]
    for forged in (uuid.uuid4().hex, token, cookie + "A", cookie[:-1], ""):
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            jar.update_cookies({COOKIE: forged}, URL(served.base))
            async with http.get(served.base + "/") as response:
                assert response.status == 403, forged

    # Websockets with a good cookie and a bad Origin.
    for origin in (
        None,
        "null",
        "http://evil.example",
        f"http://127.0.0.1:{port}.evil.example",
        f"http://127.0.0.1:{port}@evil.example",
        f"http://evil.example#http://127.0.0.1:{port}",
        f"file://127.0.0.1:{port}",
        f"http://127.0.0.1:{port + 1}",
        f"http://127.0.0.1:{port}/",
    ):
        headers = {"Host": good.decode(), "Cookie": f"{COOKIE}={cookie}"}
        if origin is not None:
            headers["Origin"] = origin
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(served.base + "/ws", headers=headers)
        assert refused.value.status == 403, origin
    assert _tab_processes(served) == []


async def test_the_link_leaves_no_trace_the_cookie_is_strict(served: Served) -> None:
    """Attack: find the token where it should not be: the entering page's headers
    (Referer, caching), the cookie's flags (script-readable? sent cross-site?), the
    links file's mode, serve's output after use. Held."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with (
        aiohttp.ClientSession(cookie_jar=jar) as http,
        http.get(served.links[BOB], allow_redirects=False) as response,
    ):
        assert response.status == 200
        set_cookie = response.headers["Set-Cookie"]
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        body = await response.text()
    token = served.links[BOB].rsplit("/", 1)[1]
    assert token not in body and token not in set_cookie
    flags = {part.strip().lower() for part in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    links_file = Path(os.environ["XDG_DATA_HOME"]) / "memchat" / "serve-links.json"
    assert links_file.exists() and links_file.stat().st_mode & 0o077 == 0


async def test_forged_frames_and_pasted_escapes_leave_the_tab_working(served: Served) -> None:
    """Attack on the websocket protocol: envelopes textual.js never sends ([],
    {}, ["stdin"] and ["ping"] and ["resize"] without their payload, a number, a binary
    frame, a resize to 10**9 columns) and pasted escape sequences (OSC 52 in a
    bracketed paste, its end marker, the web driver's own packet header bytes).
    Finding W2 (fixed in engine/web/server.py): ["stdin"] with no payload raised
    IndexError in the relay: the tab's app was stopped and serve logged a traceback.
    Now: all ignored, the tab takes text, serve logs no traceback."""
    page = Page(served.base)
    try:
        assert await page.open_link(served.links[ALICE]) == 200
        await page.connect()
        await page.wait_for(lambda t: f"Say hi as {ALICE}" in t)
        assert page.ws is not None
        for junk in ("[]", "{}", '["stdin"]', '["ping"]', '["resize"]', "7", "x" * 1000):
            await page.ws.send_str(junk)
        await page.ws.send_str(json.dumps(["resize", {"width": 10**9, "height": -5}]))
        await page.ws.send_bytes(b"\x00" * 1000)
        await page.ws.send_str(json.dumps(["resize", {"width": 120, "height": 36}]))
        await page.type("\x1b[200~\x1b]52;c;cm0gLXJmIH4=\x07\x1b[201~")
        await page.type("D\x00\x00\x00\x05quit")
        await page.type("after-paste-3b7")
        await page.wait_for(lambda t: "after-paste-3b7" in t)
        assert not page.closed and len(_tab_processes(served)) == 1
    finally:
        await page.close()
    served.process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(served.process.wait, 30) == 0
    assert served.process.stderr is not None
    assert "Traceback" not in served.process.stderr.read()


async def test_an_oversized_frame_ends_only_that_tab(served: Served) -> None:
    """Attack: a 2 MiB frame (the limit is 1 MiB). Held: that websocket is closed, its
    app process ends and its slot comes back: the next tab opens."""
    page = Page(served.base)
    try:
        assert await page.open_link(served.links[ALICE]) == 200
        await page.connect()
        await page.wait_for(lambda t: f"Say hi as {ALICE}" in t)
        assert page.ws is not None and page._reader is not None
        (tab,) = _tab_processes(served)
        await page.ws.send_str(json.dumps(["stdin", "y" * (2 << 20)]))
        await asyncio.wait_for(page._reader, 30)  # the server closed the websocket
        await asyncio.to_thread(tab.wait, 30)
    finally:
        await page.close()
    again = Page(served.base)
    try:
        assert await again.open_link(served.links[ALICE]) == 200
        await again.connect()
        await again.wait_for(lambda t: f"Say hi as {ALICE}" in t)
    finally:
        await again.close()


async def test_one_link_cannot_take_every_tab(database_dsn: str, tmp_path: Path) -> None:
    """Attack (red team finding W1): with Alice's link only, open every slot and keep
    them (a script with her cookie, kept alive by the heartbeat). Held since
    serve.tabs_per_link: her link gets its share (2 of 3), the next tab of hers is
    refused, and Bob (another link) still opens his."""
    server = start_serve(
        database_dsn,
        tmp_path,
        MEMCHAT_SERVE__MAX_SESSIONS="3",
        MEMCHAT_SERVE__TABS_PER_LINK="2",
    )
    hog = [Page(server.base) for _ in range(2)]
    extra = Page(server.base)
    bob = Page(server.base)
    try:
        for page in hog:
            assert await page.open_link(server.links[ALICE]) == 200
            await page.connect()
        assert await extra.open_link(server.links[ALICE]) == 200
        status, page = await extra.get("/")
        assert status == 503 and "serve.tabs_per_link" in page, "her share is taken"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await extra.connect()
        assert refused.value.status == 503
        assert await bob.open_link(server.links[BOB]) == 200
        await bob.connect()
        await bob.wait_for(lambda t: f"Say hi as {BOB}" in t)
    finally:
        for page in (*hog, extra, bob):
            await page.close()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


F_KEYS = [
    "\x1bOP",
    "\x1bOQ",
    "\x1bOR",
    "\x1bOS",
    "\x1b[15~",
    "\x1b[17~",
    "\x1b[18~",
    "\x1b[19~",
    "\x1b[20~",
    "\x1b[21~",
    "\x1b[23~",
    "\x1b[24~",
    "\x1b[1;2S",  # shift+f4
]


async def test_a_user_tab_reaches_no_other_users_data_by_keystrokes(
    served: Served, store: Store
) -> None:
    """Attack: from Alice's tab, only keys: every F-key (and shift+F4), alt+1..9, ctrl+n
    (add user) with Bob's id, the palette (ctrl+p) searching Bob's id, "inspector",
    "user", "session", "export", the session picker; a resize to the clamp. Bob's
    session title, message and memory are secrets. Held: none of them is ever on
    Alice's screen, and her tab still works afterwards."""
    async with store.scope(BOB) as bob:
        sid = (await bob.create_session("BOBTITLE-7c1")).session_id
        await bob.append_message(sid, "user", "BOBMSG-7c1")
        await bob.add_memory("BOBMEMORY-7c1")
    page = Page(served.base)
    try:
        assert await page.open_link(served.links[ALICE]) == 200
        await page.connect()
        await page.wait_for(lambda t: f"Say hi as {ALICE}" in t)
        assert page.ws is not None
        keys = [*F_KEYS, *(f"\x1b{n}" for n in range(1, 10))]
        keys += ["\x0e", f"{BOB}\r", "\x1b"]  # ctrl+n, Bob's id, Esc
        for search in (BOB, "bob", "inspector", "user", "session", "export", "open"):
            keys += ["\x10", search, "\r", "\x1b", "\x1b"]
        for key in keys:
            await page.type(key)
        await page.ws.send_str(json.dumps(["resize", {"width": 1000, "height": 1000}]))
        await page.ws.send_str(json.dumps(["resize", {"width": 120, "height": 36}]))
        # Settled: the prompt takes text again and shows it.
        await page.type("\x1b\x1b\x1bstill-alice-9f2")
        await page.wait_for(lambda t: "still-alice-9f2" in t, within=90)
        seen = "\n".join(page.seen)
        for secret in ("BOBTITLE-7c1", "BOBMSG-7c1", "BOBMEMORY-7c1"):
            assert secret not in seen
        assert len(_tab_processes(served)) == 1
        assert "--as-user" in _tab_processes(served)[0].cmdline()
    finally:
        await page.close()


@pytest.fixture
def attacker() -> str:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to create another OS user (useradd) and run as it")
    exists = subprocess.run(["id", ATTACKER], capture_output=True).returncode == 0
    if not exists:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/bin/sh", ATTACKER],
            check=True,
            capture_output=True,
        )
    return ATTACKER


async def _read_as(user: str, path: str) -> subprocess.CompletedProcess[bytes]:
    command = ["runuser", "-u", user, "--", "cat", path]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True)


async def test_no_secret_in_any_process_list_and_environ_is_private(
    served: Served, database_dsn: str, attacker: str
) -> None:
    """Attack from another OS user on the machine: read every memchat process's argv
    (/proc/PID/cmdline is world-readable: `ps`) and environment (/proc/PID/environ)
    for the links' tokens and the database password. Held: argv carries neither;
    environments (where serve's own database URL is) are the server user's alone."""
    page = Page(served.base)
    try:
        assert await page.open_link(served.links[ALICE]) == 200
        await page.connect()
        await page.wait_for(lambda t: f"Say hi as {ALICE}" in t)
        password = urlsplit(database_dsn).password
        assert password
        secrets = [password, *(url.rsplit("/", 1)[1] for url in served.links.values())]
        processes = [psutil.Process(served.process.pid), *psutil.Process(
            served.process.pid).children(recursive=True)]  # fmt: skip
        assert any("--as-user" in p.cmdline() for p in processes)
        assert any("worker" in p.cmdline() for p in processes)
        for process in processes:
            seen = await _read_as(attacker, f"/proc/{process.pid}/cmdline")
            assert seen.returncode == 0 and b"python" in seen.stdout
            for secret in secrets:
                assert secret.encode() not in seen.stdout
            environ = await _read_as(attacker, f"/proc/{process.pid}/environ")
            assert environ.returncode != 0 and environ.stdout == b""
    finally:
        await page.close()
    assert ADMIN in served.links


async def test_a_cookie_from_the_last_run_opens_nothing(database_dsn: str, tmp_path: Path) -> None:
    """Attack: replay a session cookie (and a link) stolen during the last run, after a
    restart without --keep-links. Held: both refused (403)."""
    first = start_serve(database_dsn, tmp_path)
    try:
        cookie = await _session_cookie(first, ALICE)
        old_link = first.links[ALICE]
    finally:
        first.process.send_signal(signal.SIGINT)
        await asyncio.to_thread(first.process.wait, 30)
    second = start_serve(database_dsn, tmp_path)
    try:
        headers = {"Cookie": f"{COOKIE}={cookie}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(second.base + "/", headers=headers) as response:
                assert response.status == 403
            token = old_link.rsplit("/", 1)[1]
            async with http.get(f"{second.base}/u/{token}") as response:
                assert response.status == 403
                assert "Set-Cookie" not in response.headers
    finally:
        second.process.kill()
        await asyncio.to_thread(second.process.wait, 30)


async def test_a_burst_of_websockets_stays_under_the_cap(served: Served) -> None:
    """Attack: 12 websockets at the same moment (max_sessions 2), to race the cap
    check against the tab's start. Held: at most 2 accepted, never more than 2 app
    processes, the rest 503; all processes gone once the pages close."""
    cookie = await _session_cookie(served, ALICE)
    headers = {"Cookie": f"{COOKIE}={cookie}", "Origin": served.base}
    async with aiohttp.ClientSession() as http:

        async def one() -> aiohttp.ClientWebSocketResponse | int:
            try:
                return await http.ws_connect(served.base + "/ws", headers=headers)
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status

        results = await asyncio.gather(*(one() for _ in range(12)))
        opened = [r for r in results if not isinstance(r, int)]
        assert len(opened) == 2 and sorted(r for r in results if isinstance(r, int)) == [503] * 10
        for ws in opened:  # the app's first frame: its process is running
            assert (await asyncio.wait_for(ws.receive(), 60)).type == aiohttp.WSMsgType.BINARY
        tabs = _tab_processes(served)
        assert len(tabs) == 2
        for ws in opened:
            await ws.close()
    for tab in tabs:
        await asyncio.to_thread(tab.wait, 30)
    assert _tab_processes(served) == []
