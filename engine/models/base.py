"""The chat-model protocol, its value types and its errors.

Everything that talks to a model (the agent, the memory manager, benchmarks)
depends on this module only, never on a provider module, so providers can be
swapped by configuration.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
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


@dataclass(frozen=True, slots=True)
class RetryingRequest:
    """The request failed and is sent again (the client's retries): retry ``attempt`` of ``of``.

    Comes before any text; a caller may say so ("retrying 1/2…").
    """

    attempt: int
    of: int


StreamEvent = TextDelta | StreamEnd | RetryingRequest


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
    """The answer's text beside (or instead of) the calls; reasoning already removed."""
    tool_calls: tuple[ToolCall, ...]
    usage: Usage | None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole non-streamed answer: its text (reasoning removed), usage and finish reason."""

    text: str
    usage: Usage | None
    finish_reason: str | None


class ChatModel(Protocol):
    label: str
    """Shown in the UI, e.g. "offline model"; never contains a secret."""

    is_offline: bool

    endpoint: str
    """Which server and model answer, e.g. "gpt-4o-mini @ https://api.openai.com/v1":
    what an extraction mode learnt about one endpoint is remembered under it."""

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[StreamEvent, None]:
        """Yield ``TextDelta`` events, then exactly one ``StreamEnd``; before the
        first text a ``RetryingRequest`` for each retry of the request.

        On failure a :class:`ModelError` is raised, possibly after some deltas;
        the caller keeps whatever partial text it has accumulated.
        """
        ...

    async def call_tools(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        *,
        force: str | None = None,
    ) -> ToolResponse:
        """One answer that may call ``tools``; ``force`` names a tool it must call.

        No calls (absent, ``null`` or ``[]``) is a normal answer. A server that
        refuses tools raises :class:`ModelToolsUnsupported`.
        """
        ...

    async def complete(
        self, messages: Sequence[ChatMessage], *, json_object: bool = False
    ) -> Completion:
        """One whole answer without tools; ``json_object`` asks for a JSON object
        (``response_format``) where the server accepts it, plain text otherwise."""
        ...

    async def aclose(self) -> None: ...


class ModelError(MemchatError):
    """A model request failed; the message is one line, fit for a user.

    ``permanent`` errors come back unchanged however often the same request is
    sent (a rejected key, an unknown model, a prompt over the context): they
    are not retried as if they were transient.
    """

    permanent: bool = False


class ModelTimeout(ModelError):
    """No (complete) answer within the configured timeout."""


class ModelRateLimited(ModelError):
    """The server kept answering 429 after the client's own retries."""


class ModelUnavailable(ModelError):
    """The server could not be reached or kept failing (5xx)."""


class ModelResponseError(ModelError):
    """The server answered, but not with a usable reply (malformed, cut off)."""


class ModelRequestRefused(ModelError):
    """The server refused this request as invalid (HTTP 400/422): sending it again won't help."""

    permanent = True


class ModelToolsUnsupported(ModelRequestRefused):
    """The endpoint (or the model behind it) does not take ``tools``."""


class ModelContextTooLong(ModelRequestRefused):
    """The prompt does not fit the model's context window."""


class ModelConfigError(ModelError):
    """The model settings cannot work (missing key, key rejected, wrong URL, unknown model)."""

    exit_code = 2
    permanent = True
