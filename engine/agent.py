"""One agent, many users: a turn is ``stream(user_id, session_id, text)``.

``regenerate(user_id, session_id)`` answers the session's last user message
again: the same events, and the new reply replaces the old one (in one
transaction with its memory job), so the transcript keeps one reply.

The agent keeps no per-call state on itself: everything a turn needs lives in
the generator's frame, so one instance serves any number of concurrent turns.
A turn:

1. stores the user's message (scoped transaction) and reads what the prompt
   needs (memories, recent history) in that same transaction;
2. streams the model's reply, yielding typed events;
3. stores the reply with its outcome (complete, failed, cancelled) and,
   in the same statement, whatever the ``with_reply`` hook adds (the memory
   job), so the reply and its follow-up work are never half-written.

A model error ends the turn as failed with its text; cancelling the consumer
(or closing the generator) stores the partial reply as cancelled. The user's
message is stored before the model is asked, so it is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from engine.config import Settings
from engine.context_budget import estimate_tokens, fit_newest, prompt_budget
from engine.embeddings import Embedder
from engine.errors import DatabaseError, MemchatError
from engine.models import (
    ChatMessage,
    ChatModel,
    ModelContextTooLong,
    ModelError,
    ModelResponseError,
    RetryingRequest,
    StreamEnd,
    TextDelta,
    Usage,
)
from engine.models.prompt_blocks import render_context_memories
from engine.priority import ReplyPriority
from engine.recall import chat_memories, turn_vector
from engine.records import Memory, Message, MessageStatus
from engine.store import FollowUp, Store, UserScope
from engine.validation import clean_text, parse_session_id

log = logging.getLogger(__name__)

STORE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class TurnStarted:
    user_message: Message


@dataclass(frozen=True, slots=True)
class TurnRetrying:
    """The model request failed and the client sends it again: retry ``attempt`` of ``of``."""

    attempt: int
    of: int


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


TurnEvent = TurnStarted | TurnRetrying | TurnDelta | TurnCompleted | TurnFailed | TurnCancelled
TurnEnd = TurnCompleted | TurnFailed | TurnCancelled


def reply_cut_mark(limit: int) -> str:
    return f"\n\n*[reply cut: longer than limits.max_reply_chars ({limit:,} characters)]*"


def tokens_cut_mark(max_tokens: int) -> str:
    return f"\n\n*[reply cut off: it reached model.max_tokens ({max_tokens:,} tokens)]*"


WithReply = Callable[[UserScope, Message], Awaitable[FollowUp | None]]
"""Runs in the transaction that stores a completed reply, before it is written:
(scope, user message) -> the work the reply's own statement does too (its memory job)."""


