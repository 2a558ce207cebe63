"""Memory consolidation (``memchat memory optimize``): fewer, truer memories.

The model sees one user's memories, oldest first, under aliases (``m1``..),
and answers with ``update_memory`` / ``delete_memory`` calls (or, for an
endpoint without tools, the json form of :mod:`engine.extraction`): merge
near-duplicates into one updated memory and delete the rest, delete what a
newer memory contradicts. It may not add.

A user with more memories than one prompt holds is asked in batches within
the prompt budget (``model.context_tokens`` less ``memory.max_tokens``);
the memories are sorted by text before being cut into batches, so that
memories about the same thing ("Name is ..", "Likes ..") share a batch.

Every change goes through the user's scope, in one transaction, with actor
``optimize``: an ordinary audited change (memory_events keeps the before
text), reversible from the history (``memchat memory restore``). A change is
refused when it names an alias it was not shown (so never another user's
memory, or a raw id), touches a memory twice, would empty a batch, or when the
memory changed since it was read.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.config import ModelSettings
from engine.context_budget import estimate_tokens, prompt_budget
from engine.errors import InvalidInput, NotFound
from engine.extraction import DELETE, UPDATE, excerpt, parse_json_changes
from engine.memory import MemoryManager
from engine.models import ChatMessage, ModelToolsUnsupported, ToolCall, ToolSpec
from engine.models.prompt_blocks import (
    AliasedMemory,
    memory_alias,
    render_consolidation_request,
)
from engine.records import Memory
from engine.store import Store, UserScope
from engine.validation import printable

ACTOR = "optimize"
MAX_BATCH = 200
"""Most memories in one request: the answer (memory.max_tokens) must have room
for the changes, whatever the context window."""

_RULES = """\
You tidy the long-term memories a chat assistant keeps about one user.

You get the memories, oldest first, each with an id in brackets. Make them
fewer and truer without losing any fact:

- near-duplicates (the same fact in other words, or one fact split over
  several memories): update_memory one of them with a single statement that
  says all of it, and delete_memory the others;
- outdated facts (an older memory contradicted by a newer one, e.g. an old
  name, age or city): delete_memory the older one.

Keep each memory a short third-person statement without the subject, e.g.
"Likes hiking and board games". Never invent facts and never merge different
facts. Use only the ids shown."""

SYSTEM_PROMPT = _RULES + "\nIf nothing needs to change, call no tool."
JSON_SYSTEM_PROMPT = (
    _RULES
    + """
