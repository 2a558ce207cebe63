"""Streamed reply text, written to the Markdown stream in batches.

Every write to a Markdown stream re-parses the growing block and lays the
screen out again; with three panes streaming 100 tokens a second each, that
left typing in a fourth pane waiting up to 170 ms (docs/benchmarks.md).
Writing at most every ``interval`` seconds keeps the text flowing and the
keyboard responsive.
"""

from __future__ import annotations

import asyncio
import contextlib

from textual.widgets.markdown import MarkdownStream

STREAM_FLUSH_SECONDS = 0.2


class BatchedStream:
    def __init__(self, stream: MarkdownStream, interval: float = STREAM_FLUSH_SECONDS) -> None:
        self._stream = stream
        self._interval = interval
        self._pending: list[str] = []
        self._last_write = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    async def write(self, text: str) -> None:
        self._pending.append(text)
        loop = asyncio.get_running_loop()
        due = self._last_write + self._interval - loop.time()
        if due <= 0:
            await self.flush()
        elif self._timer is None:
            # Text that arrives just before a pause must not wait for the next token.
            self._timer = loop.call_later(due, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._last_write = asyncio.get_running_loop().time()
            await self._stream.write(text)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        await self._stream.stop()
