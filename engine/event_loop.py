"""Running the engine's entry points: on uvloop where it is installed.

The engine is network-bound: asyncpg and the model client's aiohttp
transport do their work in event-loop callbacks, and uvloop (from asyncpg's
authors) runs those for about a tenth less CPU per run in the cost benchmark
(docs/benchmarks.md). It is not available on Windows; there, and anywhere
it is missing, the standard loop is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop when it can be imported."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
