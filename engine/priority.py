"""Replies before memory jobs on a busy endpoint.

A single-slot local server (llama.cpp) answers one request at a time: a
memory extraction that starts while a person waits for a reply makes them
wait for both. With ``memory.pause_while_streaming`` the dispatcher holds an
extraction request until no reply of this process is streaming. A request
already sent is not interrupted; the next one waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class ReplyPriority:
    def __init__(self) -> None:
        self._streaming = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @property
    def streaming(self) -> int:
        """Replies streaming now."""
        return self._streaming

    @contextlib.contextmanager
    def replying(self) -> Iterator[None]:
        """Mark one reply as streaming for the duration of the block."""
        self._streaming += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._streaming -= 1
            if self._streaming == 0:
                self._quiet.set()

    async def wait_until_quiet(self) -> None:
        await self._quiet.wait()
