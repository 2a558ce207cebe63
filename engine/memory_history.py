"""Undoing one audited memory change (``memchat memory restore``).

memory_events is append-only and keeps each change's before and after text,
so any change (an extraction job's, a hand edit, ``memory optimize``) can be
undone from it: the undo is itself a new audited change (actor ``restore``),
never a rewrite of history.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidInput, NotFound
from engine.records import Memory, MemoryEvent
from engine.store import UserScope

ACTOR = "restore"


@dataclass(frozen=True, slots=True)
class Restored:
    event: MemoryEvent
    action: str  # "deleted", "reverted" or "re-added"
    memory: Memory


async def restore_event(scope: UserScope, event_id: int) -> Restored:
    """Undo event ``event_id`` of this user: an add is deleted, an update set back
    to its before text, a delete added again (with a new id)."""
    event = next((e for e in await scope.memory_events() if e.event_id == event_id), None)
    if event is None:
        raise NotFound(f"no memory change {event_id} for user {scope.user_id}")
    if event.op == "add":
        try:
            memory = await scope.delete_memory(event.memory_id, actor=ACTOR)
        except NotFound:
            raise InvalidInput(f"the memory added by change {event_id} is already gone") from None
        return Restored(event, "deleted", memory)
    assert event.before is not None  # updates and deletes keep what was there
    if event.op == "update":
        try:
            memory = await scope.update_memory(event.memory_id, event.before, actor=ACTOR)
        except NotFound:
            pass  # deleted since: bring the before text back as a memory
        else:
            return Restored(event, "reverted", memory)
    added = await scope.add_memory(event.before, actor=ACTOR)
    if added is None:
        raise InvalidInput(f"the user already has that memory: {event.before}")
    return Restored(event, "re-added", added)
