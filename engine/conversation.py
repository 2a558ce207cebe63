"""What a chat client shows of one user, and what it may do there: one service.

The app's panes and ``memchat chat`` share it, so "open the user's latest
session, or a new one" and every read and change a pane makes are written
once, each in one scoped transaction (row-level security applies):

    chats = Conversations.of(runtime)
    view = await chats.open_view("alice")          # session, last page, counts, memories, job
    async for event in chats.send("alice", view.session.session_id, "hi"): ...
    async for event in chats.regenerate("alice", view.session.session_id): ...

No Textual here; errors are MemchatErrors for the caller to show.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.agent import Agent, TurnEvent
from engine.queue import JobQueue, SidebarJobState
from engine.records import Memory, MemoryJob, Message, Session
from engine.runtime import Runtime
from engine.store import Store, UserScope

PAGE_SIZE = 50
"""Messages per page: the last page opens a session, older pages load on scrolling up."""


@dataclass(frozen=True, slots=True)
class JobState:
    """The user's memory-job state as the sidebar shows it."""

    state: SidebarJobState
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ConversationView:
    """Everything a pane shows when it opens a session."""

    session: Session
    messages: list[Message]
    """The last page, oldest first."""
    total: int
    """Messages in the session (``total - len(messages)`` are older, not loaded)."""
    memories: list[Memory]
    job: JobState


class Conversations:
    """One user's conversations: the reads and changes of a chat client, by user id."""

    def __init__(
        self, store: Store, agent: Agent, wake_jobs: Callable[[], None] | None = None
    ) -> None:
        self.store = store
        self.agent = agent
        self._wake_jobs = wake_jobs

    @classmethod
    def of(cls, runtime: Runtime) -> Conversations:
        return cls(runtime.store, runtime.agent, runtime.dispatcher.wake)

    # -- what a pane shows -------------------------------------------------

    async def open_view(
        self, user_id: str, session_id: str | uuid.UUID | None = None, *, page: int = PAGE_SIZE
    ) -> ConversationView:
        """A session (this one; else the latest; else a new one) with what goes beside it."""
        async with self.store.scope(user_id) as s:
            await s.ensure_user()
            if session_id is not None:
                session = await s.get_session(session_id)
            else:
                session = await self._latest_or_new(s)
            messages = await s.last_messages(session.session_id, page)
            total = await s.count_messages(session.session_id)
            memories = await s.list_memories()
            state, error = await JobQueue.job_state(s)
        return ConversationView(session, messages, total, memories, JobState(state, error))

    async def pick_session(
        self, user_id: str, session_id: str | uuid.UUID | None = None, *, new: bool = False
    ) -> Session:
        """This session; a new one with ``new``; else the latest, or a first one."""
        async with self.store.scope(user_id) as s:
            await s.ensure_user()
            if session_id is not None:
                return await s.get_session(session_id)
            if new:
                return await s.create_session()
            return await self._latest_or_new(s)

    @staticmethod
    async def _latest_or_new(s: UserScope) -> Session:
        sessions = await s.list_sessions()
        return sessions[0] if sessions else await s.create_session()

    async def older(
        self, user_id: str, session_id: uuid.UUID, before_id: int, *, page: int = PAGE_SIZE
    ) -> list[Message]:
        """The page of messages before ``before_id``, oldest first."""
        async with self.store.scope(user_id) as s:
            return await s.messages_before(session_id, before_id, page)

    async def messages_after(
        self, user_id: str, session_id: uuid.UUID, after_id: int, *, limit: int = PAGE_SIZE
    ) -> list[Message]:
        """Messages written after ``after_id`` (live updates), oldest first."""
        async with self.store.scope(user_id) as s:
            return await s.messages_after(session_id, after_id, limit)

    async def existing(self, user_id: str, message_ids: list[int]) -> set[int]:
        """Which of these messages are (still) there, as this user sees them."""
        async with self.store.scope(user_id) as s:
            return set(await s.get_messages(message_ids))

    async def session(self, user_id: str, session_id: uuid.UUID) -> Session:
        async with self.store.scope(user_id) as s:
            return await s.get_session(session_id)

    async def memories(self, user_id: str) -> list[Memory]:
        async with self.store.scope(user_id) as s:
            return await s.list_memories()

    async def job_state(self, user_id: str) -> JobState:
        async with self.store.scope(user_id) as s:
            state, error = await JobQueue.job_state(s)
        return JobState(state, error)

    # -- sessions ----------------------------------------------------------

    async def list_sessions(self, user_id: str) -> list[Session]:
        async with self.store.scope(user_id) as s:
            return await s.list_sessions()

    async def create_session(self, user_id: str, title: str | None = None) -> Session:
        async with self.store.scope(user_id) as s:
            return await s.create_session(title)

    async def rename_session(self, user_id: str, session_id: uuid.UUID, title: str) -> Session:
        async with self.store.scope(user_id) as s:
            return await s.rename_session(session_id, title)

    async def delete_session(self, user_id: str, session_id: uuid.UUID) -> None:
        async with self.store.scope(user_id) as s:
            await s.delete_session(session_id)

    async def switch_to_titled(
        self, user_id: str, title: str, current: Session | None = None
    ) -> Session:
        """The session with this title, made if needed; an empty untitled ``current``
        becomes it (the demo names the session a pane opened with)."""
        async with self.store.scope(user_id) as s:
            found = [x for x in await s.list_sessions() if x.title == title]
            if found:
                return found[0]
            if (
                current is not None
                and current.title is None
                and await s.count_messages(current.session_id) == 0
            ):
                return await s.rename_session(current.session_id, title)
            return await s.create_session(title)

    # -- memories ----------------------------------------------------------

    async def edit_memory(self, user_id: str, memory_id: uuid.UUID, text: str) -> Memory:
        async with self.store.scope(user_id) as s:
            return await s.update_memory(memory_id, text)

    async def forget_memory(self, user_id: str, memory_id: uuid.UUID) -> Memory:
        async with self.store.scope(user_id) as s:
            return await s.delete_memory(memory_id)

    async def retry_failed_job(self, user_id: str) -> MemoryJob | None:
        """Queue the user's newest failed memory job again; None when it did not fail."""
        async with self.store.scope(user_id) as s:
            job = await JobQueue.retry_failed_job(s)
        if job is not None and self._wake_jobs is not None:
            self._wake_jobs()
        return job

    # -- turns -------------------------------------------------------------

    def check_text(self, text: str) -> str:
        """The text as it would be sent, or InvalidInput before anything is written."""
        return self.agent.check_text(text)

    def send(self, user_id: str, session_id: uuid.UUID, text: str) -> AsyncIterator[TurnEvent]:
        return self.agent.stream(user_id, session_id, text)

    def regenerate(self, user_id: str, session_id: uuid.UUID) -> AsyncIterator[TurnEvent]:
        """A new reply to the session's last message, replacing its reply."""
        return self.agent.regenerate(user_id, session_id)
