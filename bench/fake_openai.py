"""A fake OpenAI-compatible HTTP server, for tests and benchmarks.

A real HTTP/1.1 server on 127.0.0.1 (asyncio streams; from the engine only its
memory tool names, engine.extraction's, so the two never drift) that
runs its own event loop in a background thread, so that async tests, sync
tests and subprocesses can all talk to it over a socket, exactly as the
``openai`` client talks to a real endpoint. It speaks::

    POST /v1/chat/completions   non-streaming and streaming (SSE), tools
    POST /v1/embeddings         deterministic vectors (``hashed_embedding``)
    GET  /v1/models

Replies are deterministic ("Echo: <last user message>"). Faults are injected
on demand (``fail_next``) or at a seeded random rate (``fault_rate``). Exact
responses of real providers are replayed with ``queue_response`` (see
``canned_json``, ``canned_sse``, ``canned_text``): status, headers and body
bytes, or an SSE stream sent chunk by chunk, as the provider sent them.

Usage::

    with FakeOpenAI(token_delay=0.001) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x")
        server.fail_next("429", retry_after=0.001)

or as a process (benchmarks)::

    python -m bench.fake_openai --port 0 --latency-ms 200 --token-delay-ms 2
    # prints "READY http://127.0.0.1:PORT/v1", serves until SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http
import json
import math
import random
import re
import signal
import struct
import sys
import threading
from base64 import b64encode
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from engine.extraction import ADD, DELETE, UPDATE

FaultKind = Literal["429", "500", "cut", "malformed", "timeout", "bad_tool_args"]
FAULT_KINDS: tuple[FaultKind, ...] = ("429", "500", "cut", "malformed", "timeout", "bad_tool_args")
# Chaos runs default to faults that resolve quickly; "timeout" holds a
# connection until the client gives up, so it must be asked for explicitly.
DEFAULT_RANDOM_FAULTS: tuple[FaultKind, ...] = ("429", "500", "cut", "malformed")

CREATED = 1_700_000_000  # a fixed timestamp keeps responses byte-for-byte repeatable
MAX_ECHO_CHARS = 200
MAX_MEMORY_CHARS = 200
MAX_HEADER_LINES = 100
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    after: int = 2  # "cut": chunks sent before the connection drops
    clean: bool = False  # "cut": end the body properly instead of dropping the connection
    retry_after: float | None = None  # "429"/"500": seconds, sent as Retry-After headers


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """One HTTP response to replay byte for byte (a real provider's answer).

    With ``chunks`` the body is sent with chunked encoding, one write per
    chunk, the way a streaming server sends SSE events; otherwise ``body`` is
    sent with a Content-Length.
    """

    status: int = 200
    body: bytes = b""
    chunks: tuple[bytes, ...] | None = None
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def canned_json(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> CannedResponse:
    """``payload`` as a JSON body; a ``str`` or ``bytes`` payload is sent as is."""
    if isinstance(payload, str):
        body = payload.encode()
    elif isinstance(payload, bytes):
        body = payload
    else:
        body = json.dumps(payload).encode()
    return CannedResponse(status, body, headers=tuple((headers or {}).items()))


def canned_text(
    text: str, status: int, content_type: str = "text/plain; charset=utf-8"
) -> CannedResponse:
    """A non-JSON body: a plain-text error, a proxy's HTML page."""
    return CannedResponse(status, text.encode(), content_type=content_type)


def canned_sse(events: Iterable[Any], *, done: bool = True, status: int = 200) -> CannedResponse:
    """An SSE stream of ``events``, each its own HTTP chunk.

    A dict is sent as ``data: <json>``, a str as ``data: <str>`` (the payload
    as is, e.g. a malformed one), and bytes verbatim (comments, ``event:``
    lines, odd line endings). ``done`` appends ``data: [DONE]``.
    """
    chunks: list[bytes] = []
    for event in events:
        if isinstance(event, bytes):
            chunks.append(event)
        else:
            payload = event if isinstance(event, str) else json.dumps(event)
            chunks.append(f"data: {payload}\n\n".encode())
    if done:
        chunks.append(b"data: [DONE]\n\n")
    return CannedResponse(status, chunks=tuple(chunks), content_type="text/event-stream")


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class _BadRequest(Exception):
    pass


@dataclass(slots=True)
class _State:
    """Everything shared between the test thread and the server thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    tool_call_queue: deque[list[dict[str, Any]]] = field(default_factory=deque)
    canned: deque[CannedResponse] = field(default_factory=deque)
    fault_rate: float = 0.0
    fault_kinds: tuple[FaultKind, ...] = DEFAULT_RANDOM_FAULTS
    embedding_requests: list[dict[str, Any]] = field(default_factory=list)
    embedding_faults: deque[Literal["500", "timeout"]] = field(default_factory=deque)
    connections: int = 0  # open now
    accepted: int = 0  # ever

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


class FakeOpenAI:
    """See the module docstring. Knobs are in seconds."""

    def __init__(
        self,
        first_token_latency: float = 0.0,
        token_delay: float = 0.0,
        reply_tokens: int | None = None,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reject_stream_options: bool = False,
    ) -> None:
        if first_token_latency < 0 or token_delay < 0:
            raise ValueError("latencies must not be negative")
        if reply_tokens is not None and reply_tokens < 1:
            raise ValueError("reply_tokens must be at least 1")
        self.first_token_latency = first_token_latency
        self.token_delay = token_delay
        self.reply_tokens = reply_tokens
        # Models a compatible server that predates stream_options.
        self.reject_stream_options = reject_stream_options
        self._host = host
        self._requested_port = port
        self._random = random.Random(seed)
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._port: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already started")
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError(f"fake OpenAI server failed to start: {self._startup_error}")
        return self

    def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be gone
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    # --- controls (any thread) ------------------------------------------------------

    def fail_next(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        after: int = 2,
        retry_after: float | None = None,
        clean: bool = False,
    ) -> None:
        """Make the next ``count`` chat requests fail with ``kind``.

        ``retry_after`` (seconds) is sent as ``Retry-After`` and
        ``retry-after-ms``; for "429" it defaults to 1 s. ``after`` is the
        number of SSE chunks a "cut" stream delivers before the connection
        drops; with ``clean`` the body ends properly instead, but early (no
        finish_reason, no ``[DONE]``), as from a proxy that gave up politely.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if kind == "429" and retry_after is None:
            retry_after = 1.0
        with self._state.lock:
            self._state.faults.extend(
                Fault(kind, after=after, retry_after=retry_after, clean=clean) for _ in range(count)
            )

    def fault_rate(self, rate: float, kinds: Sequence[FaultKind] = DEFAULT_RANDOM_FAULTS) -> None:
        """Fail each chat request with probability ``rate`` (seeded, so runs repeat)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
        with self._state.lock:
            self._state.fault_rate = rate
            self._state.fault_kinds = tuple(kinds)

    def queue_tool_calls(self, calls: Iterable[dict[str, Any]]) -> None:
        """The next request that offers tools answers with these calls.

        Each call is ``{"name": ..., "arguments": dict | str}``; a string is
        sent as is, which is how to send arguments that are not a JSON object.
        """
        with self._state.lock:
            self._state.tool_call_queue.append([dict(call) for call in calls])

    def queue_response(self, *responses: CannedResponse) -> None:
        """The next chat requests get these responses, in order, instead of a reply.

        They come before faults and queued tool calls (which stay queued), and
        each request is still recorded; once they are used up the server
        answers as usual again.
        """
        with self._state.lock:
            self._state.canned.extend(responses)

    def reset(self) -> None:
        """Forget recorded requests, pending faults, fault rate, queued tool calls
        and queued responses."""
        with self._state.lock:
            self._state.requests.clear()
            self._state.faults.clear()
            self._state.tool_call_queue.clear()
            self._state.canned.clear()
            self._state.fault_rate = 0.0

    @property
    def requests(self) -> list[dict[str, Any]]:
        """JSON bodies of the chat requests received so far (a snapshot)."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def request_count(self) -> int:
        with self._state.lock:
            return len(self._state.requests)

    @property
    def open_connections(self) -> int:
        with self._state.lock:
            return self._state.connections

    @property
    def accepted_connections(self) -> int:
        """Connections accepted since start: tells keep-alive reuse from reconnects."""
        with self._state.lock:
            return self._state.accepted

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` chat requests arrived; False on timeout."""
        with self._state.changed:
            return self._state.changed.wait_for(
                lambda: len(self._state.requests) >= count, timeout=timeout
            )

    def fail_next_embeddings(self, kind: Literal["500", "timeout"], count: int = 1) -> None:
        """Make the next ``count`` embeddings requests answer 500, or never answer."""
        with self._state.lock:
            self._state.embedding_faults.extend([kind] * count)

    @property
    def embedding_requests(self) -> list[dict[str, Any]]:
        """JSON bodies of the embeddings requests received so far (a snapshot)."""
        with self._state.lock:
            return list(self._state.embedding_requests)

    # --- server thread --------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(
                self._on_connection, self._host, self._requested_port, backlog=4096
            )
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._state.lock:
            self._state.connections += 1
            self._state.accepted += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                keep_open = await self._respond(request, reader, writer)
                if not keep_open or not request.keep_alive:
                    break
        except (_BadRequest, asyncio.LimitOverrunError, ValueError):
            with contextlib.suppress(ConnectionError):
                await _send_json(writer, 400, _error_body("bad request", "invalid_request_error"))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # stop() cancels open connections. Ending the task normally keeps
            # Python 3.11's start_server from logging every one as an error.
            writer.transport.abort()
        finally:
            with self._state.lock:
                self._state.connections -= 1
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _respond(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must be closed afterwards."""
        path = request.path.removeprefix("/v1")
        if request.method == "GET" and path == "/models":
            await _send_json(writer, 200, _models_body())
            return True
        if path == "/embeddings" and request.method == "POST":
            return await self._answer_embeddings(request, reader, writer)
        if path != "/chat/completions":
            await _send_json(writer, 404, _error_body(f"no route {request.path}", "not_found"))
            return True
        if request.method != "POST":
            await _send_json(writer, 405, _error_body("use POST", "invalid_request_error"))
            return True
        try:
            body = json.loads(request.body)
        except ValueError:
            await _send_json(writer, 400, _error_body("body is not JSON", "invalid_request_error"))
            return True
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await _send_json(writer, 400, _error_body("messages missing", "invalid_request_error"))
            return True
        canned = self._record_canned(body)
        if canned is not None:
            await _send_canned(writer, canned)
            return True
        number, fault, queued_calls = self._record(body)
        if self.reject_stream_options and "stream_options" in body:
            message = "Unrecognized request argument supplied: stream_options"
            await _send_json(writer, 400, _error_body(message, "invalid_request_error"))
            return True
        return await self._answer_chat(number, body, fault, queued_calls, reader, writer)

    async def _answer_embeddings(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            message = "input must be a string or a non-empty list of strings"
            await _send_json(writer, 400, _error_body(message, "invalid_request_error"))
            return True
        with self._state.changed:
            self._state.embedding_requests.append(body)
            fault = self._state.embedding_faults.popleft() if self._state.embedding_faults else None
            self._state.changed.notify_all()
        if fault == "500":
            await _send_json(writer, 500, _error_body("fake 500", "server_error"))
            return True
        if fault == "timeout":
            while await reader.read(65536):
                pass
            return False
        base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = hashed_embedding(text)
            encoded: Any = vector
            if base64:
                encoded = b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(_WORD.findall(text)) for text in texts)
        answer = {
            "object": "list",
            "data": data,
            "model": str(body.get("model", "fake-embedding")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await _send_json(writer, 200, answer)
        return True

    def _record_canned(self, body: dict[str, Any]) -> CannedResponse | None:
        """Record the request and take the next canned response, if one is queued."""
        with self._state.changed:
            if not self._state.canned:
                return None
            self._state.requests.append(body)
            self._state.changed.notify_all()
            return self._state.canned.popleft()

    def _record(
        self, body: dict[str, Any]
    ) -> tuple[int, Fault | None, list[dict[str, Any]] | None]:
        with self._state.changed:
            self._state.requests.append(body)
            number = len(self._state.requests)
            # A capability probe (memchat's extraction "auto", doctor: a forced
            # tool call, or tools without the memory tools) is answered as a
            # tool-calling model would, leaving injected faults and queued
            # calls for the requests under test.
            forced = _forced_tool(body) is not None or _is_probe(body)
            fault = self._state.faults.popleft() if self._state.faults and not forced else None
            rate = 0.0 if forced else self._state.fault_rate
            if fault is None and rate > 0 and self._random.random() < rate:
                kind = self._random.choice(self._state.fault_kinds)
                fault = Fault(kind, after=1 + self._random.randrange(4), retry_after=0.001)
            queued = None
            if body.get("tools") and self._state.tool_call_queue and fault is None and not forced:
                queued = self._state.tool_call_queue.popleft()
            self._state.changed.notify_all()
        return number, fault, queued

    async def _answer_chat(
        self,
        number: int,
        body: dict[str, Any],
        fault: Fault | None,
        queued_calls: list[dict[str, Any]] | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        stream = bool(body.get("stream"))
        if fault is not None and fault.kind in ("429", "500"):
            status = int(fault.kind)
            headers = _retry_after_headers(fault.retry_after)
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            await _send_json(writer, status, _error_body(f"fake {status}", kind), headers)
            return True
        if fault is not None and fault.kind == "timeout":
            # Say nothing until the client gives up and closes the connection.
            while await reader.read(65536):
                pass
            return False
        reply = _Reply.for_request(number, body, self.reply_tokens, fault, queued_calls)
        if stream:
            return await self._stream_reply(reply, body, fault, writer)
        # A real server needs the whole generation time before a non-streaming answer.
        await asyncio.sleep(self.first_token_latency + self.token_delay * max(0, reply.steps - 1))
        if fault is not None and fault.kind == "malformed":
            await _send_raw(
                writer, 200, b'{"id": "chatcmpl-broken", "choices": [', "application/json"
            )
            return True
        payload = json.dumps(reply.completion()).encode()
        if fault is not None and fault.kind == "cut":
            head = _head(200, "application/json", {"Content-Length": str(len(payload))})
            writer.write(head + payload[: len(payload) // 2])
            await writer.drain()
            return False
        await _send_raw(writer, 200, payload, "application/json")
        return True

    async def _stream_reply(
        self, reply: _Reply, body: dict[str, Any], fault: Fault | None, writer: asyncio.StreamWriter
    ) -> bool:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = reply.chunks(include_usage)
        if fault is not None and fault.kind == "malformed":
            events[0] = "{not json"
        cut = fault is not None and fault.kind == "cut"
        drop_connection = cut and fault is not None and not fault.clean
        if cut and fault is not None:
            events = events[: fault.after]
        loop = asyncio.get_running_loop()
        first_due = loop.time() + self.first_token_latency
        # Chunk i is due at first_due + i * token_delay. Every chunk that is due
        # goes out in one write: one send per chunk costs far more CPU than
        # anything else here, and under load a server that falls behind
        # catches up in bursts, like a real one, instead of falling further behind.
        batch = bytearray(_head(200, "text/event-stream", {"Transfer-Encoding": "chunked"}))
        for index, event in enumerate(events):
            delay = first_due + index * self.token_delay - loop.time()
            if delay > 0:
                if batch:
                    writer.write(batch)
                    batch.clear()
                    await writer.drain()
                await asyncio.sleep(delay)
            batch += _chunk(f"data: {event}\n\n".encode())
        if drop_connection:
            writer.write(batch)
            await writer.drain()
            writer.transport.abort()  # no terminating chunk: the body is incomplete
            return False
        if not cut:
            batch += _chunk(b"data: [DONE]\n\n")
        writer.write(batch + b"0\r\n\r\n")
        await writer.drain()
        return True


# --- replies ----------------------------------------------------------------------


@dataclass(slots=True)
class _Reply:
    """What to answer to one chat request: text tokens or tool calls."""

    completion_id: str
    model: str
    tokens: list[str]
    tool_calls: list[dict[str, Any]]
    prompt_tokens: int

    @classmethod
    def for_request(
        cls,
        number: int,
        body: dict[str, Any],
        reply_tokens: int | None,
        fault: Fault | None,
        queued_calls: list[dict[str, Any]] | None,
    ) -> _Reply:
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        last_user = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
        model = str(body.get("model") or "fake-model")
        completion_id = f"chatcmpl-fake-{number}"
        if fault is not None and fault.kind == "bad_tool_args":
            calls: list[dict[str, Any]] = [
                {"name": _first_tool_name(body), "arguments": '{"memory": "unterminated'}
            ]
            return cls(completion_id, model, [], _tool_calls(calls), prompt_tokens)
        if (forced := _forced_tool(body)) is not None:
            calls = [{"name": forced, "arguments": {"ok": True}}]
            return cls(completion_id, model, [], _tool_calls(calls), prompt_tokens)
        if queued_calls is not None:
            return cls(completion_id, model, [], _tool_calls(queued_calls), prompt_tokens)
        if _is_probe(body):
            # Any tool but the memory ones (a capability probe): a tool-calling model calls it.
            calls = [{"name": _first_tool_name(body), "arguments": {"ok": True}}]
            return cls(completion_id, model, [], _tool_calls(calls), prompt_tokens)
        if body.get("tools") and messages and messages[-1].get("role") == "tool":
            # The tool results of its own calls came back (an agent framework's
            # loop; memchat applies calls without replying): done, as a real
            # model says, rather than calling again forever.
            return cls(completion_id, model, ["Done."], [], prompt_tokens)
        if body.get("tools"):
            # One memory per turn: the user's message itself, naming its turn
            # when the request holds several (memchat's coalesced extraction).
            calls = []
            for label, text in _turn_messages(last_user):
                arguments: dict[str, Any] = {
                    "memory": text[:MAX_MEMORY_CHARS].strip() or "(empty)",
                    "topics": ["general"],
                }
                if label is not None:
                    arguments["turn"] = label
                calls.append({"name": ADD, "arguments": arguments})
            return cls(completion_id, model, [], _tool_calls(calls), prompt_tokens)
        return cls(completion_id, model, echo_tokens(last_user, reply_tokens), [], prompt_tokens)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def steps(self) -> int:
        return len(self.tokens) if self.tokens else 1

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def usage(self) -> dict[str, int]:
        completion_tokens = len(self.tokens) or sum(
            len(call["function"]["arguments"].split()) for call in self.tool_calls
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }

    def chunks(self, include_usage: bool) -> list[str]:
        """SSE data payloads, in order, without the final ``[DONE]``."""
        deltas: list[dict[str, Any]] = []
        if self.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(self.tool_calls)]
            deltas.append({"role": "assistant", "content": None, "tool_calls": calls})
        for index, token in enumerate(self.tokens):
            deltas.append(
                {"role": "assistant", "content": token} if index == 0 else {"content": token}
            )
        if not deltas:
            deltas.append({"role": "assistant", "content": ""})
        usage_field = {"usage": None} if include_usage else {}
        payloads = [self._chunk([_choice(delta, None)], usage_field) for delta in deltas]
        payloads.append(self._chunk([_choice({}, self.finish_reason)], usage_field))
        if include_usage:
            payloads.append(self._chunk([], {"usage": self.usage()}))
        return payloads

    def _chunk(self, choices: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        chunk = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return json.dumps(chunk)


def echo_tokens(text: str, reply_tokens: int | None) -> list[str]:
    """The default reply, as stream tokens: "Echo: <text>" word by word.

    With ``reply_tokens`` the reply has exactly that many tokens: the echo is
    cut, or padded with "tokN" words, so benchmarks control the length while
    replies still show which request they answer.
    """
    words = ["Echo:", *" ".join(text.split())[:MAX_ECHO_CHARS].split()]
    if reply_tokens is not None:
        words = (words + [f"tok{i}" for i in range(len(words), reply_tokens)])[:reply_tokens]
    return [word + (" " if index < len(words) - 1 else "") for index, word in enumerate(words)]


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _tool_calls(calls: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    result = []
    for number, call in enumerate(calls, start=1):
        arguments = call.get("arguments", {})
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
        result.append(
            {
                "id": call.get("id", f"call_{number}"),
                "type": "function",
                "function": {"name": call["name"], "arguments": raw},
            }
        )
    return result


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The function a request's ``tool_choice`` names, if it names one."""
    choice = body.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and body.get("tools") else None


def _is_probe(body: dict[str, Any]) -> bool:
    """Tools, but not the memory ones (the engine's names): a capability probe."""
    return bool(body.get("tools")) and _first_tool_name(body) not in (ADD, UPDATE, DELETE)


def _first_tool_name(body: dict[str, Any]) -> str:
    for tool in body.get("tools") or ():
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if isinstance(name, str):
            return name
    return ADD


_TURN_BLOCK = re.compile(r'<turn id="(t[0-9]+)">(.*?)(?:</turn>|\Z)', re.DOTALL)


def _turn_messages(text: str) -> list[tuple[str | None, str]]:
    """(turn id, user message) of each ``<turn>`` block, or (None, the one message)."""
    turns = [(label, _user_message_block(body)) for label, body in _TURN_BLOCK.findall(text)]
    return turns or [(None, _user_message_block(text))]


def _user_message_block(text: str) -> str:
    start = text.find("<user_message>")
    if start < 0:
        return text.strip()
    start += len("<user_message>")
    end = text.find("</user_message>", start)
    return (text[start:] if end < 0 else text[start:end]).strip()


EMBEDDING_DIMS = 256
EMBEDDING_BUCKETS = 4
STEM_CHARS = 5
_WORD = re.compile(r"\w+")


def hashed_embedding(text: str) -> list[float]:
    """A deterministic unit vector: a hashed bag of word stems.

    Each word's first STEM_CHARS letters (lower-cased; a crude stem, so
    "iguanas" and "iguana" are the same where 'simple' full text sees two words)
    add a signed 1 to EMBEDDING_BUCKETS of EMBEDDING_DIMS places picked by their
    hash: texts sharing words are near, others nearly orthogonal (a chance
    collision shares one place in four, not a whole word). A text without words
    gets the last place alone, which no word uses.
    """
    vector = [0.0] * EMBEDDING_DIMS
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word[:STEM_CHARS].encode(), digest_size=16).digest()
        for bucket in range(EMBEDDING_BUCKETS):
            place = int.from_bytes(digest[bucket * 3 : bucket * 3 + 2], "little")
            sign = 1.0 if digest[bucket * 3 + 2] & 1 else -1.0
            vector[place % (EMBEDDING_DIMS - 1)] += sign
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0:
        vector[-1] = 1.0
        return vector
    return [v / norm for v in vector]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _models_body() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": "fake-model", "object": "model", "created": CREATED, "owned_by": "fake"}],
    }


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _retry_after_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    # The openai client prefers retry-after-ms, which allows sub-second waits.
    return {
        "Retry-After": str(math.ceil(retry_after)),
        "retry-after-ms": str(round(retry_after * 1000)),
    }


# --- HTTP/1.1 wire ------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on a connection, or None when the client closed it."""
    line = await reader.readline()
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between requests
        line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest(line)
    method, target, version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise _BadRequest(raw)
        headers[name.strip().lower()] = value.strip()
    else:
        raise _BadRequest("too many headers")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        length = int(headers.get("content-length", "0") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _BadRequest("bad content-length")
        body = await reader.readexactly(length) if length else b""
    return _Request(method, target, version, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > MAX_BODY_BYTES:
            raise _BadRequest("body too large")


def _head(status: int, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:  # a provider's own status (Cloudflare's 520-530, ...)
        phrase = "Unknown"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        "Connection: keep-alive",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _send_raw(
    writer: asyncio.StreamWriter,
    status: int,
    payload: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> None:
    all_headers = {"Content-Length": str(len(payload)), **(headers or {})}
    writer.write(_head(status, content_type, all_headers) + payload)
    await writer.drain()


async def _send_canned(writer: asyncio.StreamWriter, canned: CannedResponse) -> None:
    headers = dict(canned.headers)
    if canned.chunks is None:
        await _send_raw(writer, canned.status, canned.body, canned.content_type, headers)
        return
    headers["Transfer-Encoding"] = "chunked"
    writer.write(_head(canned.status, canned.content_type, headers))
    for piece in canned.chunks:
        if piece:  # an empty chunk would end the body
            writer.write(_chunk(piece))
            await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    await _send_raw(writer, status, json.dumps(body).encode(), "application/json", headers)


# --- command line -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake_openai", description="Fake OpenAI-compatible server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="before the first token")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="between tokens")
    parser.add_argument("--reply-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument(
        "--fault-kinds",
        default=",".join(DEFAULT_RANDOM_FAULTS),
        help=f"comma-separated subset of {','.join(FAULT_KINDS)}",
    )
    args = parser.parse_args(argv)
    server = FakeOpenAI(
        first_token_latency=args.latency_ms / 1000,
        token_delay=args.token_delay_ms / 1000,
        reply_tokens=args.reply_tokens,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    if args.fault_rate:
        kinds = [kind.strip() for kind in args.fault_kinds.split(",") if kind.strip()]
        server.fault_rate(args.fault_rate, kinds)
    # Block the signals before the server thread starts so that only the main
    # thread receives them, in sigwait below.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server.start()
    print(f"READY {server.base_url}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    print(f"STOPPED after {server.request_count} chat requests", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
