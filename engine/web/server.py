"""The aiohttp layer in front of textual-serve: links, cookies, Host/Origin checks, the cap.

Each websocket is one browser tab and one app process (textual-serve's
AppService runs ``python -m tui.launch``): a user link's process is started
``--as-user USER`` (the engine fixes it to that user: engine/runtime.py), the
admin link's runs the full app. No tab runs memory workers (``--no-workers``):
`memchat serve` runs one ``memchat worker`` for all of them (engine/cli/serve_commands.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from engine.web.access import COOKIE, Access, Identity
from engine.web.page import CONTENT_SECURITY_POLICY, app_page, entering_page, note_page

log = logging.getLogger("memchat.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def textual_serve_static() -> Path:
    import textual_serve  # the extra: checked by serve_commands before we get here

    return Path(textual_serve.__file__).parent / "static"


@dataclass(slots=True)
class TabCommand:
    """How a tab's app process is started: argv plus the environment it adds."""

    argv_prefix: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    admin_users: Sequence[str] = ()

    def argv(self, identity: Identity) -> list[str]:
        if identity.user_id is not None:
            return [*self.argv_prefix, "--as-user", identity.user_id, "--no-workers"]
        users = ["--users", ",".join(self.admin_users)] if self.admin_users else []
        return [*self.argv_prefix, *users, "--no-workers"]


class Tab:
    """One websocket and its app process."""

    def __init__(self, identity: Identity, command: TabCommand, ws: web.WebSocketResponse) -> None:
        from textual_serve.app_service import AppService
        from textual_serve.download_manager import DownloadManager

        extra_env = command.env

        class _Service(AppService):
            def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
                env: dict[str, str] = super()._build_environment(width, height)
                env.update(extra_env)
                return env

        self.identity = identity
        self.ws = ws

        async def close() -> None:
            await ws.close()

        self.service = _Service(
            shlex.join(command.argv(identity)),
            write_bytes=ws.send_bytes,
            write_str=ws.send_str,
            close=close,
            download_manager=DownloadManager(),
        )

    @property
    def pid(self) -> int | None:
        process = self.service._process
        return process.pid if process is not None else None

    async def stop(self, grace: float) -> None:
        """Ask the app to quit; kill it if it has not within ``grace`` seconds."""
        try:
            await asyncio.wait_for(self.service.stop(), grace)
        except TimeoutError:
            process = self.service._process
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


