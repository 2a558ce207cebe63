"""The memory manager: one model call per job for add/update/delete changes.

The changes come as tool calls or, for endpoints without tools, as one JSON
object (:mod:`engine.extraction`); both become the same calls here.

The model sees the user's current memories under short aliases (``m1``,
``m2``, ...) and the turn (the user's message and the assistant's reply). Its
tool calls are applied to that user's scope only. A job may carry several
turns of the user (coalesced extraction, engine/jobs.py): they are asked
about in one call, each in a labelled block, and every change names its turn
(``"turn": "t2"``), so it is recorded with that turn's message and job; an alias it was not given
(or a raw id, or another user's id) maps to nothing and is rejected, so a
model can never reach a row it was not shown.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import MemorySettings
from engine.context_budget import clip_to_tokens, estimate_tokens, fit_newest, prompt_budget
from engine.errors import InvalidInput, NotFound
from engine.extraction import EndpointModes, ExtractionMode, excerpt, parse_json_changes
from engine.models import (
    ChatMessage,
    ChatModel,
    ModelRequestRefused,
    ModelToolsUnsupported,
    ToolCall,
    ToolResponse,
    ToolSpec,
    Usage,
)
from engine.models.prompt_blocks import (
    AliasedMemory,
    TurnText,
    memory_alias,
    render_extraction_request,
    render_extraction_turns,
    turn_label,
)
from engine.records import Memory, Message
from engine.redact import scrub
from engine.store import UserScope
from engine.validation import printable

log = logging.getLogger(__name__)

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
for example "Name is Ana Lima", "Likes hiking and board games",
"Is moving to Porto next month". Use only the ids shown in the memories
list. If nothing durable was said, call no tool."""

_TOPICS_SCHEMA = {
    "type": "array",
    "items": {"type": "string"},
    "description": "one or two short topic words, e.g. name, interests, plans",
}
_TURN_SCHEMA = {
    "type": "string",
    "description": "when several turns are shown: the id of the turn this comes from, e.g. t2",
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
                "turn": _TURN_SCHEMA,
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
                "turn": _TURN_SCHEMA,
            },
            "required": ["id", "memory"],
        },
    ),
    ToolSpec(
        "delete_memory",
        "Forget an existing memory (by its id from the list).",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "memory id, e.g. m2"},
                "turn": _TURN_SCHEMA,
            },
            "required": ["id"],
        },
    ),
)


JSON_SYSTEM_PROMPT = """\
You maintain long-term memories about one user of a chat assistant.

You get the user's current memories, each with an id in brackets, and the
latest turn of the conversation. Decide what durable facts the user revealed
about themselves and answer with one JSON object listing the changes:

- "add": a list of new facts;
- "update": a list of {"id": ..., "memory": ...} when a fact changed or can be
  made more complete (for example a new name, age or city): update instead of
  adding a second, conflicting memory;
- "delete": a list of ids when the user asks you to forget something or a
  memory is plainly wrong.

Capture: name, age, occupation, location, interests, likes and dislikes,
plans, and life events. Ignore small talk, questions, and anything about the
assistant. Never duplicate a memory that already says the same thing.

Write each memory as a short third-person statement without the subject.
Answer with the JSON object only, for example:
{"add": ["Name is Ana Lima", "Likes hiking and board games"],
 "update": [{"id": "m2", "memory": "Is moving to Porto next month"}], "delete": ["m3"]}
Use only the ids shown in the memories list. If nothing durable was said,
answer {}."""

EXAMPLE_FACTS = frozenset(
    {"name is ana lima", "likes hiking and board games", "is moving to porto next month"}
)
"""The prompts' example memories: small models copy them, and a copy is not
something the user said."""

