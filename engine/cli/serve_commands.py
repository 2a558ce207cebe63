"""``memchat serve``: the app in browsers, a private link per user (engine/web).

Needs the ``web`` extra (textual-serve). This module imports no Textual: the
app runs in one process per browser tab (``python -m tui.launch``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import logging
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

from engine.cli.output import warn
from engine.cli.resources import open_store_only
from engine.config import Settings
from engine.errors import InvalidInput
from engine.validation import validate_user_id

log = logging.getLogger("memchat.serve")

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
LINKS_FILE = "serve-links.json"


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the app to browsers: a private link per user plus an admin link",
        description=(
            "Serve memchat over HTTP (needs `pip install 'memchat[web]'`). Prints one private "
            "link per user (that user's chat and memories only) and one admin link (every "
            "user, the inspector). New links on every start unless --keep-links."
        ),
        epilog=(
            "example:\n  memchat serve --users alice@example.com,bob@example.com\n"
            "  memchat serve --host 0.0.0.0 --port 8000 --public-url http://demo.lan:8000 "
            "--users a@x,b@y\n\n" + exit_codes
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--users", metavar="A,B,...", help="default: ui.users from the settings")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000; 0: any free one)")
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="the address people open (needed with a --host other than this machine's own)",
    )
    serve.add_argument(
        "--keep-links",
        action="store_true",
        help="reuse the links of the last run (default: new links, the old ones stop working)",
    )
    serve.set_defaults(handler=serve_command)


def _users(args: argparse.Namespace, settings: Settings) -> list[str]:
    raw = args.users.split(",") if args.users is not None else settings.ui.users
    users = [validate_user_id(u) for u in (part.strip() for part in raw) if u]
    if not users:
        raise InvalidInput("--users needs at least one user id")
    return list(dict.fromkeys(users))


def _site(args: argparse.Namespace, port: int) -> tuple[str, list[str]]:
    """The base URL to print and the Host values accepted (name:port)."""
    if args.public_url is not None:
        parts = urlsplit(args.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInput(
                f"--public-url must look like http://NAME:PORT, not {args.public_url!r}"
            )
        base = f"{parts.scheme}://{parts.netloc}"
        return base, [parts.netloc, f"{args.host}:{port}"]
    if args.host not in LOCAL_NAMES:
        raise InvalidInput(
            f"--host {args.host} needs --public-url (the address people open, e.g. "
            f"http://NAME:{port}): only requests for that name are accepted"
        )
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    return f"http://{host}:{port}", [f"{name}:{port}" for name in (*LOCAL_NAMES, host)]


async def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    if importlib.util.find_spec("textual_serve") is None:
        raise InvalidInput("memchat serve needs the web extra: pip install 'memchat[web]'")
    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be 0..65535, not {args.port}")
    users = _users(args, settings)
    _site(args, args.port)  # a bad --host / --public-url is one line before anything starts
    from aiohttp import web

    from engine.web.access import Access
    from engine.web.server import TabCommand, WebServer, tab_environment

    links_path = settings.user_data_dir() / LINKS_FILE
    access = Access.kept(links_path, users) if args.keep_links else Access.fresh(users)
    config = ["--config", args.config] if args.config else []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Migrations and the embedded server first, held for the whole run:
    # every tab and the worker attach to it.
    async with open_store_only(settings) as opened:
        command = TabCommand(
            [sys.executable, "-m", "tui.launch", *config],
            tab_environment(settings.serve.pool_max_size),
            admin_users=users,
        )
        server = WebServer(
            access,
            command,
            allowed_hosts=[],
            max_sessions=settings.serve.max_sessions,
            tabs_per_link=settings.serve.tabs_per_link,
            shutdown_timeout=settings.serve.shutdown_timeout,
        )
        # No access log: its lines would carry the link tokens.
        runner = web.AppRunner(
            server.app, access_log=None, shutdown_timeout=settings.serve.shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, args.host, args.port)
            try:
                await site.start()
            except OSError as exc:
                raise InvalidInput(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
                ) from None
            port = runner.addresses[0][1]
            base, hosts = _site(args, port)
            server.allowed_hosts = {h.lower() for h in hosts}
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.cli", *config, "worker", preexec_fn=_die_with_parent
            )
            access.save(links_path)
            _print_links(base, access, settings, opened.db.info.label)
            await stop.wait()
            warn(
                f"stopping: {len(server.tabs)} tab(s) and the memory worker "
                f"(up to {settings.serve.shutdown_timeout:g}s; pending memory jobs stay queued)"
            )
            await asyncio.gather(server.close_tabs(), _stop_worker(worker, settings))
        finally:
            await runner.cleanup()
    return 0


def _die_with_parent() -> None:
    """In the worker, before it starts: serve killed (SIGKILL, OOM) takes it along.

    A graceful stop ends it through _stop_worker; without this, a killed serve
    left a worker behind that kept claiming jobs with nobody to stop it.
    """
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _stop_worker(worker: asyncio.subprocess.Process, settings: Settings) -> None:
    if worker.returncode is None:
        worker.terminate()
    try:
        await asyncio.wait_for(worker.wait(), settings.serve.shutdown_timeout)
    except TimeoutError:
        worker.kill()
        await worker.wait()


def _print_links(base: str, access: Any, settings: Settings, database: str) -> None:
    width = max(len(link.identity.label) for link in access.links)
    lines = [
        f"memchat serve: {base}  ({database}; up to {settings.serve.max_sessions} tabs at "
        "once; ctrl+c stops)",
        "Private links (each opens the app as that user only; keep them private):",
    ]
    lines += [f"  {link.identity.label:<{width}}  {base}/u/{link.token}" for link in access.links]
    print("\n".join(lines), flush=True)