class WebServer:
    def __init__(
        self,
        access: Access,
        command: TabCommand,
        *,
        allowed_hosts: Sequence[str],
        max_sessions: int,
        shutdown_timeout: float,
        tabs_per_link: int | None = None,
    ) -> None:
        self.access = access
        self.command = command
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_sessions = max_sessions
        self.tabs_per_link = tabs_per_link or max_sessions
        self.shutdown_timeout = shutdown_timeout
        self.tabs: set[Tab] = set()
        self._stopping = False
        self.app = web.Application(middlewares=[self._guard])
        self.app.add_routes(
            [
                web.get("/", self.index),
                web.get("/u/{token}", self.enter),
                web.get("/ws", self.websocket),
                web.static("/static", textual_serve_static(), show_index=False),
            ]
        )

    # -- checks ------------------------------------------------------------

    def _host_ok(self, request: web.Request) -> bool:
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends
        # its own name as Host.
        return (request.host or "").lower() in self.allowed_hosts

    def _origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return False
        scheme, _, host = origin.lower().partition("://")
        return scheme in ("http", "https") and host in self.allowed_hosts

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._host_ok(request):
            response: web.StreamResponse = _note(421, "Wrong host", "Not served at that name.")
        elif request.method != "GET":
            response = _note(405, "Not allowed", "Only pages are served here.")
        else:
            response = await handler(request)
        if not isinstance(response, web.WebSocketResponse):
            response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            response.headers["X-Frame-Options"] = "DENY"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["Cache-Control"] = "no-store"
        return response

    def _identity(self, request: web.Request) -> Identity | None:
        return self.access.session(request.cookies.get(COOKIE))

    # -- pages -------------------------------------------------------------

    async def enter(self, request: web.Request) -> web.StreamResponse:
        exchanged = self.access.exchange(request.match_info["token"])
        if exchanged is None:
            log.info("refused a link with an unknown token")  # never the token itself
            return _note(
                403,
                "Link not valid",
                "This memchat link is not valid: it may be from an earlier run of "
                "`memchat serve`. Ask for a new one.",
            )
        identity, session = exchanged
        log.info("link opened: %s", identity.label)
        response = web.Response(text=entering_page(), content_type="text/html")
        response.set_cookie(
            COOKIE,
            session,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=request.secure,
        )
        return response

    async def index(self, request: web.Request) -> web.StreamResponse:
        identity = self._identity(request)
        if identity is None:
            return _note(403, "No access", "Open memchat with the private link you were given.")
        refused = self._refusal(identity)
        if refused is not None:
            return refused
        return web.Response(text=app_page(identity.label), content_type="text/html")

    def _refusal(self, identity: Identity) -> web.Response | None:
        """503 when every tab is taken, or this link holds its share already."""
        if len(self.tabs) >= self.max_sessions:
            return self._full()
        # A red-team finding: one link (or a script with its cookie) opening
        # every slot locked every other user and the admin out.
        if sum(1 for tab in self.tabs if tab.identity == identity) >= self.tabs_per_link:
            return _note(
                503,
                "Too many tabs",
                f"This link has {self.tabs_per_link} memchat tabs open already "
                "(serve.tabs_per_link): close one of them first.",
            )
        return None

    def _full(self) -> web.Response:
        return _note(
            503,
            "memchat is full",
            f"All {self.max_sessions} memchat sessions are in use. Try again when "
            "someone closes their tab.",
        )

    # -- the app -----------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        # Cross-site websockets carry no SameSite=Strict cookie, but a page on
        # another origin must not even start an app: Origin is checked first.
        if not self._origin_ok(request):
            log.info("refused a websocket from origin %r", request.headers.get("Origin"))
            return _note(403, "Wrong origin", "Not from this server's page.")
        identity = self._identity(request)
        if identity is None:
            return _note(403, "No access", "No session: open your private link.")
        if self._stopping:
            return _note(503, "Stopping", "memchat is shutting down.")
        refused = self._refusal(identity)
        if refused is not None:
            log.info("refused a tab for %s: %d tabs open", identity.label, len(self.tabs))
            return refused
        ws = web.WebSocketResponse(heartbeat=15, max_msg_size=1 << 20)
        tab = Tab(identity, self.command, ws)
        self.tabs.add(tab)  # before any await: the cap holds under a burst
        try:
            await ws.prepare(request)
            width = _int(request.query.get("width"), 80)
            height = _int(request.query.get("height"), 24)
            await tab.service.start(width, height)
            log.info(
                "tab opened: %s (pid %s; %d of %d)",
                identity.label,
                tab.pid,
                len(self.tabs),
                self.max_sessions,
            )
            await _relay(ws, tab)
        finally:
            await tab.stop(self.shutdown_timeout)
            self.tabs.discard(tab)
            log.info("tab closed: %s (%d open)", identity.label, len(self.tabs))
        return ws

    async def close_tabs(self) -> None:
        """Every app asked to quit at once; each killed after shutdown_timeout."""
        self._stopping = True
        tabs = list(self.tabs)
        await asyncio.gather(*(tab.stop(self.shutdown_timeout) for tab in tabs))
        for tab in tabs:
            with contextlib.suppress(Exception):
                await tab.ws.close()


async def _relay(ws: web.WebSocketResponse, tab: Tab) -> None:
    """textual-serve's protocol, browser to app: keys, size, focus, ping."""
    service = tab.service
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        try:
            envelope = json.loads(message.data)
            # A frame is the visitor's to forge: ["stdin"] with no payload ended
            # the tab with a traceback in serve's log (red team, finding W2).
            kind, payload = envelope[0], envelope[1] if len(envelope) > 1 else None
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        if kind == "stdin" and isinstance(payload, str):
            await service.send_bytes(payload.encode("utf-8", "replace"))
        elif kind == "resize" and isinstance(payload, dict):
            width, height = _int(payload.get("width"), 80), _int(payload.get("height"), 24)
            await service.set_terminal_size(width, height)
        elif kind == "ping":
            await ws.send_json(["pong", payload])
        elif kind == "blur":
            await service.blur()
        elif kind == "focus":
            await service.focus()


def _int(value: Any, default: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return min(max(number, 10), 1000)


def _note(status: int, title: str, text: str) -> web.Response:
    return web.Response(status=status, text=note_page(title, text), content_type="text/html")


def tab_environment(pool_max_size: int) -> dict[str, str]:
    """A small database pool per tab (each tab is a process with its own pools)."""
    return {
        "MEMCHAT_DATABASE__POOL_MIN_SIZE": "1",
        "MEMCHAT_DATABASE__POOL_MAX_SIZE": str(pool_max_size),
        # Python's own, so an app's crash is a line in serve's output.
        "PYTHONUNBUFFERED": "1",
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
    }