class Agent:
    def __init__(
        self,
        store: Store,
        model: ChatModel,
        settings: Settings,
        with_reply: WithReply | None = None,
        priority: ReplyPriority | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.store = store
        # Turns' vectors, to pick memories by similarity too (engine/recall.py).
        self.embedder = embedder
        self.priority = priority or ReplyPriority()
        self.model = model
        self.settings = settings
        self.with_reply = with_reply
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
    ) -> AsyncGenerator[TurnEvent, None]:
        text = self.check_text(text)
        sid = parse_session_id(session_id)
        # Under way from the message's storing to the reply's: a memory job of
        # this user may wait for it to take this turn along (memory.coalesce_wait_ms).
        with self.priority.turn(user_id) as under_way:
            user_message, prompt = await self._begin(user_id, sid, text)
            under_way.message_id = user_message.message_id
            # aclosing: a consumer that stops early closes the answer at once, so the
            # partial reply is stored (cancelled) now, not when the generator is collected.
            answer = self._answer(user_id, user_message, prompt, replaces=None)
            async with contextlib.aclosing(answer) as events:
                async for event in events:
                    if isinstance(event, TurnCompleted | TurnFailed | TurnCancelled):
                        under_way.stored()  # the reply and its job are written
                    yield event

    async def regenerate(
        self, user_id: str, session_id: str | uuid.UUID
    ) -> AsyncGenerator[TurnEvent, None]:
        """Answer the session's last user message again; the new reply replaces its reply.

        The same events as ``stream`` (``TurnStarted`` names the message being
        answered again). Failed, cancelled and complete replies can all be
        regenerated; a message left without a reply gets one.
        """
        sid = parse_session_id(session_id)
        user_message, old_reply, prompt = await self._begin_again(user_id, sid)
        replaces = (old_reply.message_id,) if old_reply is not None else ()
        answer = self._answer(user_id, user_message, prompt, replaces=replaces)
        async with contextlib.aclosing(answer) as events:
            async for event in events:
                yield event

    async def _answer(
        self,
        user_id: str,
        user_message: Message,
        prompt: list[ChatMessage] | str,
        *,
        replaces: tuple[int, ...] | None,
    ) -> AsyncGenerator[TurnEvent, None]:
        """Stream the model's reply to ``user_message`` and store it with its outcome.

        ``replaces``: None appends the reply; otherwise the reply replaces the
        message's earlier reply (these ids, when it had one).
        """
        yield TurnStarted(user_message)

        parts: list[str] = []
        length = 0
        usage: Usage | None = None
        outcome: MessageStatus = "cancelled"
        error: str | None = None
        limit = self.settings.limits.max_reply_chars
        try:
            if isinstance(prompt, str):
                raise ModelContextTooLong(prompt)
            # aclosing: a reply cut at max_reply_chars must close its HTTP stream now.
            async with contextlib.aclosing(self.model.stream(prompt)) as stream:
                with self.priority.replying():
                    async for event in stream:
                        if isinstance(event, RetryingRequest):
                            yield TurnRetrying(event.attempt, event.of)
                        elif isinstance(event, TextDelta):
                            text = event.text[: max(limit - length, 0)]
                            if text:
                                parts.append(text)
                                length += len(text)
                                yield TurnDelta(text)
                            if length >= limit and event.text != text:
                                # A runaway reply: stop reading, keep what fits.
                                mark = reply_cut_mark(limit)
                                parts.append(mark)
                                yield TurnDelta(mark)
                                break
                        elif isinstance(event, StreamEnd):
                            usage = event.usage
                            if event.text and event.text != "".join(parts):
                                # Trust the provider's final text over our accumulation.
                                parts = [event.text[:limit]]
                            if event.finish_reason == "length":
                                mark = tokens_cut_mark(self.settings.model.max_tokens)
                                parts.append(mark)
                                yield TurnDelta(mark)
                            elif event.finish_reason == "content_filter":
                                raise ModelResponseError(
                                    "the provider's content filter stopped the reply"
                                )
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
                await self._store_cancelled(user_id, user_message, "".join(parts), replaces)
        reply = await self._finish(
            user_id, user_message, "".join(parts), outcome, error, usage, replaces=replaces
        )
        if outcome == "complete":
            yield TurnCompleted(reply, usage)
        else:
            yield TurnFailed(reply, error or "failed")

    async def _store_cancelled(
        self, user_id: str, user_message: Message, partial: str, replaces: tuple[int, ...] | None
    ) -> None:
        # We are unwinding a cancellation (or the consumer closed us): store the
        # partial reply even if the task is cancelled again meanwhile, and let
        # the original exception, not a storage error, propagate.
        task = asyncio.ensure_future(
            self._finish(user_id, user_message, partial, "cancelled", None, replaces=replaces)
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
    ) -> tuple[Message, list[ChatMessage] | str]:
        history_limit = self.settings.history.max_messages
        add_memories = self.settings.memory.add_to_context
        # Before the transaction, bounded; None (full text) when it fails.
        near = await turn_vector(self.embedder, text) if add_memories else None
        async with self.store.scope(user_id) as s:
            # The session check happens inside append_user_message (NotFound).
            user_message, history = await s.append_user_message(session_id, text, history_limit)
            memories = (
                await chat_memories(s, self.settings.memory, text, near)
                if self.settings.memory.add_to_context
                else []
            )
        return user_message, self._fit_prompt(user_message, history, memories)

    async def _begin_again(
        self, user_id: str, session_id: uuid.UUID
    ) -> tuple[Message, Message | None, list[ChatMessage] | str]:
        history_limit = self.settings.history.max_messages
        add_memories = self.settings.memory.add_to_context
        async with self.store.scope(user_id) as s:
            user_message, old_reply = await s.last_turn(session_id)
        # Outside the transaction, like _begin's: the vector of the text answered again.
        near = await turn_vector(self.embedder, user_message.content) if add_memories else None
        async with self.store.scope(user_id) as s:
            history = await s.messages_before(
                session_id, user_message.message_id + 1, history_limit + 1
            )
            # Bounded like a new turn's: never the whole list (issue 15, item 3).
            memories = (
                await chat_memories(s, self.settings.memory, user_message.content, near)
                if add_memories
                else []
            )
        return user_message, old_reply, self._fit_prompt(user_message, history, memories)

    def _fit_prompt(
        self, user_message: Message, history: list[Message], memories: list[Memory]
    ) -> list[ChatMessage] | str:
        """The prompt within ``model.context_tokens``: the system prompt and this
        message first, then memories (newest first), then history (newest first).

        A str is returned instead when even the message alone cannot fit: the
        reason the turn fails, without asking the model.
        """
        model = self.settings.model
        budget = prompt_budget(model.context_tokens, model.max_tokens)
        system = self.settings.agent.system_prompt
        budget -= estimate_tokens(system) + estimate_tokens(user_message.content)
        if budget < 0:
            return (
                "the message is too long for the model's context "
                f"(model.context_tokens = {model.context_tokens}, of which "
                f"model.max_tokens = {model.max_tokens} is kept for the reply)"
            )
        if memories:
            intro = "\n\nWhat you know about this user:\n"
            # chat_memories: the most relevant first; fit_newest keeps the end of a list.
            newest_last = [m.content for m in reversed(memories)]
            fitted = fit_newest(newest_last, budget - estimate_tokens(intro))
            if fitted.kept:
                shown = render_context_memories(m.content for m in memories[: fitted.kept])
                system += intro + shown
                budget -= estimate_tokens(intro + shown)
        # A turn whose reply failed is left out whole: its reply is noise to
        # the model, and its message may be the very cause (a prompt over the
        # server's window) that would fail every later turn of the session. A
        # cancelled partial reply is what the user saw, so it stays.
        unanswered = {
            m.message_id
            for m, after in itertools.pairwise(history)
            if m.role == "user" and after.role == "assistant" and after.status == "failed"
        }
        earlier = [
            m
            for m in history
            if m.content
            and m.status != "failed"
            and m.message_id not in unanswered
            and m.message_id < user_message.message_id
        ]
        kept = fit_newest([m.content for m in earlier], budget).kept
        prompt = [ChatMessage("system", system)]
        prompt += [ChatMessage(m.role, m.content) for m in earlier[len(earlier) - kept :]]
        prompt.append(ChatMessage("user", user_message.content))
        return prompt

    async def _finish(
        self,
        user_id: str,
        user_message: Message,
        content: str,
        status: MessageStatus,
        error: str | None,
        usage: Usage | None = None,
        *,
        replaces: tuple[int, ...] | None = None,
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
                    # A replaced reply is deleted in the transaction that
                    # stores the new one: an assistant message there now is
                    # the new one unless it is the reply we began to replace.
                    if (
                        after
                        and after[0].role == "assistant"
                        and after[0].message_id not in (replaces or ())
                    ):
                        return after[0]
                return await self._write_reply(
                    user_id, user_message, content, status, error, usage, replaces is not None
                )
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
        usage: Usage | None,
        replacing: bool = False,
    ) -> Message:
        async with self.store.scope(user_id) as s:
            # A regenerated reply gets a memory job like any completed reply
            # (the audit holds every completed reply to one): the old reply's
            # job keeps its row (its reply reference becomes NULL), and what it
            # learnt stays, since it was learnt from the user's own message,
            # which is unchanged. The new job sees the new reply beside the
            # memories already there, so it adds what the new exchange says
            # and duplicates nothing (content_key).
            follow_up = (
                await self.with_reply(s, user_message)
                if status == "complete" and self.with_reply is not None
                else None
            )
            if replacing:
                return await s.replace_reply(
                    user_message,
                    content,
                    status=status,
                    error=error,
                    usage=usage,
                    follow_up=follow_up,
                )
            return await s.append_message(
                user_message.session_id,
                "assistant",
                content,
                status=status,
                error=error,
                usage=usage,
                follow_up=follow_up,
            )
