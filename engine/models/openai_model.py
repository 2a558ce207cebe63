"""Chat model over any OpenAI-compatible endpoint, through ``openai.AsyncOpenAI``.

Retries and timeouts are the client's own (``max_retries``, ``timeout``);
this module adds no retry loop of its own except the one-time fallback for
servers that reject ``stream_options``. Every failure leaves as a
:class:`~engine.models.base.ModelError` whose message is one line naming the
model and endpoint, and never the API key.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from engine.config import ModelSettings
from engine.models.base import (
    ChatMessage,
    ModelConfigError,
    ModelError,
    ModelRateLimited,
    ModelResponseError,
    ModelTimeout,
    ModelUnavailable,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolResponse,
    ToolSpec,
    Usage,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers (Ollama, llama.cpp, vLLM) ignore the key but the client
# insists on having one.
PLACEHOLDER_API_KEY = "not-needed"
MAX_SERVER_DETAIL_CHARS = 160

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,})")


class OpenAIChatModel:
    label: str
    is_offline: bool = False

    def __init__(self, settings: ModelSettings) -> None:
        api_key = settings.api_key.get_secret_value() if settings.api_key else ""
        base_url = (settings.base_url or "").strip() or OPENAI_BASE_URL
        if not _is_http_url(base_url):
            raise ModelConfigError(
                f"model.base_url must be an http(s) URL like http://127.0.0.1:11434/v1, "
                f"got {_display_url(base_url)!r}"
            )
        if not api_key and _is_openai_host(base_url):
            raise ModelConfigError(
                "OPENAI_API_KEY is not set: set it (or model.api_key), point model.base_url "
                'at an OpenAI-compatible server, or use model.provider = "offline"'
            )
        self._api_key = api_key
        self._name = settings.name
        self._timeout = settings.timeout
        self._max_retries = settings.max_retries
        self._temperature = settings.temperature
        self._where = f"{settings.name} at {_display_url(base_url)}"
        self.label = f"{settings.name} @ {_display_url(base_url)}"
        # Sent until a server rejects it, then never again for this instance.
        self._send_stream_options = True
        self._client = openai.AsyncOpenAI(
            api_key=api_key or PLACEHOLDER_API_KEY,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[StreamEvent]:
        chunks = await self._open_stream(messages)
        parts: list[str] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        try:
            async with chunks:
                async for chunk in chunks:
                    if not isinstance(chunk, ChatCompletionChunk):
                        raise ModelResponseError(self._message("malformed reply stream chunk"))
                    usage = _usage(chunk.usage) or usage
                    text, finish = self._read_chunk(chunk)
                    if text:
                        parts.append(text)
                        yield TextDelta(text)
                    finish_reason = finish or finish_reason
        except ModelError:
            raise
        except Exception as exc:
            raise self._translate(exc, streaming=True) from exc
        if finish_reason is None:
            # The client ends quietly when the body ends; only a finish_reason
            # tells a complete reply from one that was cut off.
            raise ModelResponseError(
                self._message("reply stream ended before the reply was complete")
            )
        yield StreamEnd("".join(parts), usage, finish_reason)

    async def call_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> ToolResponse:
        try:
            response = await self._client.chat.completions.create(
                **self._request(messages),
                tools=[_tool_param(tool) for tool in tools],
            )
        except Exception as exc:
            raise self._translate(exc, streaming=False) from exc
        if not isinstance(response, ChatCompletion) or not getattr(response, "choices", None):
            raise ModelResponseError(self._message("malformed response (no choices)"))
        message = getattr(response.choices[0], "message", None)
        if message is None:
            raise ModelResponseError(self._message("malformed response (no message)"))
        calls = tuple(
            _tool_call(raw, index)
            for index, raw in enumerate(message.tool_calls or (), start=1)
            if getattr(raw, "type", "function") == "function"
        )
        return ToolResponse(message.content or "", calls, _usage(response.usage))

    async def aclose(self) -> None:
        await self._client.close()

    # --- helpers --------------------------------------------------------------------

    def _request(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }
        if self._temperature is not None:
            request["temperature"] = self._temperature
        return request

    async def _open_stream(
        self, messages: Sequence[ChatMessage]
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        request = self._request(messages)
        while True:
            options = (
                {"stream_options": {"include_usage": True}} if self._send_stream_options else {}
            )
            try:
                return await self._client.chat.completions.create(**request, stream=True, **options)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if options and "stream_options" in _server_detail(exc):
                    self._send_stream_options = False
                    continue
                raise self._translate(exc, streaming=False) from exc
            except Exception as exc:
                raise self._translate(exc, streaming=False) from exc

    def _read_chunk(self, chunk: ChatCompletionChunk) -> tuple[str, str | None]:
        """Text and finish reason of the first choice; the client does not validate chunks."""
        choices = chunk.choices
        if choices is None:
            return "", None  # the usage-only chunk at the end
        if not isinstance(choices, list):
            raise ModelResponseError(self._message("malformed reply stream chunk"))
        for choice in choices:
            if (getattr(choice, "index", 0) or 0) != 0:
                continue
            delta = getattr(choice, "delta", None)
            text = getattr(delta, "content", None)
            finish = getattr(choice, "finish_reason", None)
            return (text if isinstance(text, str) else ""), (finish or None)
        return "", None

    def _translate(self, exc: Exception, *, streaming: bool) -> ModelError:
        """One user-facing error for whatever the client (or the wire) raised."""
        attempts = self._max_retries + 1
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(exc, ModelError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            # Mid-stream reads are not retried; requests are, each with the full timeout.
            retried = f", {tries}" if attempts > 1 and not streaming else ""
            what = f"model request timed out after {self._timeout:g}s{retried}"
            return ModelTimeout(self._message(what))
        if isinstance(exc, openai.APIConnectionError):
            if streaming:
                return ModelResponseError(self._message("reply stream was cut off"))
            return ModelUnavailable(self._message(f"cannot reach the model server ({tries})"))
        if isinstance(exc, openai.RateLimitError):
            return ModelRateLimited(self._message(f"model is rate limited (HTTP 429, {tries})"))
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status >= 500:
                return ModelUnavailable(
                    self._message(f"model server error (HTTP {status}, {tries})")
                )
            if status in (401, 403):
                # The server's text may echo part of the key: leave it out.
                return ModelConfigError(self._message(f"the API key was rejected (HTTP {status})"))
            if status == 404:
                return ModelConfigError(
                    self._message(f"model or endpoint not found (HTTP 404): {_server_detail(exc)}")
                )
            what = f"model server refused the request (HTTP {status}): {_server_detail(exc)}"
            return ModelResponseError(self._message(what))
        if isinstance(exc, openai.APIResponseValidationError | ValueError):
            # json.JSONDecodeError and pydantic's ValidationError are ValueErrors.
            return ModelResponseError(self._message("malformed response from the model server"))
        if isinstance(exc, openai.APIError):
            return ModelResponseError(
                self._message(f"model server error: {_one_line(exc.message)}")
            )
        if isinstance(exc, openai.OpenAIError):
            return ModelError(self._message(f"model client error: {_one_line(str(exc))}"))
        return ModelResponseError(
            self._message(f"unexpected failure talking to the model: {type(exc).__name__}")
        )

    def _message(self, what: str) -> str:
        text = f"{what} ({self._where})"
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _KEY_LIKE.sub("sk-***", text)


def _tool_param(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _tool_call(raw: Any, index: int) -> ToolCall:
    function = getattr(raw, "function", None)
    call_id = getattr(raw, "id", None) or f"call_{index}"
    name = getattr(function, "name", None) or ""
    raw_arguments = getattr(function, "arguments", None)
    if not raw_arguments:
        # Some servers send "" for a call without arguments.
        return ToolCall(call_id, name, {})
    try:
        arguments = json.loads(raw_arguments)
    except (TypeError, ValueError) as exc:
        return ToolCall(call_id, name, {}, error=f"arguments are not valid JSON: {exc}")
    if not isinstance(arguments, dict):
        kind = type(arguments).__name__
        return ToolCall(call_id, name, {}, error=f"arguments are a JSON {kind}, not an object")
    return ToolCall(call_id, name, arguments)


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    # The client does not validate responses: count only what really is a number.
    prompt = getattr(raw, "prompt_tokens", 0)
    completion = getattr(raw, "completion_tokens", 0)
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


def _server_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    detail = message if isinstance(message, str) and message else exc.message
    return _one_line(str(detail))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > MAX_SERVER_DETAIL_CHARS:
        line = line[: MAX_SERVER_DETAIL_CHARS - 1] + "…"
    return line


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_openai_host(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "openai.com" or host.endswith(".openai.com")


def _display_url(url: str) -> str:
    """``url`` without user:password, query or fragment: safe to show and log."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(invalid URL)"
    if parts.hostname is None:
        return url.split("?", 1)[0].split("@")[-1]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
