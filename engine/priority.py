"""Replies before memory jobs on a busy endpoint.

A single-slot local server (llama.cpp) answers one request at a time: a
memory extraction that starts while a person waits for a reply makes them
wait for both. With ``memory.pause_while_streaming`` the dispatcher holds an
extraction request until no reply of this process is streaming. A request
already sent is not interrupted; the next one waits.

It also knows whose turns are under way (message stored, reply not yet):
with ``memory.coalesce_wait_ms`` a memory job whose user has a turn under
way here waits, bounded, for that turn to be stored, so that one extraction
call covers both (engine/jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class ReplyPriority:
    def __init__(self) -> None:
        self._streaming = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._turns: dict[str, set[TurnUnderWay]] = {}
        # Per user, set (and dropped) when one of their turns ends: only that
        # user's waiting jobs wake to look again.
        self._turn_ended: dict[str, asyncio.Event] = {}

    @property
    def streaming(self) -> int:
        """Replies streaming now."""
        return self._streaming

    @contextlib.contextmanager
    def replying(self) -> Iterator[None]:
        """Mark one reply as streaming for the duration of the block."""
        self._streaming += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._streaming -= 1
            if self._streaming == 0:
                self._quiet.set()

    async def wait_until_quiet(self) -> None:
        await self._quiet.wait()

    @contextlib.contextmanager
    def turn(self, user_id: str) -> Iterator[TurnUnderWay]:
        """Mark one turn of ``user_id`` as under way for the block, or until its
        ``stored()`` is called (the reply is written: its job is queued)."""
        turn = TurnUnderWay(self, user_id)
        self._turns.setdefault(user_id, set()).add(turn)
        try:
            yield turn
        finally:
            turn.stored()

    def _ended(self, turn: TurnUnderWay) -> None:
        turns = self._turns.get(turn.user_id)
        if turns is not None and turn in turns:
            turns.discard(turn)
            if not turns:
                del self._turns[turn.user_id]
            ended = self._turn_ended.pop(turn.user_id, None)
            if ended is not None:
                ended.set()

    def turns_after(self, user_id: str, message_id: int | None) -> int:
        """Turns of ``user_id`` under way here whose message is newer than
        ``message_id`` (or not stored yet)."""
        return sum(
            1
            for t in self._turns.get(user_id, ())
            if t.message_id is None or message_id is None or t.message_id > message_id
        )

    async def wait_turns_after(self, user_id: str, message_id: int | None, within: float) -> bool:
        """Wait until ``turns_after`` is 0, at most ``within`` seconds; False on timeout."""
        try:
            async with asyncio.timeout(within):
                while self.turns_after(user_id, message_id):
                    await self._turn_ended.setdefault(user_id, asyncio.Event()).wait()
        except TimeoutError:
            return False
        return True


class TurnUnderWay:
    """One turn from its message's storing to its reply's."""

    __slots__ = ("_priority", "message_id", "user_id")

    def __init__(self, priority: ReplyPriority, user_id: str) -> None:
        self._priority = priority
        self.user_id = user_id
        self.message_id: int | None = None
        """The user's message, once stored."""

    def stored(self) -> None:
        """The reply is written (idempotent)."""
        self._priority._ended(self)
