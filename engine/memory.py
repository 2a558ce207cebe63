"""The memory manager: one model call with add/update/delete tools per turn.

The model sees the user's current memories under short aliases (``m1``,
``m2``, ...) and the turn (the user's message and the assistant's reply). Its
tool calls are applied to that user's scope only; an alias it was not given
(or a raw id, or another user's id) maps to nothing and is rejected, so a
model can never reach a row it was not shown.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidInput, NotFound
from engine.models import ChatMessage, ChatModel, ToolCall, ToolSpec
from engine.models.prompt_blocks import AliasedMemory, memory_alias, render_extraction_request
from engine.records import Memory, Message
from engine.store import UserScope
from engine.validation import printable

SYSTEM_PROMPT = """\
You maintain long-term memories about one user of a chat assistant.

You get the user's current memories, each with an id in brackets, and the
latest turn of the conversation. Decide what durable facts the user revealed
about themselves and record them with the tools:

- add_memory for a new fact;
- update_memory(id, ...) when a fact changed or can be made more complete
  (for example a new name, age or city): update instead of adding a second,
  conflicting memory;
- delete_memory(id) when the user asks you to forget something or a memory
  is plainly wrong.

Capture: name, age, occupation, location, interests, likes and dislikes,
plans, and life events. Ignore small talk, questions, and anything about the
assistant. Never duplicate a memory that already says the same thing.

Write each memory as a short third-person statement without the subject,
for example "Name is Mark Gonzales", "Likes anime and video games",
"Is going to the movies tonight". Use only the ids shown in the memories
list. If nothing durable was said, call no tool."""

_TOPICS_SCHEMA = {
    "type": "array",
    "items": {"type": "string"},
    "description": "one or two short topic words, e.g. name, interests, plans",
}

MEMORY_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "add_memory",
        "Remember a new durable fact about the user.",
        {
            "type": "object",
            "properties": {
                "memory": {"type": "string", "description": "short third-person statement"},
                "topics": _TOPICS_SCHEMA,
            },
            "required": ["memory"],
        },
    ),
    ToolSpec(
        "update_memory",
        "Replace an existing memory (by its id from the list) with a corrected statement.",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "memory id from the list, e.g. m2"},
                "memory": {"type": "string"},
                "topics": _TOPICS_SCHEMA,
            },
            "required": ["id", "memory"],
        },
    ),
    ToolSpec(
        "delete_memory",
        "Forget an existing memory (by its id from the list).",
        {
            "type": "object",
            "properties": {"id": {"type": "string", "description": "memory id, e.g. m2"}},
            "required": ["id"],
        },
    ),
)


@dataclass(frozen=True, slots=True)
class ExtractionPlan:
    """What the model asked for, and how its aliases map back to this user's ids."""

    calls: tuple[ToolCall, ...]
    aliases: dict[str, uuid.UUID]


@dataclass(slots=True)
class ApplyResult:
    added: list[Memory] = field(default_factory=list)
    updated: list[Memory] = field(default_factory=list)
    deleted: list[Memory] = field(default_factory=list)
    skipped_duplicates: int = 0
    rejected: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.added) + len(self.updated) + len(self.deleted)


def build_prompt(
    memories: Sequence[Memory], user_text: str, reply_text: str
) -> tuple[list[ChatMessage], dict[str, uuid.UUID]]:
    aliases = {memory_alias(i): m.memory_id for i, m in enumerate(memories)}
    shown = [AliasedMemory(memory_alias(i), m.content) for i, m in enumerate(memories)]
    request = render_extraction_request(shown, user_text, reply_text)
    return [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", request)], aliases


class MemoryManager:
    def __init__(self, model: ChatModel) -> None:
        self.model = model

    async def plan(
        self, memories: Sequence[Memory], user_message: Message, reply: Message | None
    ) -> ExtractionPlan:
        """Ask the model; no database access, so no transaction is held meanwhile."""
        messages, aliases = build_prompt(
            memories, user_message.content, reply.content if reply else ""
        )
        response = await self.model.call_tools(messages, MEMORY_TOOLS)
        return ExtractionPlan(response.tool_calls, aliases)

    async def apply(
        self,
        scope: UserScope,
        plan: ExtractionPlan,
        *,
        source: Message,
        job_id: int | None,
    ) -> ApplyResult:
        """Apply each call in ``scope`` (the job's transaction); bad calls are rejected."""
        result = ApplyResult()
        for call in plan.calls:
            try:
                await self._apply_one(scope, plan.aliases, call, source, job_id, result)
            except (InvalidInput, NotFound) as exc:
                result.rejected.append(f"{call.name}: {exc.message}")
        return result

    async def _apply_one(
        self,
        scope: UserScope,
        aliases: dict[str, uuid.UUID],
        call: ToolCall,
        source: Message,
        job_id: int | None,
        result: ApplyResult,
    ) -> None:
        if call.error is not None:
            raise InvalidInput(f"unusable arguments ({call.error})")
        args = call.arguments
        audit: dict[str, Any] = {"job_id": job_id, "source_message_id": source.message_id}
        if call.name == "add_memory":
            memory = await scope.add_memory(
                _text(args, "memory"),
                _topics(args),
                source_session_id=source.session_id,
                actor="job",
                **audit,
            )
            if memory is None:
                result.skipped_duplicates += 1
            else:
                result.added.append(memory)
        elif call.name == "update_memory":
            memory_id = _resolve(aliases, args)
            topics = _topics(args) if "topics" in args else None
            result.updated.append(
                await scope.update_memory(
                    memory_id, _text(args, "memory"), topics, actor="job", **audit
                )
            )
        elif call.name == "delete_memory":
            result.deleted.append(
                await scope.delete_memory(_resolve(aliases, args), actor="job", **audit)
            )
        else:
            raise InvalidInput(f"unknown tool {printable(call.name)}")


def _resolve(aliases: dict[str, uuid.UUID], args: dict[str, Any]) -> uuid.UUID:
    alias = args.get("id")
    if not isinstance(alias, str) or alias.strip() not in aliases:
        # Raw database ids (this user's or anyone's) are refused too: only
        # what the model was shown may be changed.
        raise NotFound(f"unknown memory id {printable(alias)}")
    return aliases[alias.strip()]


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"{key} must be text")
    return value


def _topics(args: dict[str, Any]) -> list[str]:
    topics = args.get("topics") or []
    if isinstance(topics, str):
        return [topics]
    return [t for t in topics if isinstance(t, str)] if isinstance(topics, list) else []