PROBE_TOOL = ToolSpec(
    "memchat_probe",
    "Confirms that function calls work. Call it with ok set to true.",
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
)
PROBE_PROMPT = (
    ChatMessage("system", "You are testing function calling. Always call the function."),
    ChatMessage("user", "Call the function memchat_probe with ok set to true."),
)
MAX_NOTE_CHARS = 600


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn a job extracts from: its messages and the job it was queued as."""

    user_message: Message
    reply: Message | None
    job_id: int | None = None


@dataclass(frozen=True, slots=True)
class ExtractionPlan:
    """What the model asked for, and how its aliases map back to this user's ids."""

    calls: tuple[ToolCall, ...]
    aliases: dict[str, uuid.UUID]
    extraction: ExtractionMode = "tools"
    usage: Usage | None = None
    note: str | None = None
    """Set when the answer could not be read as changes at all."""


@dataclass(slots=True)
class ApplyResult:
    added: list[Memory] = field(default_factory=list)
    updated: list[Memory] = field(default_factory=list)
    deleted: list[Memory] = field(default_factory=list)
    skipped_duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    """Calls that could not be applied (bad arguments, unknown ids), with why."""
    over_call_limit: int = 0
    over_memory_limit: int = 0
    memory_count: int | None = None
    """The user's memories after the changes, when they were counted (the job added)."""

    @property
    def changed(self) -> int:
        return len(self.added) + len(self.updated) + len(self.deleted)

    def note(self, settings: MemorySettings) -> str | None:
        """One line for the job's ``note``: what was refused, and why; None if nothing."""
        parts = []
        if self.over_call_limit:
            parts.append(
                f"refused {self.over_call_limit} change(s) over memory.max_calls_per_job "
                f"({settings.max_calls_per_job})"
            )
        if self.over_memory_limit:
            parts.append(
                f"refused {self.over_memory_limit} new memor"
                f"{'y' if self.over_memory_limit == 1 else 'ies'}: the user has "
                f"memory.max_per_user ({settings.max_per_user})"
            )
        if self.rejected:
            parts.append(f"rejected {len(self.rejected)}: " + "; ".join(self.rejected))
        if not parts:
            return None
        return excerpt("; ".join(parts), MAX_NOTE_CHARS)


