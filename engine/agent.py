"""One agent, many users: a turn is ``stream(user_id, session_id, text)``.

The agent keeps no per-call state on itself: everything a turn needs lives in
the generator's frame, so one instance serves any number of concurrent turns.
A turn:

1. stores the user's message (scoped transaction) and reads what the prompt
   needs (memories, recent history) in that same transaction;
2. streams the model's reply, yielding typed events;
3. stores the reply with its outcome (complete, failed, cancelled) and,
   in the same transaction, whatever the ``after_reply`` hook adds (the
   memory job), so the reply and its follow-up work are never half-written.

A model error ends the turn as failed with its text; cancelling the consumer
(or closing the generator) stores the partial reply as cancelled. The user's
message is stored before the model is asked, so it is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from engine.config import Settings
from engine.errors import DatabaseError, MemchatError
from engine.models import ChatMessage, ChatModel, ModelError, StreamEnd, TextDelta, Usage
from engine.models.prompt_blocks import render_context_memories
from engine.records import Message, MessageStatus
from engine.store import Store, UserScope
from engine.validation import clean_text, parse_session_id

log = logging.getLogger(__name__)

STORE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class TurnStarted:
    user_message: Message


@dataclass(frozen=True, slots=True)
class TurnDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TurnCompleted:
    reply: Message
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class TurnFailed:
    reply: Message
    """The stored reply: status "failed", the partial text, and ``error``."""
    error: str


@dataclass(frozen=True, slots=True)
class TurnCancelled:
    reply: Message


TurnEvent = TurnStarted | TurnDelta | TurnCompleted | TurnFailed | TurnCancelled
TurnEnd = TurnCompleted | TurnFailed | TurnCancelled

AfterReply = Callable[[UserScope, Message, Message], Awaitable[None]]
"""Runs in the transaction that stores a completed reply: (scope, user msg, reply)."""


class Agent:
    def __init__(
        self,
        store: Store,
        model: ChatModel,
        settings: Settings,
        after_reply: AfterReply | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.settings = settings
        self.after_reply = after_reply
        # Cancelled replies still being written (shielded from the cancel), so
        # that shutdown can wait for them instead of closing the pool under them.
        self._storing: set[asyncio.Future[Message]] = set()

    async def wait_stored(self) -> None:
        """Wait until every cancelled reply has been written."""
        if self._storing:
            await asyncio.gather(*self._storing, return_exceptions=True)

    def check_text(self, text: str) -> str:
        """The user's text as it will be stored, or InvalidInput before anything is written."""
        return clean_text(
            text,
            what="message",
            max_chars=self.settings.limits.max_message_chars,
            setting="limits.max_message_chars",
        )

    async def stream(
        self, user_id: str, session_id: str | uuid.UUID, text: str
    ) -> AsyncIterator[TurnEvent]:
        text = self.check_text(text)
        sid = parse_session_id(session_id)
        user_message, prompt = await self._begin(user_id, sid, text)
        yield TurnStarted(user_message)

        parts: list[str] = []
        usage: Usage | None = None
        outcome: MessageStatus = "cancelled"
        error: str | None = None
        try:
            async for event in self.model.stream(prompt):
                if isinstance(event, TextDelta):
                    if event.text:
                        parts.append(event.text)
                        yield TurnDelta(event.text)
                elif isinstance(event, StreamEnd):
                    usage = event.usage
                    if event.text and event.text != "".join(parts):
                        # Trust the provider's final text over our accumulation.
                        parts = [event.text]
            outcome = "complete"
            if not "".join(parts).strip():
                # e.g. a model that answered a chat turn with only a tool call
                outcome, error = "failed", "the model returned an empty reply"
        except ModelError as exc:
            outcome, error = "failed", exc.message
        except Exception as exc:  # a bug must not lose the turn either
            log.exception("turn failed unexpectedly")
            outcome, error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if outcome == "cancelled":
                await self._store_cancelled(user_id, user_message, "".join(parts))
        reply = await self._finish(user_id, user_message, "".join(parts), outcome, error)
        if outcome == "complete":
            yield TurnCompleted(reply, usage)
        else:
            yield TurnFailed(reply, error or "failed")

    async def _store_cancelled(self, user_id: str, user_message: Message, partial: str) -> None:
        # We are unwinding a cancellation (or the consumer closed us): store the
        # partial reply even if the task is cancelled again meanwhile, and let
        # the original exception, not a storage error, propagate.
        task = asyncio.ensure_future(
            self._finish(user_id, user_message, partial, "cancelled", None)
        )
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)
        try:
            await asyncio.shield(task)
        except (MemchatError, asyncio.CancelledError):
            log.warning(
                "could not store the cancelled reply of message %s", user_message.message_id
            )

    async def run(self, user_id: str, session_id: str | uuid.UUID, text: str) -> TurnEnd:
        """A whole turn; returns how it ended."""
        end: TurnEnd | None = None
        async for event in self.stream(user_id, session_id, text):
            if isinstance(event, TurnCompleted | TurnFailed | TurnCancelled):
                end = event
        assert end is not None
        return end

    async def _begin(
        self, user_id: str, session_id: uuid.UUID, text: str
    ) -> tuple[Message, list[ChatMessage]]:
        history_limit = self.settings.history.max_messages
        async with self.store.scope(user_id) as s:
            # The session check happens inside append_message (NotFound).
            user_message = await s.append_message(session_id, "user", text)
            history = await s.last_messages(session_id, history_limit + 1)
            memories = await s.list_memories() if self.settings.memory.add_to_context else []
        system = self.settings.agent.system_prompt
        if memories:
            system += "\n\nWhat you know about this user:\n" + render_context_memories(
                m.content for m in memories
            )
        prompt = [ChatMessage("system", system)]
        prompt += [
            ChatMessage(m.role, m.content)
            for m in history
            # Failed replies are noise to the model; a cancelled partial reply
            # is what the user saw, so it stays.
            if m.content and m.status != "failed" and m.message_id <= user_message.message_id
        ]
        return user_message, prompt

    async def _finish(
        self,
        user_id: str,
        user_message: Message,
        content: str,
        status: MessageStatus,
        error: str | None,
    ) -> Message:
        # A dropped connection (server restart, killed backend) while storing
        # the reply: the pool reconnects, so try again, a few times, unless an
        # earlier attempt committed after all (the reply is then the next message).
        for attempt in range(STORE_ATTEMPTS):
            try:
                if attempt:
                    async with self.store.scope(user_id) as s:
                        after = await s.messages_after(
                            user_message.session_id, user_message.message_id, 1
                        )
                    if after and after[0].role == "assistant":
                        return after[0]
                return await self._write_reply(user_id, user_message, content, status, error)
            except DatabaseError:
                if attempt == STORE_ATTEMPTS - 1:
                    raise
                log.warning("storing the reply to %s failed; retrying", user_message.message_id)
        raise AssertionError("unreachable")

    async def _write_reply(
        self,
        user_id: str,
        user_message: Message,
        content: str,
        status: MessageStatus,
        error: str | None,
    ) -> Message:
        async with self.store.scope(user_id) as s:
            reply = await s.append_message(
                user_message.session_id, "assistant", content, status=status, error=error
            )
            if status == "complete" and self.after_reply is not None:
                await self.after_reply(s, user_message, reply)
        return reply
