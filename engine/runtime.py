"""Everything a client (CLI, TUI, benchmark) needs, opened and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from engine.agent import Agent
from engine.config import Settings
from engine.db import Database
from engine.models import ChatModel, create_model
from engine.store import Store


@dataclass(slots=True)
class Runtime:
    settings: Settings
    db: Database
    store: Store
    model: ChatModel
    agent: Agent

    async def close(self) -> None:
        try:
            await self.model.aclose()
        finally:
            await self.db.close()


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Model first (a missing key fails fast), then the database."""
    model = create_model(settings.model)
    try:
        db = await Database.open(settings)
    except BaseException:
        await model.aclose()
        raise
    store = Store(db, settings.limits)
    runtime = Runtime(settings, db, store, model, Agent(store, model, settings))
    try:
        yield runtime
    finally:
        await runtime.close()
