"""``memchat worker``: memory workers only, on the full runtime, until a signal."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from engine.cli.output import warn
from engine.cli.resources import open_full_runtime
from engine.config import Settings


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    worker = commands.add_parser(
        "worker",
        help="run memory workers only, until Ctrl-C or SIGTERM (scale out across processes)",
        epilog="example:\n  MEMCHAT_MEMORY__CONCURRENCY=8 memchat worker\n\n" + exit_codes,
        formatter_class=fmt,
    )
    worker.set_defaults(handler=worker_command)


async def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_full_runtime(settings) as rt:
        warn(
            f"worker {rt.dispatcher.name}: up to {settings.memory.concurrency} memory jobs "
            "at once on "
            f"{rt.db.info.label}, model: {rt.model.label}, {settings.source_line()}; "
            "Ctrl-C to stop"
        )
        await stop.wait()
        warn(f"stopping: draining running jobs (up to {settings.memory.drain_timeout:g}s)")
    return 0
