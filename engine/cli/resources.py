"""What a command opens: the lightest that does its work, in one of three ways.

- :func:`open_store_only`: the database and the store; no model, no event
  hub, no memory workers. For commands that read or edit stored data
  (``sessions``, ``history``, ``memories``, ``memory add|forget``, ``users``,
  ``jobs``): looking never starts work, and a broken model setting never stops
  a look.
- :func:`open_chat_runtime`: the runtime without the dispatcher (``chat``):
  the model and the agent; the command runs its own turn's memory job only.
- :func:`open_full_runtime`: the runtime with the memory workers (``worker``,
  ``scenario``).

``config``, ``doctor``, ``bench`` and ``db`` open none of these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from engine.config import Settings
from engine.db import Database
from engine.runtime import Runtime, open_runtime
from engine.store import Store


@dataclass(frozen=True, slots=True)
class StoreOnly:
    db: Database
    store: Store


@asynccontextmanager
async def open_store_only(settings: Settings) -> AsyncIterator[StoreOnly]:
    """The database (migrated, as at every start) and a store on it; closed after."""
    db = await Database.open(settings)
    try:
        yield StoreOnly(db, Store(db, settings.limits))
    finally:
        await db.close()


def open_chat_runtime(settings: Settings) -> AbstractAsyncContextManager[Runtime]:
    """No dispatcher: this process learns from its own turn only, never from
    another user's queued jobs (which may be meant for another model)."""
    return open_runtime(settings, run_workers=False)


def open_full_runtime(settings: Settings) -> AbstractAsyncContextManager[Runtime]:
    """Model, database, agent, event hub and the memory workers."""
    return open_runtime(settings)
