"""A browser stand-in for `memchat serve`: cookies, textual-serve's websocket protocol, pyte."""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pyte

LINK = re.compile(r"^\s+(\S.*?)\s+(https?://\S+/u/\S+)$", re.M)


@dataclass
class Served:
    """A running `memchat serve`: its process, base URL and links (label -> URL)."""

    process: subprocess.Popen[str]
    base: str
    links: dict[str, str]


def parse_links(output: str) -> dict[str, str]:
    return {label: url for label, url in LINK.findall(output)}


class Page:
    """One browser tab: its own cookie jar, one app over the websocket, a pyte screen."""

    def __init__(self, base: str, *, width: int = 120, height: int = 36) -> None:
        self.base = base
        self.width, self.height = width, height
        # unsafe=True: keep cookies for an IP-address host (127.0.0.1), as browsers do.
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.screen = pyte.Screen(width, height)
        self.stream = pyte.ByteStream(self.screen)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.seen: list[str] = []
        """Every screen text this page showed (isolation checks look at all of it)."""

    async def open_link(self, url: str) -> int:
        async with self.http.get(url) as response:
            await response.read()
            return response.status

    async def get(self, path: str, **headers: str) -> tuple[int, str]:
        async with self.http.get(self.base + path, headers=headers) as response:
            return response.status, await response.text()

    async def connect(self, origin: str | None = None) -> None:
        self.ws = await self.http.ws_connect(
            f"{self.base}/ws?width={self.width}&height={self.height}",
            headers={"Origin": origin or self.base},
        )
        await self.ws.send_str(json.dumps(["resize", {"width": self.width, "height": self.height}]))
        await self.ws.send_str(json.dumps(["focus"]))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                self.stream.feed(message.data)
                self.seen.append(self.text)
                self._changed.set()

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    @property
    def closed(self) -> bool:
        return self.ws is None or self.ws.closed

    async def type(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(["stdin", text]))

    async def wait_for(self, condition: Callable[[str], bool], within: float = 60.0) -> str:
        """Until the screen shows what ``condition`` accepts: waits on each new frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not condition(self.text):
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0 or (self.closed and self._reader is not None and self._reader.done()):
                raise AssertionError(f"screen never matched; it shows:\n{self.text}")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue
        return self.text

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.http.close()
