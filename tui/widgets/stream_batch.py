"""Streamed reply text, written to the Markdown stream in batches, typing first.

Every write to a Markdown stream re-parses the growing block and lays the
whole screen out again (a frame of 20-30 ms with three panes streaming);
written once per token, that left typing in another pane waiting up to
170 ms (docs/benchmarks.md). So text is written at most every ``interval``
seconds, and while someone is typing, a write waits until the keyboard has
been quiet for ``TYPING_GRACE_SECONDS`` (never holding text more than
``MAX_HOLD_SECONDS``): a key should not land behind a reply's frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

from textual.widgets.markdown import MarkdownStream

STREAM_FLUSH_SECONDS = 0.2
TYPING_GRACE_SECONDS = 0.12
MAX_HOLD_SECONDS = 0.6


class TypingClock:
    """When a key was last typed into any pane (event-loop time)."""

    def __init__(self) -> None:
        self.last = -math.inf

    def mark(self) -> None:
        self.last = asyncio.get_running_loop().time()


class BatchedStream:
    def __init__(
        self,
        stream: MarkdownStream,
        interval: float = STREAM_FLUSH_SECONDS,
        typing: TypingClock | None = None,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._typing = typing or TypingClock()
        self._pending: list[str] = []
        self._pending_since = 0.0
        self._last_write = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def _due(self) -> float:
        """When the pending text may be written."""
        due = max(self._last_write + self._interval, self._typing.last + TYPING_GRACE_SECONDS)
        return min(due, self._pending_since + MAX_HOLD_SECONDS)

    async def write(self, text: str) -> None:
        loop = asyncio.get_running_loop()
        if not self._pending:
            self._pending_since = loop.time()
        self._pending.append(text)
        if self._timer is not None:
            return
        due = self._due()
        if due <= loop.time():
            await self.flush()
        else:
            # Text that arrives just before a pause must not wait for the next token.
            self._timer = loop.call_at(due, self._flush_later)

    def _flush_later(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._due()
        if due > loop.time():
            self._timer = loop.call_at(due, self._flush_later)  # typed meanwhile
            return
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
