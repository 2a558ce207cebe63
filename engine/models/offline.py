"""The offline chat model: deterministic, no network, the default provider.

It exists so that the demo, the tests and the UI snapshots run anywhere. Its
replies (:mod:`engine.models.offline_replies`) and memory tool calls
(:mod:`engine.models.offline_rules`) are pure functions of the messages it is
given, so the whole pipeline is exercised exactly as with a real model.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from engine.models.base import (
    ChatMessage,
    Completion,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolResponse,
    ToolSpec,
    Usage,
)
from engine.models.offline_consolidation import plan_consolidation
from engine.models.offline_replies import compose_reply
from engine.models.offline_rules import (
    ADD_MEMORY,
    DELETE_MEMORY,
    UPDATE_MEMORY,
    PlannedCall,
    plan_turns_memory_calls,
)
from engine.models.prompt_blocks import (
    MEMORIES_TAG,
    extract_block,
    parse_consolidation_request,
    parse_extraction_memories,
    parse_extraction_request,
    parse_extraction_turns,
)

OFFLINE_LABEL = "offline model"

_DELTA = re.compile(r"\S+\s*|\s+")


class OfflineChatModel:
    label: str = OFFLINE_LABEL
    endpoint: str = OFFLINE_LABEL
    is_offline: bool = True

    def __init__(self, token_delay_ms: float = 0.0, latency_ms: float = 0.0) -> None:
        """``latency_ms`` is waited before the first delta and before tool calls,
        to simulate a remote model in load scenarios."""
        if token_delay_ms < 0 or latency_ms < 0:
            raise ValueError("delays must not be negative")
        self._delay = token_delay_ms / 1000.0
        self._latency = latency_ms / 1000.0

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[StreamEvent, None]:
        reply = compose_reply(messages)
        for index, delta in enumerate(split_deltas(reply)):
            # Always suspend, even without a delay, so that many concurrent
            # turns interleave the way they do with a real server.
            await asyncio.sleep(self._delay if index else self._latency)
            yield TextDelta(delta)
        yield StreamEnd(reply, Usage(count_words(messages), len(reply.split())), "stop")

    async def call_tools(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        *,
        force: str | None = None,
    ) -> ToolResponse:
        await asyncio.sleep(self._latency)
        if force is not None:
            # A forced call (the doctor's probe) is answered as a real model would.
            call = ToolCall(id="call_1", name=force, arguments={"ok": True})
            return ToolResponse("", (call,), Usage(count_words(messages), 3), "tool_calls")
        planned = _plan(messages, {t.name for t in tools})
        calls = tuple(
            ToolCall(id=f"call_{number}", name=call.name, arguments=call.arguments)
            for number, call in enumerate(planned, start=1)
        )
        completion = sum(len(json.dumps(call.arguments).split()) for call in calls)
        finish = "tool_calls" if calls else "stop"
        return ToolResponse("", calls, Usage(count_words(messages), completion), finish)

    async def complete(
        self, messages: Sequence[ChatMessage], *, json_object: bool = False
    ) -> Completion:
        """An extraction request answered in the json form: the same rules as its tool calls."""
        await asyncio.sleep(self._latency)
        planned = _plan(messages, {ADD_MEMORY, UPDATE_MEMORY, DELETE_MEMORY})
        changes: dict[str, list[Any]] = {}
        for call in planned:
            if call.name == ADD_MEMORY:
                changes.setdefault("add", []).append(call.arguments)
            elif call.name == UPDATE_MEMORY:
                changes.setdefault("update", []).append(call.arguments)
            else:
                # {"id", "turn"} when the request held several turns, else the bare id.
                entry = call.arguments if "turn" in call.arguments else call.arguments["id"]
                changes.setdefault("delete", []).append(entry)
        text = json.dumps(changes)
        return Completion(text, Usage(count_words(messages), len(text.split())), "stop")

    async def aclose(self) -> None:
        return None


def _plan(messages: Sequence[ChatMessage], tool_names: set[str]) -> list[PlannedCall]:
    request_text = next((m.content for m in reversed(messages) if m.role == "user"), "")
    consolidation = parse_consolidation_request(request_text)
    if consolidation is not None:
        return plan_consolidation(consolidation, tool_names)
    request = parse_extraction_request(request_text)
    memories = list(request.memories)
    if extract_block(request_text, MEMORIES_TAG) is None:
        # Tolerate a memory manager that puts the memories in the system prompt.
        for message in messages:
            if message.role == "system":
                memories.extend(parse_extraction_memories(message.content))
    turns = parse_extraction_turns(request_text)
    return plan_turns_memory_calls(turns, memories, tool_names)


def split_deltas(reply: str) -> list[str]:
    """Word-sized deltas (each word with the whitespace after it) that join to ``reply``."""
    return _DELTA.findall(reply)


def count_words(messages: Sequence[ChatMessage]) -> int:
    return sum(len(message.content.split()) for message in messages)