def build_prompt(
    memories: Sequence[Memory],
    turns: Sequence[tuple[str, str]],
    *,
    system: str = SYSTEM_PROMPT,
    budget: int | None = None,
) -> tuple[list[ChatMessage], dict[str, uuid.UUID]]:
    """The extraction request for ``turns`` (user text, reply text), oldest first;
    with a ``budget`` (tokens), the turns share at most half of it and only the
    newest memories that fit are shown (and aliased)."""
    texts = [TurnText(turn_label(i), user, reply) for i, (user, reply) in enumerate(turns)]
    if budget is not None:
        frame = EXTRACTION_FRAME if len(texts) == 1 else render_extraction_turns([], texts)
        room = budget - estimate_tokens(system) - estimate_tokens(frame)
        share = max(len(texts), 1)
        texts = [
            TurnText(
                t.label,
                clip_to_tokens(t.user_message, max(room // 3 // share, 0)),
                clip_to_tokens(t.assistant_reply, max(room // 6 // share, 0)),
            )
            for t in texts
        ]
        room -= sum(
            estimate_tokens(t.user_message) + estimate_tokens(t.assistant_reply) for t in texts
        )
        # engine/recall.py gives the most related first; fit_newest keeps a list's end.
        newest_last = [m.content for m in reversed(memories)]
        memories = list(memories[: fit_newest(newest_last, max(room, 0)).kept])
    aliases = {memory_alias(i): m.memory_id for i, m in enumerate(memories)}
    shown = [AliasedMemory(memory_alias(i), m.content) for i, m in enumerate(memories)]
    request = render_extraction_turns(shown, texts)
    return [ChatMessage("system", system), ChatMessage("user", request)], aliases


EXTRACTION_FRAME = render_extraction_request([], "", "")


async def probe_extraction_mode(model: ChatModel) -> tuple[ExtractionMode, str]:
    """Whether tool calls will work for extraction on ``model``'s endpoint.

    Two small requests with a dummy tool: forced (does the endpoint do tool
    calls at all?), then not forced, as extraction asks. Some servers honour
    only a forced call (llama.cpp constrains the output with a grammar in any
    chat format, yet ignores ``tools`` otherwise), and a model that never
    picks a tool by itself would remember nothing in tools form. Refused
    tools, or no call, mean json. A transient failure (timeout, 5xx) is
    raised: nothing was learnt.
    """
    if model.is_offline:
        return "tools", "the offline model calls tools"
    try:
        forced = await model.call_tools(PROBE_PROMPT, (PROBE_TOOL,), force=PROBE_TOOL.name)
        if not _probe_called(forced):
            return "json", "the endpoint ignored tools (a forced tool call came back as text)"
        chosen = await model.call_tools(PROBE_PROMPT, (PROBE_TOOL,))
    except ModelToolsUnsupported as exc:
        return "json", f"the endpoint refuses tools ({exc.message})"
    except ModelRequestRefused as exc:
        return "json", f"the endpoint refused a request with tools ({exc.message})"
    if not _probe_called(chosen):
        return "json", "the endpoint calls tools only when forced, and extraction does not force"
    return "tools", "the endpoint returned tool calls, forced and unforced"


def _probe_called(response: ToolResponse) -> bool:
    return any(call.name == PROBE_TOOL.name for call in response.tool_calls)


class MemoryManager:
    def __init__(
        self,
        model: ChatModel,
        settings: MemorySettings | None = None,
        *,
        context_tokens: int | None = None,
        modes: EndpointModes | None = None,
    ) -> None:
        self.model = model
        self.settings = settings or MemorySettings()
        self.context_tokens = context_tokens
        self.modes = modes or EndpointModes()
        # One probe per endpoint, not one per concurrent job.
        self._probe_lock = asyncio.Lock()

    def mode_label(self) -> str:
        """The extraction form as a status line shows it, without asking the model."""
        if self.settings.extraction != "auto":
            return self.settings.extraction
        learnt = self.modes.get(self.model.endpoint)
        return f"{learnt.mode} (auto)" if learnt is not None else "auto (not probed yet)"

    async def mode(self) -> ExtractionMode:
        """The form this manager asks in now: the setting, or for auto what was learnt."""
        if self.settings.extraction != "auto":
            return self.settings.extraction
        if self.model.is_offline:
            return "tools"
        learnt = self.modes.get(self.model.endpoint)
        if learnt is not None:
            return learnt.mode
        async with self._probe_lock:
            learnt = self.modes.get(self.model.endpoint)
            if learnt is not None:
                return learnt.mode
            mode, reason = await probe_extraction_mode(self.model)
            self._learn(mode, reason)
            return mode

    def _learn(self, mode: ExtractionMode, reason: str) -> None:
        reason = scrub(reason)  # a server's error text may echo the key
        # Shown by `memchat doctor`, `memchat jobs` and the status line: a log
        # line beside a CLI reply would only be noise.
        log.info("memory extraction for %s: %s mode, because %s", self.model.endpoint, mode, reason)
        self.modes.remember(self.model.endpoint, mode, reason)

    async def plan(self, memories: Sequence[Memory], turns: Sequence[Turn]) -> ExtractionPlan:
        """Ask the model about ``turns`` (oldest first) in one call; no database
        access, so no transaction is held meanwhile."""
        mode = await self.mode()
        if mode == "tools":
            try:
                return await self._plan_with_tools(memories, turns)
            except ModelToolsUnsupported as exc:
                if self.settings.extraction != "auto":
                    raise ModelToolsUnsupported(
                        f'{exc.message}; set memory.extraction = "json" (or "auto")'
                    ) from exc
                self._learn("json", f"the endpoint refuses tools ({exc.message})")
        return await self._plan_with_json(memories, turns)

    async def _plan_with_tools(
        self, memories: Sequence[Memory], turns: Sequence[Turn]
    ) -> ExtractionPlan:
        messages, aliases = self._prompt(SYSTEM_PROMPT, memories, turns)
        response = await self.model.call_tools(messages, MEMORY_TOOLS)
        calls = response.tool_calls
        note = None
        if not calls and response.text.strip():
            # A model that wrote its changes as JSON text instead of calling
            # the tools (some servers pass tools through, the model ignores them).
            found = parse_json_changes(response.text)
            if found.calls:
                calls = found.calls
        if response.finish_reason == "length" and not calls:
            note = f"the answer was cut off at memory.max_tokens ({self.settings.max_tokens})"
        return ExtractionPlan(calls, aliases, "tools", response.usage, note)

    async def _plan_with_json(
        self, memories: Sequence[Memory], turns: Sequence[Turn]
    ) -> ExtractionPlan:
        messages, aliases = self._prompt(JSON_SYSTEM_PROMPT, memories, turns)
        answer = await self.model.complete(messages, json_object=True)
        found = parse_json_changes(answer.text)
        note = None
        if not found.usable:
            cut = " (cut off at memory.max_tokens)" if answer.finish_reason == "length" else ""
            note = (
                f"the model's answer held no JSON change list{cut}: "
                f"{printable(excerpt(answer.text))}"
            )
        return ExtractionPlan(found.calls, aliases, "json", answer.usage, note)

    def _prompt(
        self, system: str, memories: Sequence[Memory], turns: Sequence[Turn]
    ) -> tuple[list[ChatMessage], dict[str, uuid.UUID]]:
        budget = None
        if self.context_tokens is not None:
            budget = prompt_budget(self.context_tokens, self.settings.max_tokens)
        return build_prompt(
            memories,
            [(t.user_message.content, t.reply.content if t.reply else "") for t in turns],
            system=system,
            budget=budget,
        )

    async def apply(
        self,
        scope: UserScope,
        plan: ExtractionPlan,
        turns: Sequence[Turn],
    ) -> ApplyResult:
        """Apply each call in ``scope`` (the job's transaction); bad calls are rejected.

        Each change is recorded with the turn it names (its message and job);
        one that names none, or a turn it was not shown, is the newest turn's.
        At most ``memory.max_calls_per_job`` calls per turn are applied, and no
        add takes the user past ``memory.max_per_user``: what is refused is
        counted in the result (and so noted on the job), never dropped silently.
        """
        result = ApplyResult()
        allowed = plan.calls[: self.settings.max_calls_per_job * max(len(turns), 1)]
        result.over_call_limit = len(plan.calls) - len(allowed)
        for call in allowed:
            try:
                turn = _turn_of(call, turns)
                await self._apply_one(scope, plan.aliases, call, turn, result)
            except (InvalidInput, NotFound) as exc:
                result.rejected.append(f"{call.name}: {exc.message}")
        return result

    async def _apply_one(
        self,
        scope: UserScope,
        aliases: dict[str, uuid.UUID],
        call: ToolCall,
        turn: Turn,
        result: ApplyResult,
    ) -> None:
        if call.error is not None:
            raise InvalidInput(f"unusable arguments ({call.error})")
        args = call.arguments
        source = turn.user_message
        audit: dict[str, Any] = {"job_id": turn.job_id, "source_message_id": source.message_id}
        if call.name in ("add_memory", "update_memory"):
            _not_the_example(_text(args, "memory"))
        if call.name == "add_memory":
            # Each add counts the user's memories in its own statement, so no
            # add takes the user past memory.max_per_user, without a count first.
            added = await scope.add_memory_within(
                _text(args, "memory"),
                _topics(args),
                self.settings.max_per_user,
                source_session_id=source.session_id,
                actor="job",
                **audit,
            )
            result.memory_count = added.count
            if added.refused:
                result.over_memory_limit += 1
            elif added.memory is None:
                result.skipped_duplicates += 1
            else:
                result.added.append(added.memory)
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
            if result.memory_count is not None:
                result.memory_count -= 1
        else:
            raise InvalidInput(f"unknown tool {printable(call.name)}")


def _turn_of(call: ToolCall, turns: Sequence[Turn]) -> Turn:
    label = call.arguments.get("turn") if call.error is None else None
    for index, turn in enumerate(turns):
        if isinstance(label, str) and label.strip() == turn_label(index):
            return turn
    return turns[-1]


def _not_the_example(text: str) -> None:
    if " ".join(text.lower().split()).strip(" .") in EXAMPLE_FACTS:
        raise InvalidInput("copies the prompt's example, not something the user said")


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
