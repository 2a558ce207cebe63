"""Chat models behind one small protocol: ``offline`` and any OpenAI-compatible server.

Callers use :func:`create_model` and the names re-exported here; provider
modules are imported lazily so that the offline path never loads ``openai``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.config import ModelSettings
from engine.models.base import (
    ChatMessage,
    ChatModel,
    Completion,
    ModelConfigError,
    ModelContextTooLong,
    ModelError,
    ModelRateLimited,
    ModelRequestRefused,
    ModelResponseError,
    ModelTimeout,
    ModelToolsUnsupported,
    ModelUnavailable,
    RetryingRequest,
    Role,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolResponse,
    ToolSpec,
    Usage,
)
from engine.models.offline import OfflineChatModel

if TYPE_CHECKING:
    from engine.models.openai_model import OpenAIChatModel

__all__ = [
    "ChatMessage",
    "ChatModel",
    "Completion",
    "ModelConfigError",
    "ModelContextTooLong",
    "ModelError",
    "ModelRateLimited",
    "ModelRequestRefused",
    "ModelResponseError",
    "ModelTimeout",
    "ModelToolsUnsupported",
    "ModelUnavailable",
    "OfflineChatModel",
    "OpenAIChatModel",
    "RetryingRequest",
    "Role",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "ToolCall",
    "ToolResponse",
    "ToolSpec",
    "Usage",
    "create_model",
]


def create_model(settings: ModelSettings) -> ChatModel:
    """The model the settings ask for; raises ModelConfigError when they cannot work."""
    if settings.resolved_provider == "offline":
        return OfflineChatModel(
            token_delay_ms=settings.offline_token_delay_ms,
            latency_ms=settings.offline_latency_ms,
        )
    # Imported here: the openai package is heavy and the offline model does not need it.
    from engine.models.openai_model import OpenAIChatModel

    return OpenAIChatModel(settings)


def __getattr__(name: str) -> Any:
    # `from engine.models import OpenAIChatModel` works without importing
    # openai for everyone else.
    if name == "OpenAIChatModel":
        from engine.models.openai_model import OpenAIChatModel

        return OpenAIChatModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
