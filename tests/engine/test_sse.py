"""The SSE reader the chat model uses instead of the client's per-event models."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.models.sse import sse_data


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read(parts: list[bytes]) -> list[str]:
    return [data async for data in sse_data(_chunks(parts))]


STREAM = (
    b": a comment\n"
    b'data: {"a": 1}\n\n'
    b"event: ping\nid: 7\n\n"
    b"data:first\ndata: second\n\n" + "data: caf\u00e9 \u2603\r\n\r\n".encode() + b"data: [DONE]"
)
EXPECTED = ['{"a": 1}', "first\nsecond", "caf\u00e9 \u2603", "[DONE]"]


async def test_events_comments_multiline_crlf_and_unterminated_last_event() -> None:
    assert await _read([STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7])
async def test_any_split_into_chunks_reads_the_same(size: int) -> None:
    parts = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert await _read(parts) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
async def test_split_at_arbitrary_points(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    parts = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert await _read(parts) == EXPECTED


async def test_cr_only_line_endings() -> None:
    assert await _read([b"data: x\r\r", b"data: y\r", b"\r"]) == ["x", "y"]
