"""Fixtures for driving the app with Pilot: deterministic, no animation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from engine.config import Settings
from tests.conftest import make_settings
from tui.app import MemchatApp

AppFactory = Callable[..., MemchatApp]


@pytest.fixture
def tui_settings(tmp_path: Path, database_dsn: str) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={"provider": "offline", "offline_token_delay_ms": 0},
        memory={"drain_timeout": 5, "retry_delay": 0.01},
    )


@pytest.fixture
def make_app(tui_settings: Settings) -> AppFactory:
    def factory(users: list[str] | None = None, **options: object) -> MemchatApp:
        defaults: dict[str, object] = {
            "animate": False,
            "highlight_seconds": 0,
            "demo_char_delay": 0,
            "tune_gc": False,
        }
        return MemchatApp(tui_settings, users, **{**defaults, **options})  # type: ignore[arg-type]

    return factory


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 20.0, step: float = 0.02
) -> None:
    """Wait for something the UI will show; fails the test after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
