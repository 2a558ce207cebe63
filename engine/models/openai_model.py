"""Chat model over any OpenAI-compatible endpoint, through ``openai.AsyncOpenAI``.

Retries and timeouts are the client's own (``max_retries``, ``timeout``); a
streamed reply reports each retry as it is sent (``RetryingRequest``, read off
the retry count the client puts on every attempt). This module adds no retry
loop of its own except one-time fallbacks for
servers that reject a request field (``stream_options``, ``response_format``,
``max_tokens``, a named ``tool_choice``): each is dropped or changed once and
remembered for the life of the instance. Every failure leaves as a
:class:`~engine.models.base.ModelError` whose message is one line naming the
model and endpoint, and never the API key.

Real servers differ in what they send (see docs/model-conformance.md, whose
every row has a test in tests/engine/test_provider_conformance.py): replies
are read leniently — no calls is an answer, arguments may be a JSON string,
an object or JSON inside text, reasoning is dropped — and error bodies are
read for their cause (tools refused, prompt over the context, unknown model),
whichever of the shapes in use they come in.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import re
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import httpx2
import openai

from engine.config import ModelSettings
from engine.models.base import (
    ChatMessage,
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
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolResponse,
    ToolSpec,
    Usage,
)
from engine.models.endpoint import (
    OPENAI_BASE_URL,
    PLACEHOLDER_API_KEY,
    _display_url,
    _is_http_url,
    _is_openai_host,
)
from engine.models.sse import sse_data
from engine.text import one_line

MAX_SERVER_DETAIL_CHARS = 160
CHAT_COMPLETIONS = "/chat/completions"
RETRY_ALLOWANCE_SECONDS = 10.0
"""Room per attempt beyond model.timeout in a whole request's deadline (back-off, slack)."""
# The client's own switch (what ``with_streaming_response`` sets) for "hand me
# the response unread": the reply is read as it arrives, not buffered.
STREAMED: openai.RequestOptions = {"headers": {"X-Stainless-Raw-Response": "stream"}}
# Tool arguments are flat objects; anything nested deeper is a model gone
# astray (or a hostile reply), not data worth walking.
MAX_ARGUMENT_DEPTH: Final = 10
THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"
# Each one-time fallback (stream_options, response_format, max_tokens, and
# the two of tool_choice) costs at most one extra request.
MAX_REQUEST_ADAPTATIONS: Final = 5

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,})")
# A server or model that refuses the ``tools`` field, in the words real
# servers use (sources in docs/model-conformance.md).
_TOOLS_REFUSED = re.compile(
    r"does not support (?:tools|tool use|tool calling|function calling)"  # Ollama
    r"|tools param requires --jinja"  # llama.cpp server without --jinja
    r"|unsupported param: tools"  # older llama.cpp server
    r"|enable-auto-tool-choice"  # vLLM without a tool parser
    r"|no endpoints found that support tool use"  # OpenRouter
    r"|(?:tools?|tool use|tool calling|function calling) (?:is|are) not supported",
    re.IGNORECASE,
)
# A prompt over the model's context window.
_CONTEXT_EXCEEDED = re.compile(
    r"context_length_exceeded|exceed_context_size"  # OpenAI/Groq code, llama.cpp type
    r"|maximum context length"  # OpenAI, vLLM, DeepSeek
    r"|exceeds? (?:the )?(?:available |maximum |model'?s? )?context"  # llama.cpp, Ollama
    r"|context (?:size|window|length) (?:has been |was |is )?exceeded"
    r"|context the overflows"  # LM Studio (sic)
    r"|prompt is too long|reduce the length of the messages",
    re.IGNORECASE,
)
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_CODE_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*(.*?)\s*```$", re.DOTALL)


_Started = tuple[AsyncGenerator[StreamEvent, None], StreamEvent | None]
"""A streamed reply under way: its events and the first of them (None: it sent none)."""

_RETRY_LISTENER: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "memchat_retry_listener", default=None
)
"""Who hears of this request's retries: set for one streamed request's task only."""


class _RetryReportingClient(openai.AsyncOpenAI):
    """The openai client, telling the request's listener of each retry it sends.

    ``_prepare_request`` is the client's documented hook for every attempt it
    builds; the client numbers them in ``x-stainless-retry-count``. Retries
    stay the client's own (its back-off, Retry-After, which errors it retries).
    """

    async def _prepare_request(self, request: httpx2.Request) -> None:
        await super()._prepare_request(request)
        listener = _RETRY_LISTENER.get()
        taken = request.headers.get("x-stainless-retry-count", "0")
        if listener is not None and taken.isdigit() and int(taken) > 0:
            listener(int(taken))


@dataclass(frozen=True, slots=True)
class _ServerError:
    """What an error body says, whichever shape it came in."""

    message: str  # one line, not yet shortened
    code: str
    type: str
    html: bool  # a web page (a proxy, a wrong URL), not an API answer

    @property
    def tools_refused(self) -> bool:
        return bool(_TOOLS_REFUSED.search(self.message))

    @property
    def context_exceeded(self) -> bool:
        if self.code == "context_length_exceeded" or self.type == "exceed_context_size_error":
            return True
        return bool(_CONTEXT_EXCEEDED.search(self.message))

    def mentions(self, *words: str) -> bool:
        text = f"{self.message} {self.code}".lower()
        return all(word in text for word in words)


class OpenAIChatModel:
    label: str
    endpoint: str
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
        self._max_tokens = settings.max_tokens
        self._where = f"{settings.name} at {_display_url(base_url)}"
        self.label = f"{settings.name} @ {_display_url(base_url)}"
        self.endpoint = self.label
        # Each sent until a server rejects it, then never again for this instance.
        self._send_stream_options = True
        self._send_response_format = True
        # Newer OpenAI (reasoning) models reject max_tokens and want this name.
        self._tokens_field = "max_tokens"
        # How a forced call is asked for: by name, else "required" (llama.cpp
        # takes only the string forms; OpenRouter may route to no provider
        # that takes a named one), else not at all.
        self._tool_choice_forms: tuple[str, ...] = ("named", "required", "omitted")
        # One client for the life of this model (one per runtime): its
        # connection pool is shared by every turn and memory job. aiohttp is
        # the client's documented transport for many concurrent requests; it
        # costs about half the CPU per request of the default one.
        self._client = _RetryReportingClient(
            api_key=api_key or PLACEHOLDER_API_KEY,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            http_client=openai.DefaultAioHttpClient(),
        )

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[StreamEvent, None]:
        # model.timeout bounds the wait for reply text, not only each read: a
        # server sending keep-alive comments, blanks or an endless <think>
        # block would otherwise hold the turn forever. Visible text re-arms it.
        # The request itself (connect, headers) keeps the client's own timeout
        # and retries; the deadline starts with the body.
        started: _Started | None = None
        sending = self._send_reporting_retries(self._request(messages))
        async with contextlib.aclosing(sending) as attempts:
            async for attempt in attempts:
                if isinstance(attempt, RetryingRequest):
                    yield attempt
                else:
                    started = attempt
        assert started is not None  # the sender yields it last, or raises
        events, first = started
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline, contextlib.aclosing(events):
                if first is None:
                    return
                event: StreamEvent | None = first
                while event is not None:
                    if isinstance(event, TextDelta) and event.text.strip():
                        deadline.reschedule(loop.time() + self._timeout)
                    yield event
                    event = await anext(events, None)
        except TimeoutError as exc:
            raise ModelTimeout(
                self._message(f"no reply text came for {self._timeout:g}s (model.timeout)")
            ) from exc

    async def _send_and_start(self, request: dict[str, Any]) -> _Started:
        """Send the request and read its first event, in the same step as the answer
        comes: a stream cut right after its first chunks still delivers them (the
        transport drops what it buffered once it sees the connection gone)."""
        response = await self._send(request, stream=True)
        events = self._read_stream(response)
        try:
            async with asyncio.timeout(self._timeout):
                first = await anext(events, None)
        except TimeoutError as exc:
            await events.aclose()
            raise ModelTimeout(
                self._message(f"no reply text came for {self._timeout:g}s (model.timeout)")
            ) from exc
        except BaseException:
            await events.aclose()
            raise
        return events, first

    async def _send_reporting_retries(
        self, request: dict[str, Any]
    ) -> AsyncGenerator[RetryingRequest | _Started, None]:
        """``RetryingRequest`` for each retry the client sends, then the started stream."""
        retries: asyncio.Queue[int] = asyncio.Queue()
        context = contextvars.copy_context()
        context.run(_RETRY_LISTENER.set, retries.put_nowait)
        # Its own task, so that retries can be told while the client still waits.
        send = asyncio.create_task(self._send_and_start(request), context=context)
        handed = False
        try:
            while not send.done():
                retry = asyncio.ensure_future(retries.get())
                try:
                    await asyncio.wait({send, retry}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    retry.cancel()
                if retry.done() and not retry.cancelled():
                    yield RetryingRequest(retry.result(), self._max_retries)
            while not retries.empty():  # told in the same step as the answer came
                yield RetryingRequest(retries.get_nowait(), self._max_retries)
            started = send.result()
            handed = True
            yield started
        finally:
            if not send.done():
                send.cancel()
                await asyncio.wait({send})
            elif not handed and not send.cancelled() and send.exception() is None:
                # The caller left between the answer and taking it: close it here.
                await send.result()[0].aclose()

    async def _read_stream(self, response: httpx2.Response) -> AsyncGenerator[StreamEvent, None]:
        parts: list[str] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        thinking = _ThinkFilter()
        events = 0
        try:
            async for data in sse_data(response.aiter_raw()):
                events += 1
                if data.startswith("[DONE]"):
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ModelResponseError(self._message("malformed reply stream chunk"))
                if chunk.get("error"):
                    # OpenRouter (and others) report a failure after the 200 as an event.
                    raise self._body_error(chunk["error"])
                usage = _usage(chunk.get("usage")) or _groq_usage(chunk) or usage
                text, finish = self._read_chunk(chunk)
                if text:
                    text = thinking.feed(text)
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
        held = thinking.finish()
        if held:
            parts.append(held)
            yield TextDelta(held)
        if finish_reason is None and events == 0:
            # llama.cpp's server (and LM Studio) answer a streamed prompt over
            # their context window with a 200 and an empty body.
            raise ModelResponseError(
                self._message(
                    "the server ended the reply stream without sending anything (a prompt "
                    "over the server's context window does this: is model.context_tokens "
                    "at most the server's window?)"
                )
            )
        if finish_reason is None:
            # A body can end quietly; only a finish_reason tells a complete
            # reply from one that was cut off.
            raise ModelResponseError(
                self._message("reply stream ended before the reply was complete")
            )
        yield StreamEnd("".join(parts), usage, finish_reason)

    async def call_tools(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        *,
        force: str | None = None,
    ) -> ToolResponse:
        request = self._request(messages)
        request["tools"] = [_tool_param(tool) for tool in tools]
        if force is not None:
            # Without force nothing is sent: servers default to "auto", and
            # some (older vLLM) refuse an explicit "auto" they cannot honour.
            request["tool_choice"] = {"type": "function", "function": {"name": force}}
        message, finish_reason, usage = await self._answer(request)
        raw_calls = message.get("tool_calls")
        if isinstance(raw_calls, dict):
            raw_calls = [raw_calls]
        elif not isinstance(raw_calls, list):
            raw_calls = []  # absent or null: an answer without calls
        calls = [
            _tool_call(raw, index)
            for index, raw in enumerate(raw_calls, start=1)
            if isinstance(raw, dict) and raw.get("type", "function") in ("function", None)
        ]
        text = _strip_reasoning(_content_text(message.get("content")))
        if not calls and text:
            # Models without a server-side tool parser write the call as text.
            calls, text = _calls_in_text(text, {tool.name for tool in tools})
        return ToolResponse(text, tuple(calls), usage, finish_reason)

    async def complete(
        self, messages: Sequence[ChatMessage], *, json_object: bool = False
    ) -> Completion:
        message, finish_reason, usage = await self._answer(
            self._request(messages), json_object=json_object
        )
        text = _strip_reasoning(_content_text(message.get("content")))
        return Completion(text, usage, finish_reason)

    async def aclose(self) -> None:
        await self._client.close()

    # --- requests -------------------------------------------------------------------

    def _request(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }
        if self._temperature is not None:
            request["temperature"] = self._temperature
        return request

    def _body(self, request: dict[str, Any], *, stream: bool, json_object: bool) -> dict[str, Any]:
        """``request`` with the fields whose form depends on what the server accepted."""
        body = dict(request)
        body[self._tokens_field] = self._max_tokens
        if stream:
            body["stream"] = True
            if self._send_stream_options:
                body["stream_options"] = {"include_usage": True}
        if json_object and self._send_response_format:
            body["response_format"] = {"type": "json_object"}
        if "tool_choice" in body and self._tool_choice_forms[0] != "named":
            if self._tool_choice_forms[0] == "required":
                body["tool_choice"] = "required"
            else:
                del body["tool_choice"]
        return body

    async def _send(
        self, request: dict[str, Any], *, stream: bool = False, json_object: bool = False
    ) -> httpx2.Response:
        tools = "tools" in request
        for _ in range(MAX_REQUEST_ADAPTATIONS + 1):
            body = self._body(request, stream=stream, json_object=json_object)
            try:
                return await self._client.post(
                    CHAT_COMPLETIONS,
                    cast_to=httpx2.Response,
                    body=body,
                    options=STREAMED if stream else {},
                )
            except (
                openai.BadRequestError,
                openai.NotFoundError,
                openai.UnprocessableEntityError,
            ) as exc:
                if self._adapt(_server_error(exc), body):
                    continue
                raise self._translate(exc, streaming=False, tools=tools) from exc
            except Exception as exc:
                raise self._translate(exc, streaming=False, tools=tools) from exc
        raise ModelRequestRefused(self._message("the server refused every form of the request"))

    def _adapt(self, error: _ServerError, body: dict[str, Any]) -> bool:
        """Whether a refusal names a field this model can drop or rename (then it is, for good)."""
        if error.context_exceeded:
            # vLLM's "'max_tokens' or 'max_completion_tokens' is too large: ... maximum
            # context length" names the field but is about the prompt's size.
            return False
        if "stream_options" in body and error.mentions("stream_options"):
            self._send_stream_options = False
            return True
        if self._tokens_field == "max_tokens" and error.mentions("max_completion_tokens"):
            self._tokens_field = "max_completion_tokens"
            return True
        if "response_format" in body and error.mentions("response_format"):
            self._send_response_format = False
            return True
        if "tool_choice" in body and error.mentions("tool_choice") and not error.tools_refused:
            self._tool_choice_forms = self._tool_choice_forms[1:] or ("omitted",)
            return True
        return False

    async def _answer(
        self, request: dict[str, Any], *, json_object: bool = False
    ) -> tuple[dict[str, Any], str | None, Usage | None]:
        """The message, finish reason and usage of one non-streamed answer."""
        # The client's timeout bounds each read, not the request: a server
        # that trickles its body a byte at a time would hold it forever.
        # Lenient on purpose: the client's own timeouts speak first when they apply.
        whole = (self._timeout + RETRY_ALLOWANCE_SECONDS) * (self._max_retries + 1)
        try:
            async with asyncio.timeout(whole):
                response = await self._send(request, json_object=json_object)
        except TimeoutError as exc:
            raise ModelTimeout(
                self._message(
                    f"model request timed out: the answer took longer than {whole:g}s in all "
                    "(model.timeout, max_retries)"
                )
            ) from exc
        try:
            body = json.loads(response.content)
        except RecursionError as exc:
            raise ModelResponseError(
                self._message("malformed response (nested too deeply)")
            ) from exc
        except ValueError as exc:
            if _looks_like_html(response.headers.get("content-type", ""), response.text):
                raise ModelConfigError(
                    self._message(
                        "the server answered with an HTML page, not the API: "
                        "check model.base_url (it usually ends in /v1)"
                    )
                ) from exc
            raise self._translate(exc, streaming=False) from exc
        except Exception as exc:
            raise self._translate(exc, streaming=False) from exc
        if not isinstance(body, dict):
            raise ModelResponseError(self._message("malformed response (not a JSON object)"))
        if body.get("error"):
            # LM Studio and OpenRouter can put an error in a 200 answer.
            raise self._body_error(body["error"])
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ModelResponseError(self._message("malformed response (no choices)"))
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise ModelResponseError(self._message("malformed response (no message)"))
        finish = choices[0].get("finish_reason")
        return (
            message,
            finish if isinstance(finish, str) and finish else None,
            _usage(body.get("usage")),
        )

    def _read_chunk(self, chunk: dict[str, Any]) -> tuple[str, str | None]:
        """Text and finish reason of the first choice.

        Only ``delta.content`` is text: ``reasoning_content`` / ``reasoning``
        (DeepSeek, vLLM, llama.cpp, Ollama, OpenRouter) and ``tool_calls``
        deltas are not part of the reply.
        """
        choices = chunk.get("choices")
        if not choices:
            return "", None  # the usage-only chunk at the end; Azure's prompt-filter chunk
        if not isinstance(choices, list):
            raise ModelResponseError(self._message("malformed reply stream chunk"))
        for choice in choices:
            if not isinstance(choice, dict):
                raise ModelResponseError(self._message("malformed reply stream chunk"))
            if (choice.get("index", 0) or 0) != 0:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, list):
                text = _content_text(text)  # Mistral's thinking models stream content parts
            finish = choice.get("finish_reason")
            return (
                text if isinstance(text, str) else "",
                finish if isinstance(finish, str) and finish else None,
            )
        return "", None

    # --- errors ---------------------------------------------------------------------

    def _translate(self, exc: Exception, *, streaming: bool, tools: bool = False) -> ModelError:
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
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc.status_code, _server_error(exc), tries, tools=tools)
        # Raised while reading a streamed body, after the client handed it over.
        if isinstance(exc, httpx2.TimeoutException):
            return ModelTimeout(
                self._message(f"model stopped sending for {self._timeout:g}s mid-reply")
            )
        if isinstance(exc, httpx2.TransportError | httpx2.StreamError):
            return ModelResponseError(self._message("reply stream was cut off"))
        if isinstance(exc, openai.APIResponseValidationError | ValueError | RecursionError):
            # json.JSONDecodeError and pydantic's ValidationError are ValueErrors.
            return ModelResponseError(self._message("malformed response from the model server"))
        if isinstance(exc, openai.APIError):
            detail = one_line(exc.message, MAX_SERVER_DETAIL_CHARS)
            return ModelResponseError(self._message(f"model server error: {detail}"))
        if isinstance(exc, openai.OpenAIError):
            detail = one_line(str(exc), MAX_SERVER_DETAIL_CHARS)
            return ModelError(self._message(f"model client error: {detail}"))
        return ModelResponseError(
            self._message(f"unexpected failure talking to the model: {type(exc).__name__}")
        )

    def _status_error(
        self, status: int, error: _ServerError, tries: str, *, tools: bool
    ) -> ModelError:
        """The error for an HTTP error answer, by what its body says first, then its status."""
        detail = _shorten(error.message)
        if error.html:
            # Never show the page itself: it is a proxy's or a web server's, not the API's.
            what = f"HTTP {status} from the server (an HTML page, probably a proxy)"
            if status == 404:
                return ModelConfigError(self._message(f"{what}: check model.base_url"))
            if status in (401, 403, 407):
                return ModelConfigError(self._message(f"{what}: access was refused"))
            if status >= 500 or status in (408, 429):
                return ModelUnavailable(self._message(f"{what}, {tries}"))
            return ModelRequestRefused(self._message(what))
        # Causes first: llama.cpp refuses tools with a 500, OpenRouter with a 404.
        if tools and error.tools_refused and status in (400, 404, 422, 500, 501):
            return ModelToolsUnsupported(
                self._message(f"the model server does not take tools (HTTP {status}): {detail}")
            )
        if error.context_exceeded and (400 <= status < 500 or status == 500):
            return ModelContextTooLong(
                self._message(
                    f"the prompt is longer than the model's context ({detail}): "
                    "lower model.context_tokens"
                )
            )
        if status == 429:
            return ModelRateLimited(self._message(f"model is rate limited (HTTP 429, {tries})"))
        if status == 408:
            return ModelTimeout(
                self._message(f"the server timed out the request (HTTP 408, {tries})")
            )
        if status >= 500 or status == 409:
            suffix = f": {detail}" if detail else ""
            return ModelUnavailable(
                self._message(f"model server error (HTTP {status}, {tries}){suffix}")
            )
        if status == 401:
            # The server's text may echo part of the key: leave it out.
            return ModelConfigError(self._message("the API key was rejected (HTTP 401)"))
        if status == 403:
            # OpenRouter's 403 is a moderation flag, Azure's a network rule: say which.
            return ModelConfigError(self._message(f"access denied (HTTP 403): {detail}"))
        if status == 402:
            return ModelConfigError(
                self._message(f"the account cannot pay for this request (HTTP 402): {detail}")
            )
        if status == 404:
            if error.mentions("model") or error.code == "model_not_found":
                return ModelConfigError(
                    self._message(
                        f"model {self._name!r} is not available at the server (HTTP 404): {detail}"
                    )
                )
            return ModelConfigError(
                self._message(f"endpoint not found (HTTP 404): check model.base_url ({detail})")
            )
        return ModelRequestRefused(
            self._message(f"the model server refused the request (HTTP {status}): {detail}")
        )

    def _body_error(self, raw: object) -> ModelError:
        """The error for an error object inside a 200 answer or a stream."""
        error = _error_object(raw)
        detail = _shorten(error.message) or "no detail"
        if error.context_exceeded:
            return ModelContextTooLong(
                self._message(
                    f"the prompt is longer than the model's context ({detail}): "
                    "lower model.context_tokens"
                )
            )
        return ModelResponseError(self._message(f"model server error: {detail}"))

    def _message(self, what: str) -> str:
        text = f"{what} ({self._where})"
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _KEY_LIKE.sub("sk-***", text)


# --- replies --------------------------------------------------------------------------


class _ThinkFilter:
    """Drops a leading ``<think>…</think>`` block from streamed text.

    Text is held back only while it could still be (or is inside) that block:
    a reply that does not open with ``<think>`` passes through after its
    first non-blank characters, with no copying.
    """

    __slots__ = ("_held", "_state")

    _UNDECIDED, _INSIDE, _AFTER, _PASS = range(4)

    def __init__(self) -> None:
        self._state = self._UNDECIDED
        self._held = ""

    def feed(self, text: str) -> str:
        if self._state == self._PASS:
            return text
        self._held += text
        if self._state == self._UNDECIDED:
            head = self._held.lstrip()
            if head.startswith(THINK_OPEN):
                self._held = head[len(THINK_OPEN) :]
                self._state = self._INSIDE
            elif not head or THINK_OPEN.startswith(head):
                return ""  # blank so far, or a prefix of <think>: wait for more
            else:
                self._state = self._PASS
                held, self._held = self._held, ""
                return held
        if self._state == self._INSIDE:
            end = self._held.find(THINK_CLOSE)
            if end < 0:
                # Keep only what may be the start of a </think> split across chunks.
                self._held = self._held[-(len(THINK_CLOSE) - 1) :]
                return ""
            self._held = self._held[end + len(THINK_CLOSE) :]
            self._state = self._AFTER
        # After the block: the blank line models put before the answer is not part of it.
        rest = self._held.lstrip()
        self._held = ""
        if rest:
            self._state = self._PASS
        return rest

    def finish(self) -> str:
        """Text still held at the end of the stream (a reply that only looked like ``<think``)."""
        if self._state == self._UNDECIDED:
            held, self._held = self._held, ""
            return held
        return ""  # an unclosed think block is all reasoning


def _strip_reasoning(text: str) -> str:
    """``text`` without a leading ``<think>…</think>`` block (or an unclosed one)."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return text
    end = stripped.find(THINK_CLOSE)
    return "" if end < 0 else stripped[end + len(THINK_CLOSE) :].lstrip()


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content parts (Mistral's thinking models): only the text parts are the answer.
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


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
    arguments, error = _arguments(function.get("arguments"))
    return ToolCall(call_id, name, arguments, error=error)


def _arguments(raw: object) -> tuple[dict[str, Any], str | None]:
    """A call's arguments as an object, or the reason they are not one.

    Accepted: a JSON string (OpenAI), an already-parsed object (Ollama's
    native shape), nothing, ``""`` or ``"null"`` (a call without arguments),
    and a JSON object inside other text (a code fence, "Sure: {...}").
    """
    if raw is None:
        return {}, None
    value: object = raw
    if isinstance(raw, str):
        if not raw.strip():
            return {}, None
        try:
            value = _loads_lenient(raw)
            if isinstance(value, str) and value.strip().startswith("{"):
                value = json.loads(value)  # encoded twice by the server
        except RecursionError:
            return {}, f"arguments are nested deeper than {MAX_ARGUMENT_DEPTH} levels"
        except ValueError as exc:
            return {}, f"arguments are not valid JSON: {exc}"
        if value is None:
            return {}, None  # "null": Ollama marshals a call without arguments so
    if not isinstance(value, dict):
        return {}, f"arguments are a JSON {_json_kind(value)}, not an object"
    if _too_deep(value, MAX_ARGUMENT_DEPTH):
        return {}, f"arguments are nested deeper than {MAX_ARGUMENT_DEPTH} levels"
    return value, None


def _loads_lenient(text: str) -> object:
    """``json.loads``, or else the first JSON object inside ``text``; the first error otherwise."""
    try:
        return json.loads(text)
    except ValueError as first:
        fenced = _CODE_FENCE.match(text.strip())
        inner = fenced.group(1) if fenced else text
        start = inner.find("{")
        if start < 0:
            raise first from None
        try:
            value, _ = json.JSONDecoder().raw_decode(inner, start)
        except ValueError:
            raise first from None
        return value


def _too_deep(value: object, limit: int) -> bool:
    # Iterative: a hostile reply must not be able to exhaust the stack here either.
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Collection[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _calls_in_text(text: str, offered: Collection[str]) -> tuple[list[ToolCall], str]:
    """Tool calls a model wrote into its text, and the text without them.

    Recovered: hermes/Qwen ``<tool_call>{"name": .., "arguments": ..}</tool_call>``
    blocks (what llama.cpp and vLLM pass through when they have no parser for
    the model), and a reply that is nothing but such a JSON object or a list
    of them (Llama 3's ``{"name": .., "parameters": ..}``, vLLM's
    ``{"type": "function", "function": {...}}``). Only calls to an offered
    tool count: anything else is left as text, never guessed at.
    """
    calls: list[ToolCall] = []

    def recover(match: re.Match[str]) -> str:
        call = _call_from_json(match.group(1), offered, len(calls) + 1)
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    if "<tool_call>" in text:
        remaining = _TOOL_CALL_BLOCK.sub(recover, text).strip()
        return calls, remaining if calls else text
    stripped = text.strip()
    fenced = _CODE_FENCE.match(stripped)
    candidate = fenced.group(1) if fenced else stripped
    if not candidate.startswith(("{", "[")):
        return [], text
    try:
        value = json.loads(candidate)
    except (ValueError, RecursionError):
        return [], text
    items = value if isinstance(value, list) else [value]
    for item in items:
        call = _call_from_object(item, offered, len(calls) + 1)
        if call is None:
            return [], text  # all or nothing: a half-recovered reply would lose the rest
        calls.append(call)
    return calls, ""


def _call_from_json(text: str, offered: Collection[str], index: int) -> ToolCall | None:
    try:
        value = _loads_lenient(text)
    except (ValueError, RecursionError):
        return None
    return _call_from_object(value, offered, index)


def _call_from_object(value: object, offered: Collection[str], index: int) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict):
        value = function
    name = value.get("name")
    if not isinstance(name, str) or name not in offered:
        return None
    raw = value.get("arguments", value.get("parameters"))
    arguments, error = _arguments(raw)
    return ToolCall(f"call_{index}", name, arguments, error=error)


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


def _groq_usage(chunk: dict[str, Any]) -> Usage | None:
    # Groq reports a stream's usage in its own field of the last chunk.
    extra = chunk.get("x_groq")
    return _usage(extra.get("usage")) if isinstance(extra, dict) else None


# --- error bodies -----------------------------------------------------------------------


def _server_error(exc: openai.APIStatusError) -> _ServerError:
    """What an error answer says, from the client's parsed body (or its raw text)."""
    body = exc.body  # the client hands over body["error"] when there is one
    if isinstance(body, dict | str):
        error = _error_object(body)
    else:
        error = _ServerError("", "", "", html=False)
    content_type = exc.response.headers.get("content-type", "")
    if error.html or _looks_like_html(content_type, ""):
        return _ServerError("", error.code, error.type, html=True)
    return error


def _error_object(raw: object) -> _ServerError:
    """Any error shape: OpenAI's object, vLLM's top-level one, Ollama's string, plain text, HTML."""
    if isinstance(raw, str):
        if _looks_like_html("", raw):
            return _ServerError("", "", "", html=True)
        try:
            # Ollama's native {"error": "text"}, or a body with an error object as text.
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            return _ServerError(" ".join(raw.split()), "", "", html=False)
        if isinstance(parsed, dict):
            return _error_object(parsed.get("error", parsed))
        return _ServerError(" ".join(raw.split()), "", "", html=False)
    if not isinstance(raw, dict):
        return _ServerError("", "", "", html=False)
    message = raw.get("message")
    if not isinstance(message, str):
        message = _detail_text(raw.get("detail"))
    metadata = raw.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("raw"), str):
        # OpenRouter wraps the upstream provider's own error here; its words
        # ("maximum context length", "does not support tools") name the cause.
        message = f"{message} ({metadata.get('provider_name') or 'upstream'}: {metadata['raw']})"
    code = raw.get("code")
    kind = raw.get("type")
    return _ServerError(
        " ".join(str(message).split()),
        str(code) if isinstance(code, str | int) else "",
        kind if isinstance(kind, str) else "",
        html=False,
    )


def _detail_text(detail: object) -> str:
    """FastAPI's ``detail``: a string, or a 422's list of ``{"loc", "msg"}`` problems."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(
            str(item.get("msg")) for item in detail if isinstance(item, dict) and "msg" in item
        )
    return ""


def _looks_like_html(content_type: str, text: str) -> bool:
    if "html" in content_type.lower():
        return True
    head = text.lstrip()[:200].lower()
    return head.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in head


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


def _shorten(text: str) -> str:
    if len(text) > MAX_SERVER_DETAIL_CHARS:
        return text[: MAX_SERVER_DETAIL_CHARS - 1] + "…"
    return text
