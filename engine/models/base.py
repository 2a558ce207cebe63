"""The chat-model protocol, its value types and its errors.

Everything that talks to a model (the agent, the memory manager, benchmarks)
depends on this module only, never on a provider module, so providers can be
swapped by configuration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from engine.errors import MemchatError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Last event of a stream; ``text`` is the whole reply, not a delta."""

    text: str
    usage: Usage | None
    finish_reason: str | None


StreamEvent = TextDelta | StreamEnd


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for.

    ``error`` is set (and ``arguments`` is empty) when the model's arguments
    were not a JSON object: a bad call is data for the caller to report, not a
    reason to throw away the other calls of the same response.
    """

    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ToolResponse:
    text: str
    tool_calls: tuple[ToolCall, ...]
    usage: Usage | None


class ChatModel(Protocol):
    label: str
    """Shown in the UI, e.g. "offline model"; never contains a secret."""

    is_offline: bool

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[StreamEvent]:
        """Yield ``TextDelta`` events, then exactly one ``StreamEnd``.

        On failure a :class:`ModelError` is raised, possibly after some deltas;
        the caller keeps whatever partial text it has accumulated.
        """
        ...

    async def call_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> ToolResponse: ...

    async def aclose(self) -> None: ...


class ModelError(MemchatError):
    """A model request failed; the message is one line, fit for a user."""


class ModelTimeout(ModelError):
    """No (complete) answer within the configured timeout."""


class ModelRateLimited(ModelError):
    """The server kept answering 429 after the client's own retries."""


class ModelUnavailable(ModelError):
    """The server could not be reached or kept failing (5xx)."""


class ModelResponseError(ModelError):
    """The server answered, but not with a usable reply (malformed, cut off)."""


class ModelConfigError(ModelError):
    """The model settings cannot work (missing key, key rejected, wrong URL)."""

    exit_code = 2
