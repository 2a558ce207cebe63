"""Server-sent events: the ``data`` of each event in a byte stream.

The ``openai`` client's own stream turns every event into a pydantic model,
which measured at about three quarters of the CPU of a streamed reply; the
chat model only needs two fields of each event, so it reads the events here
and the JSON itself (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

MAX_LINE_BYTES = 4 * 1024 * 1024


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """Yield the data of every event, in order; comments and other fields are skipped.

    Follows the SSE rules that matter for chat streams: lines end in LF, CRLF
    or CR; an event ends at a blank line; several ``data:`` lines in one event
    are joined with newlines; one space after the colon is not part of the data.
    An event still open when the stream ends is dispatched too (some servers
    omit the last blank line).
    """
    pending = b""
    data: list[bytes] = []
    async for chunk in chunks:
        if not chunk:
            continue
        pending += chunk
        if b"\r" in pending:
            if pending.endswith(b"\r"):
                # The LF of a CRLF may still be on its way: keep the CR for now.
                pending, held = pending[:-1], b"\r"
            else:
                held = b""
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + held
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            # No server sends a line this long; one that never ends would
            # otherwise grow in memory until the process dies.
            raise ValueError(f"reply stream line longer than {MAX_LINE_BYTES} bytes")
        for line in lines:
            if not line:
                if data:
                    yield b"\n".join(data).decode("utf-8", errors="replace")
                    data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if pending.startswith(b"data:"):
        value = pending[5:].rstrip(b"\r")
        data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data).decode("utf-8", errors="replace")
