"""Everything a client (CLI, TUI, benchmark) needs, opened and closed together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from engine.agent import Agent
from engine.config import Settings, memory_model_settings
from engine.db import Database
from engine.embeddings import Embedder, create_embedder
from engine.events import EventHub, JobChanged, Resync
from engine.jobs import MemoryDispatcher
from engine.memory import MemoryManager
from engine.models import ChatModel, create_model
from engine.priority import ReplyPriority
from engine.queue import JobQueue
from engine.records import Message
from engine.store import FollowUp, Store, UserScope

log = logging.getLogger(__name__)


async def memory_job_with_reply(scope: UserScope, user_message: Message) -> FollowUp:
    """The agent's hook: the memory job is written by the reply's own statement."""
    return JobQueue.with_reply(user_message)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    db: Database
    store: Store
    model: ChatModel
    memory_model: ChatModel
    """The model that extracts memories: ``[memory]``'s own, or one like ``model``."""
    agent: Agent
    dispatcher: MemoryDispatcher
    events: EventHub
    embedder: Embedder | None = None
    """Vectors of turns and memories (memory.embeddings_model), or None: full text."""
    _relay: asyncio.Task[None] | None = field(default=None, repr=False)

    async def close(self, drain_timeout: float | None = None) -> None:
        """Drain memory jobs (bounded), then let go of everything, in reverse order."""
        try:
            await self.agent.wait_stored()
            await self.dispatcher.stop(drain_timeout)
        finally:
            if self._relay is not None:
                self._relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._relay
            await self.events.close()
            try:
                await self.model.aclose()
                await self.memory_model.aclose()
                if self.embedder is not None:
                    await self.embedder.aclose()
            finally:
                await self.db.close()


async def _wake_dispatcher_on_new_jobs(events: EventHub, dispatcher: MemoryDispatcher) -> None:
    # Jobs enqueued here or by any other process arrive as NOTIFY; polling
    # in the workers covers the time the listener is reconnecting.
    async with events.subscribe(None) as subscription:
        async for event in subscription:
            # A new job, or a finished one (which may unblock that user's next
            # job); after a reconnect, anything may have happened.
            if isinstance(event, Resync) or (
                isinstance(event, JobChanged) and event.state in ("pending", "done", "failed")
            ):
                dispatcher.wake()


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    run_workers: bool = True,
    model: ChatModel | None = None,
    only_user: str | None = None,
) -> AsyncIterator[Runtime]:
    """Model first (a missing key fails fast), then the database, events and workers.

    ``only_user``: a single-user process (`memchat serve`'s user tabs): the
    database and event hub are fixed to that user (Database.open) and no
    memory workers run here (they need the queue login, which is not opened).
    """
    if only_user is not None:
        run_workers = False
    model = model or create_model(settings.model)
    try:
        memory_model = create_model(memory_model_settings(settings.model, settings.memory))
    except BaseException:
        await model.aclose()
        raise
    try:
        embedder = create_embedder(settings)
    except BaseException:
        await model.aclose()
        await memory_model.aclose()
        raise
    try:
        db = await Database.open(settings, only_user=only_user)
    except BaseException:
        await model.aclose()
        await memory_model.aclose()
        if embedder is not None:
            await embedder.aclose()
        raise
    store = Store(db, settings.limits)
    priority = ReplyPriority()
    agent = Agent(
        store,
        model,
        settings,
        with_reply=memory_job_with_reply,
        priority=priority,
        embedder=embedder,
    )
    manager = MemoryManager(
        memory_model, settings.memory, context_tokens=settings.model.context_tokens
    )
    dispatcher = MemoryDispatcher(
        db, store, manager, settings.memory, priority=priority, embedder=embedder
    )
    events = EventHub(db)
    runtime = Runtime(settings, db, store, model, memory_model, agent, dispatcher, events, embedder)
    try:
        await events.start()
        if run_workers:
            dispatcher.start()
            runtime._relay = asyncio.create_task(_wake_dispatcher_on_new_jobs(events, dispatcher))
    except BaseException:
        await runtime.close(0)
        raise
    try:
        yield runtime
    finally:
        await runtime.close()
