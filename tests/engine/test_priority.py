"""ReplyPriority's turns under way: what a memory job's gathering delay waits for.

No database: the bookkeeping the dispatcher reads (engine/jobs.py ``_gather``);
tests/engine/test_coalesced_extraction.py runs it end to end.
"""

from __future__ import annotations

import asyncio

from engine.priority import ReplyPriority


async def test_a_job_waits_for_a_later_turn_of_its_user_only() -> None:
    priority = ReplyPriority()
    with priority.turn("ann") as first, priority.turn("ann") as second:
        first.message_id, second.message_id = 11, 13
        with priority.turn("bob") as other:
            other.message_id = 12
            # The job of message 11: its own turn does not count, the later one does.
            assert priority.turns_after("ann", 11) == 1
            assert priority.turns_after("ann", 13) == 0
            waiting = asyncio.create_task(priority.wait_turns_after("ann", 11, 5.0))
            await asyncio.sleep(0)
            other.stored()  # another user's reply wakes nothing of ann's
            await asyncio.sleep(0)
            assert not waiting.done()
            second.stored()
            assert await asyncio.wait_for(waiting, 1.0) is True
    assert priority.turns_after("ann", None) == 0


async def test_a_turn_not_stored_yet_counts_and_the_wait_is_bounded() -> None:
    priority = ReplyPriority()
    with priority.turn("cy"):  # its message is not stored yet: newer than any job's
        assert priority.turns_after("cy", 99) == 1
        assert await priority.wait_turns_after("cy", 99, 0.05) is False
    assert await priority.wait_turns_after("cy", 99, 0.05) is True
