"""`memchat serve` in real browsers: Chromium through Playwright, three contexts at once.

Skipped (with the reason) where Playwright or Chromium is missing; .ci/run
installs both (`apt-get install chromium`, `pip install playwright`) and runs
this with `-m browser`. The screen is read from the very websocket frames the
browser's terminal draws (pyte). Screenshots go to the test's temporary
directory, or to docs/screenshots/ with MEMCHAT_SCREENSHOTS=1 (to refresh the
README's pictures).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyte
import pytest
from aiohttp import web

from tests.web.client import Served
from tests.web.test_serve import ADMIN, ALICE, BOB, memories_shown, start_serve

pytestmark = [pytest.mark.db, pytest.mark.slow, pytest.mark.browser]

# docs/screenshots/ when asked (MEMCHAT_SCREENSHOTS=1): a test run must not
# change the checkout; otherwise the pictures go to the test's own directory.
DOC_SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots"
CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
    None,
)

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]


def _need_browser() -> None:
    if async_playwright is None:
        pytest.skip("Playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")


class Screen:
    """What one browser page's terminal shows: the websocket's frames through pyte."""

    def __init__(self, page: Page, width: int, height: int) -> None:
        self.screen = pyte.Screen(width, height)
        self.stream = pyte.ByteStream(self.screen)
        self.seen: list[str] = []
        self.changed = asyncio.Event()
        page.on("websocket", self._attach)

    def _attach(self, ws: Any) -> None:
        # The app starts at the size in the websocket's URL (textual.js's fit);
        # later sizes come as "resize" messages.
        query = parse_qs(urlsplit(ws.url).query)
        self.resize(int(query["width"][0]), int(query["height"][0]))
        ws.on("framereceived", self._frame)
        ws.on("framesent", self._sent)

    def _sent(self, payload: str | bytes) -> None:
        if isinstance(payload, str) and payload.startswith('["resize"'):
            size = json.loads(payload)[1]
            self.resize(size["width"], size["height"])

    def _frame(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.stream.feed(payload)
            self.seen.append(self.text)
            self.changed.set()

    def resize(self, width: int, height: int) -> None:
        self.screen.resize(height, width)

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    async def wait_for(self, condition: Callable[[str], bool], within: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not condition(self.text):
            self.changed.clear()
            if loop.time() > deadline:
                raise AssertionError(f"the page never showed it; it shows:\n{self.text}")
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
            except TimeoutError:
                continue


@pytest.fixture
def served(database_dsn: str, tmp_path: Path) -> Iterator[Served]:
    _need_browser()
    server = start_serve(database_dsn, tmp_path, MEMCHAT_SERVE__MAX_SESSIONS="4")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(10)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    _need_browser()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _open(browser: Browser, url: str) -> tuple[Page, Screen]:
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    screen = Screen(page, 200, 60)
    response = await page.goto(url)
    assert response is not None and response.status == 200
    return page, screen


async def _hostile_page(port_base: str) -> tuple[web.AppRunner, str]:
    """A page on another origin of the same site (127.0.0.1, another port): the
    SameSite=Strict cookie goes with its requests, so only the Origin check stops it."""
    script = f"""<script>
      const ws = new WebSocket("{port_base.replace("http", "ws")}/ws?width=80&height=24");
      ws.onopen = () => {{ document.title = "opened"; }};
      ws.onclose = () => {{ if (document.title !== "opened") document.title = "refused"; }};
    </script>"""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=script, content_type="text/html")

    app = web.Application()
    app.add_routes([web.get("/", page)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


async def test_two_people_and_the_admin_in_three_browsers(
    served: Served, browser: Browser, tmp_path: Path
) -> None:
    shots = DOC_SCREENSHOTS if os.environ.get("MEMCHAT_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    (alice, alice_screen), (bob, bob_screen) = await asyncio.gather(
        _open(browser, served.links[ALICE]), _open(browser, served.links[BOB])
    )
    await asyncio.gather(
        alice_screen.wait_for(lambda t: f"Say hi as {ALICE}" in t),
        bob_screen.wait_for(lambda t: f"Say hi as {BOB}" in t),
    )
    # Focus on load: typing goes to the app without a click. Both type at once.
    await asyncio.gather(
        alice.keyboard.type("My name is Alice and I like kites."),
        bob.keyboard.type("My name is Bob and I like chess."),
    )
    await asyncio.gather(alice.keyboard.press("Enter"), bob.keyboard.press("Enter"))
    await asyncio.gather(
        alice_screen.wait_for(lambda t: "Nice to meet you, Alice" in t),
        bob_screen.wait_for(lambda t: "Nice to meet you, Bob" in t),
    )
    await asyncio.gather(
        alice_screen.wait_for(lambda t: "kites" in memories_shown(t)),
        bob_screen.wait_for(lambda t: "chess" in memories_shown(t)),
    )
    await alice.screenshot(path=str(shots / "serve-alice.png"))
    await bob.screenshot(path=str(shots / "serve-bob.png"))

    # Browsers keep ctrl+w / ctrl+t / ctrl+n: the alternatives reach the app.
    await alice.keyboard.type("kept words gone")
    await alice_screen.wait_for(lambda t: "kept words gone" in t)
    await alice.keyboard.press("Alt+Backspace")  # delete a word (ctrl+w's job)
    await alice_screen.wait_for(lambda t: "kept words" in t and "kept words g" not in t)
    await alice.keyboard.press("Control+p")  # the palette: New session (ctrl+t's job)
    await alice.keyboard.type("New session for")
    await alice_screen.wait_for(lambda t: f"New session for {ALICE}" in t)
    await alice.keyboard.press("Enter")
    await alice_screen.wait_for(lambda t: f"{ALICE} · New session" in t)

    # The admin link: the full app; the inspector shows both users live.
    admin, admin_screen = await _open(browser, served.links[ADMIN])
    await admin_screen.wait_for(lambda t: f"Say hi as {ALICE}" in t and f"Say hi as {BOB}" in t)
    await admin.keyboard.press("F3")
    try:
        await admin_screen.wait_for(
            lambda t: "Isolation inspector" in t and "kites" in t and "chess" in t, within=30
        )
    finally:
        await admin.screenshot(path=str(shots / "serve-admin.png"))

    # Isolation, over everything each page ever drew.
    alice_all, bob_all = "\n".join(alice_screen.seen), "\n".join(bob_screen.seen)
    assert "kites" not in bob_all and ALICE not in bob_all and "Alice" not in bob_all
    assert "chess" not in alice_all and BOB not in alice_all and "Bob" not in alice_all

    # A wrong token, and a page on another origin in bob's own context.
    refused = await bob.context.new_page()
    response = await refused.goto(served.base + "/u/not-a-token")
    assert response is not None and response.status == 403
    runner, hostile_url = await _hostile_page(served.base)
    try:
        await refused.goto(hostile_url)
        await refused.wait_for_function("document.title !== ''", timeout=20_000)
        assert await refused.title() == "refused"
    finally:
        await runner.cleanup()
