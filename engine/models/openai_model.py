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

import aiohttp
import httpx2
import openai

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
from engine.models.sse import sse_data

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers (Ollama, llama.cpp, vLLM) ignore the key but the client
# insists on having one.
PLACEHOLDER_API_KEY = "not-needed"
MAX_SERVER_DETAIL_CHARS = 160
CHAT_COMPLETIONS = "/chat/completions"
# The client's own switch (what ``with_streaming_response`` sets) for "hand me
# the response unread": the reply is read as it arrives, not buffered.
STREAMED: dict[str, Any] = {"headers": {"X-Stainless-Raw-Response": "stream"}}

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
        # One client for the life of this model (one per runtime): its
        # connection pool is shared by every turn and memory job. aiohttp is
        # the client's documented transport for many concurrent requests; it
        # costs about half the CPU per request of the default one.
        self._client = openai.AsyncOpenAI(
            api_key=api_key or PLACEHOLDER_API_KEY,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            http_client=openai.DefaultAioHttpClient(),
        )

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[StreamEvent]:
        response = await self._open_stream(messages)
        parts: list[str] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        try:
            async for data in sse_data(response.aiter_raw()):
                if data.startswith("[DONE]"):
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ModelResponseError(self._message("malformed reply stream chunk"))
                if "error" in chunk:
                    raise ModelResponseError(
                        self._message(f"model server error: {_error_detail(chunk['error'])}")
                    )
                usage = _usage(chunk.get("usage")) or usage
                text, finish = self._read_chunk(chunk)
                if text:
                    parts.append(text)
                    yield TextDelta(text)
                finish_reason = finish or finish_reason
        except ModelError:
            raise
        except Exception as exc:
            raise self._translate(exc, streaming=True) from exc
        finally:
            await response.aclose()
        if finish_reason is None:
            # A body can end quietly; only a finish_reason tells a complete
            # reply from one that was cut off.
            raise ModelResponseError(
                self._message("reply stream ended before the reply was complete")
            )
        yield StreamEnd("".join(parts), usage, finish_reason)

    async def call_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> ToolResponse:
        request = self._request(messages)
        request["tools"] = [_tool_param(tool) for tool in tools]
        try:
            response = await self._client.post(
                CHAT_COMPLETIONS, cast_to=httpx2.Response, body=request
            )
            body = response.json()
        except Exception as exc:
            raise self._translate(exc, streaming=False) from exc
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ModelResponseError(self._message("malformed response (no choices)"))
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise ModelResponseError(self._message("malformed response (no message)"))
        raw_calls = message.get("tool_calls") or ()
        if not isinstance(raw_calls, list):
            raise ModelResponseError(self._message("malformed response (tool_calls)"))
        calls = tuple(
            _tool_call(raw, index)
            for index, raw in enumerate(raw_calls, start=1)
            if isinstance(raw, dict) and raw.get("type", "function") == "function"
        )
        content = message.get("content")
        return ToolResponse(
            content if isinstance(content, str) else "", calls, _usage(body.get("usage"))
        )

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

    async def _open_stream(self, messages: Sequence[ChatMessage]) -> httpx2.Response:
        request = self._request(messages)
        request["stream"] = True
        while True:
            if self._send_stream_options:
                request["stream_options"] = {"include_usage": True}
            else:
                request.pop("stream_options", None)
            try:
                return await self._client.post(
                    CHAT_COMPLETIONS, cast_to=httpx2.Response, body=request, options=STREAMED
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if self._send_stream_options and "stream_options" in _server_detail(exc):
                    self._send_stream_options = False
                    continue
                raise self._translate(exc, streaming=False) from exc
            except Exception as exc:
                raise self._translate(exc, streaming=False) from exc

    def _read_chunk(self, chunk: dict[str, Any]) -> tuple[str, str | None]:
        """Text and finish reason of the first choice."""
        choices = chunk.get("choices")
        if not choices:
            return "", None  # the usage-only chunk at the end
        if not isinstance(choices, list):
            raise ModelResponseError(self._message("malformed reply stream chunk"))
        for choice in choices:
            if not isinstance(choice, dict):
                raise ModelResponseError(self._message("malformed reply stream chunk"))
            if (choice.get("index", 0) or 0) != 0:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            finish = choice.get("finish_reason")
            return (
                text if isinstance(text, str) else "",
                finish if isinstance(finish, str) and finish else None,
            )
        return "", None

    def _translate(self, exc: Exception, *, streaming: bool) -> ModelError:
        """One user-facing error for whatever the client (or the wire) raised."""
        attempts = self._max_retries + 1
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(exc, ModelError):
            return exc
        if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
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
        # Raised while reading a streamed body, after the client handed it over.
        if isinstance(exc, httpx2.TimeoutException):
            return ModelTimeout(
                self._message(f"model stopped sending for {self._timeout:g}s mid-reply")
            )
        if isinstance(exc, httpx2.TransportError | httpx2.StreamError):
            return ModelResponseError(self._message("reply stream was cut off"))
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


def _tool_call(raw: dict[str, Any], index: int) -> ToolCall:
    function = raw.get("function")
    if not isinstance(function, dict):
        function = {}
    call_id = raw.get("id")
    call_id = call_id if isinstance(call_id, str) and call_id else f"call_{index}"
    name = function.get("name")
    name = name if isinstance(name, str) else ""
    raw_arguments = function.get("arguments")
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


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    # Responses are not validated: count only what really is a number.
    prompt = raw.get("prompt_tokens", 0)
    completion = raw.get("completion_tokens", 0)
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


def _refused(exc: BaseException) -> bool:
    """Whether a "timeout" really was a refused or failed connect.

    The aiohttp transport reports every connect failure as a connect timeout;
    its cause says what happened.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, aiohttp.ClientConnectorError) and not isinstance(
            cause, aiohttp.ServerTimeoutError
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _error_detail(error: object) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return _one_line(str(message))


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
