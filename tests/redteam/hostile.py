"""A hostile OpenAI-compatible endpoint for red-team tests (real HTTP on 127.0.0.1).

``HostileServer(behaviour)``: ``behaviour`` maps a request kind (``stream``,
``probe_forced``, ``probe``, ``tools``, ``json``, ``models``) to an action;
``default`` applies to the rest. Actions: ``"ok"``, ``"echo_auth_400"``,
``"slowloris"`` (headers, then a byte every ``interval`` seconds, forever),
``("tools", calls)``, ``("json", body)``. Every request is recorded
(``requests``: kind, headers, body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any


def _resp(status: str, body: Any, ctype: str = "application/json") -> bytes:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(raw)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + raw


def _completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "x",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    event = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


PROBE_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "memchat_probe", "arguments": '{"ok": true}'},
}


class HostileServer:
    def __init__(self, behaviour: dict[str, Any] | None = None, interval: float = 0.5) -> None:
        self.behaviour = behaviour or {}
        self.interval = interval
        self.requests: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    key, value = line.split(":", 1)
                    headers[key.strip().lower()] = value.strip()
            size = int(headers.get("content-length", "0"))
            body = await reader.readexactly(size) if size else b""
            try:
                req = json.loads(body) if body else {}
            except ValueError:
                req = {}
            tools = [t["function"]["name"] for t in req.get("tools", [])]
            if lines[0].startswith("GET"):
                kind = "models"
            elif req.get("stream"):
                kind = "stream"
            elif "memchat_probe" in tools:
                kind = "probe_forced" if "tool_choice" in req else "probe"
            elif tools:
                kind = "tools"
            else:
                kind = "json"
            self.requests.append({"kind": kind, "headers": headers, "body": req})
            action = self.behaviour.get(kind, self.behaviour.get("default", "ok"))
            await self._act(action, kind, headers, writer)
        except Exception:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _act(
        self, action: Any, kind: str, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> None:
        auth = headers.get("authorization", "")
        if isinstance(action, tuple) and action[0] == "tools":
            writer.write(
                _resp(
                    "200 OK", _completion({"content": None, "tool_calls": action[1]}, "tool_calls")
                )
            )
        elif isinstance(action, tuple) and action[0] == "json":
            writer.write(_resp("200 OK", action[1]))
        elif action == "ok":
            if kind == "stream":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Connection: close\r\n\r\n"
                    + _chunk("Hello there.")
                    + _chunk(None, "stop")
                    + b"data: [DONE]\n\n"
                )
            elif kind in ("probe", "probe_forced"):
                writer.write(
                    _resp("200 OK", _completion({"content": None, "tool_calls": [PROBE_CALL]}))
                )
            elif kind == "models":
                writer.write(_resp("200 OK", {"object": "list", "data": [{"id": "x"}]}))
            else:
                writer.write(_resp("200 OK", _completion({"content": "{}"})))
        elif action == "echo_auth_400":
            key = auth.split()[-1] if auth else ""
            bare = key[3:] if key.startswith("sk-") else key
            message = f"bad request from {auth}; key without its prefix: {bare}"
            writer.write(_resp("400 Bad Request", {"error": {"message": message}}))
        elif action == "slowloris":
            if kind == "stream":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Connection: close\r\n\r\n"
                )
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000000\r\nConnection: close\r\n\r\n"
                )
            await writer.drain()
            while True:
                await asyncio.sleep(self.interval)
                # An SSE comment (stream) or JSON whitespace (a body): valid, endless.
                writer.write(b": keep-alive\n\n" if kind == "stream" else b" ")
                await writer.drain()
        await writer.drain()