Answer with one JSON object only, for example:
{"update": [{"id": "m2", "memory": "Likes hiking and board games"}], "delete": ["m5", "m7"]}
If nothing needs to change, answer {}."""
)

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        UPDATE,
        "Replace a memory (by its id) with one statement that merges the facts of its duplicates.",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "memory id from the list, e.g. m2"},
                "memory": {"type": "string", "description": "short third-person statement"},
            },
            "required": ["id", "memory"],
        },
    ),
    ToolSpec(
        DELETE,
        "Delete a memory (by its id) that duplicates another or that a newer one contradicts.",
        {
            "type": "object",
            "properties": {"id": {"type": "string", "description": "memory id, e.g. m5"}},
            "required": ["id"],
        },
    ),
)


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # "update" | "delete"
    memory: Memory
    """The memory as it was read (its text is the before)."""
    after: str | None = None


@dataclass(slots=True)
class Consolidation:
    user_id: str
    before: int
    after: int
    changes: list[Change] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    """Changes refused, each with why (shown, never applied)."""
    requests: int = 0
    dry_run: bool = False

    @property
    def updated(self) -> int:
        return sum(1 for c in self.changes if c.op == "update")

    @property
    def deleted(self) -> int:
        return sum(1 for c in self.changes if c.op == "delete")

    def summary(self) -> str:
        if not self.changes:
            return f"{self.user_id}: nothing to merge ({self.before} memories)"
        verb = "would change" if self.dry_run else "optimized"
        return (
            f"{self.user_id}: {verb} {self.updated} merged, {self.deleted} removed; "
            f"{self.before} → {self.after} memories"
        )


def batches(memories: Sequence[Memory], budget: int, limit: int = MAX_BATCH) -> list[list[Memory]]:
    """``memories`` cut into requests of at most ``budget`` tokens (and ``limit``
    memories): sorted by text so related ones meet, each batch oldest first."""
    ordered = sorted(memories, key=lambda m: (m.content.casefold(), m.updated_at))
    out: list[list[Memory]] = []
    current: list[Memory] = []
    used = 0
    for memory in ordered:
        cost = estimate_tokens(memory.content) + 4  # the "[m12] " alias
        if current and (used + cost > budget or len(current) >= limit):
            out.append(current)
            current, used = [], 0
        current.append(memory)
        used += cost
    if current:
        out.append(current)
    return [sorted(b, key=lambda m: (m.updated_at, m.created_at, m.memory_id)) for b in out]


class Consolidator:
    def __init__(
        self, store: Store, manager: MemoryManager, *, context_tokens: int | None = None
    ) -> None:
        """``context_tokens``: the memory model's window (unset: the manager's, else
        model.context_tokens's default)."""
        self.store = store
        self.manager = manager
        self.context_tokens = (
            context_tokens or manager.context_tokens or ModelSettings().context_tokens
        )

    async def run(self, user_id: str, *, dry_run: bool = False) -> Consolidation:
        async with self.store.scope(user_id) as scope:
            if await scope.get_user() is None:
                raise NotFound(f"no user {printable(scope.user_id)}")
            memories = await scope.list_memories()
            user_id = scope.user_id
        result = Consolidation(user_id, len(memories), len(memories), dry_run=dry_run)
        # No transaction is held while the model thinks.
        planned: list[Change] = []
        for batch in batches(memories, self._room()):
            if len(batch) < 2:
                continue
            calls = await self._ask(batch)
            result.requests += 1
            planned += _validate(batch, calls, result.rejected)
        if dry_run or not planned:
            result.changes = planned
            result.after = len(memories) - sum(1 for c in planned if c.op == "delete")
            return result
        # Deletes first: an update may take the very words of a duplicate it replaces.
        planned.sort(key=lambda c: c.op != "delete")
        async with self.store.scope(user_id) as scope:
            for change in planned:
                await self._apply(scope, change, result)
            result.after = await scope.count_memories()
        return result

    def _room(self) -> int:
        budget = prompt_budget(self.context_tokens, self.manager.settings.max_tokens)
        return max(budget - estimate_tokens(JSON_SYSTEM_PROMPT) - 16, 64)

    async def _ask(self, batch: Sequence[Memory]) -> tuple[ToolCall, ...]:
        shown = [AliasedMemory(memory_alias(i), m.content) for i, m in enumerate(batch)]
        request = render_consolidation_request(shown)
        model = self.manager.model
        if await self.manager.mode() == "tools":
            messages = [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", request)]
            try:
                response = await model.call_tools(messages, TOOLS)
            except ModelToolsUnsupported:
                if self.manager.settings.extraction != "auto":
                    raise
            else:
                if response.tool_calls or not response.text.strip():
                    return response.tool_calls
                # Changes written as JSON text instead of calls.
                return parse_json_changes(response.text).calls
        messages = [ChatMessage("system", JSON_SYSTEM_PROMPT), ChatMessage("user", request)]
        answer = await model.complete(messages, json_object=True)
        found = parse_json_changes(answer.text)
        if not found.usable:
            raise InvalidInput(
                f"the model's answer held no JSON change list: {printable(excerpt(answer.text))}"
            )
        return found.calls

    async def _apply(self, scope: UserScope, change: Change, result: Consolidation) -> None:
        memory = change.memory
        try:
            now = await scope.get_memory(memory.memory_id)
            if now.content != memory.content or now.updated_at != memory.updated_at:
                raise InvalidInput("it changed while the model was asked")
            if change.op == "update":
                assert change.after is not None
                await scope.update_memory(memory.memory_id, change.after, actor=ACTOR)
            else:
                await scope.delete_memory(memory.memory_id, actor=ACTOR)
        except (InvalidInput, NotFound) as exc:
            what = printable(excerpt(memory.content, 40))
            result.rejected.append(f"{change.op} {what!r}: {exc.message}")
            return
        result.changes.append(change)


def _validate(
    batch: Sequence[Memory], calls: Sequence[ToolCall], rejected: list[str]
) -> list[Change]:
    """The calls that name a shown memory once each and leave the batch non-empty."""
    aliases = {memory_alias(i): m for i, m in enumerate(batch)}
    touched: set[uuid.UUID] = set()
    changes: list[Change] = []
    deletes = 0
    for call in calls:
        name = printable(call.name)
        if call.error is not None:
            rejected.append(f"{name}: unusable arguments ({call.error})")
            continue
        if call.name not in (UPDATE, DELETE):
            rejected.append(f"{name}: not allowed here (only update and delete)")
            continue
        alias = call.arguments.get("id")
        memory = aliases.get(alias.strip()) if isinstance(alias, str) else None
        if memory is None:
            # A raw id (this user's or anyone's) is refused too: only what the
            # model was shown may change.
            rejected.append(f"{name}: unknown memory id {printable(str(alias))}")
            continue
        if memory.memory_id in touched:
            rejected.append(f"{name}: {alias} was already changed in this answer")
            continue
        if call.name == UPDATE:
            text = call.arguments.get("memory")
            if not isinstance(text, str) or not text.strip():
                rejected.append(f"{name}: memory must be text")
                continue
            if " ".join(text.split()) != memory.content:
                changes.append(Change("update", memory, text))
        else:
            if deletes + 1 >= len(batch):
                rejected.append(f"{name}: would delete every memory shown")
                continue
            deletes += 1
            changes.append(Change("delete", memory))
        touched.add(memory.memory_id)
    return changes
