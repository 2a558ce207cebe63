"""Capture raw answers of the real model, as documentation of real shapes.

    .venv/bin/python -m tests.real_model.capture

starts both llama.cpp servers (``chatml-function-calling`` and the model's
default chat format) and saves, per server, under ``tests/real_model/captured/``:

* ``<server>-chat-stream.json``: a streamed chat reply, every SSE ``data:`` payload;
* ``<server>-tools-called.json``: memchat's extraction request with its tools,
  answered with a tool call (``tool_choice`` forced when the model would not call);
* ``<server>-tools-not-called.json``: the same tools, a turn with nothing to
  remember, answered with text and no call;
* ``<server>-json-object.json``: memchat's JSON extraction request, with
  ``response_format`` ``json_object``;
* ``<server>-probe-forced.json``: memchat's probe of tool calls (a forced call of
  a dummy tool), which ``memory.extraction = "auto"`` and the doctor send;
* ``<server>-over-context.json`` and ``-over-context-stream.json``: a prompt
  over the 4,096-token window, not streamed (HTTP 400) and streamed.

Each file holds the request, the HTTP status, the answer and the seconds it took.
The prompts are memchat's own (engine.memory) where they exist.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.real_model.harness import (
    CAPTURED,
    MODEL_ALIAS,
    LlamaServer,
    NotAvailable,
    prepare,
)

FACT_TURN = (
    "My name is Alice and I like kites.",
    "Nice to meet you, Alice! Kites are great fun on a windy day.",
)
SMALL_TALK_TURN = ("What time is it?", "I cannot see a clock, sorry.")


def _json_system() -> str:
    from engine.memory import JSON_SYSTEM_PROMPT

    return JSON_SYSTEM_PROMPT


def _probe() -> dict[str, Any]:
    """memchat's probe of an endpoint's tool calls (memory.extraction = auto, doctor)."""
    from engine.memory import PROBE_PROMPT, PROBE_TOOL

    return {
        "messages": [{"role": m.role, "content": m.content} for m in PROBE_PROMPT],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": PROBE_TOOL.name,
                    "description": PROBE_TOOL.description,
                    "parameters": PROBE_TOOL.parameters,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": PROBE_TOOL.name}},
    }


def _extraction_messages(turn: tuple[str, str]) -> tuple[list[dict[str, str]], list[Any]]:
    """memchat's extraction prompt and tools for one turn (no memories yet)."""
    from engine.memory import MEMORY_TOOLS, SYSTEM_PROMPT
    from engine.models.prompt_blocks import render_extraction_request

    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": render_extraction_request([], *turn)},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in MEMORY_TOOLS
    ]
    return messages, tools


def _post(url: str, body: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status = response.status
            raw = response.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode(errors="replace")
    except http.client.IncompleteRead as exc:
        # The body was cut off (a server that failed mid-stream): keep what came.
        status, raw = 200, exc.partial.decode(errors="replace")
    elapsed = round(time.perf_counter() - started, 3)
    if stream and status == 200:
        events: list[Any] = []
        for line in raw.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data.startswith("[DONE]") else json.loads(data))
        answer: Any = events
    else:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = raw
    return {"request": body, "status": status, "elapsed_s": elapsed, "response": answer}


def _calls(captured: dict[str, Any]) -> list[Any]:
    try:
        return captured["response"]["choices"][0]["message"].get("tool_calls") or []
    except (KeyError, IndexError, TypeError, AttributeError):
        return []


def capture(server: LlamaServer, out: Path) -> list[Path]:
    url = f"{server.base_url}/chat/completions"
    written: list[Path] = []

    def save(kind: str, data: dict[str, Any]) -> None:
        path = out / f"{server.name}-{kind}.json"
        data = {"server": f"llama_cpp.server --chat_format {server.name}", **data}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        written.append(path)

    save(
        "chat-stream",
        _post(
            url,
            {
                "model": MODEL_ALIAS,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 48,
                "messages": [
                    {"role": "system", "content": "You are a friendly and concise assistant."},
                    {"role": "user", "content": FACT_TURN[0]},
                ],
            },
            stream=True,
        ),
    )

    messages, tools = _extraction_messages(FACT_TURN)
    body = {"model": MODEL_ALIAS, "max_tokens": 256, "messages": messages, "tools": tools}
    called = _post(url, body)
    if not _calls(called):
        # Record what the unforced request gave, then force the tool.
        called["note"] = "tool_choice unset: the model answered without a call"
        save("tools-auto-fact", called)
        forced = {**body, "tool_choice": {"type": "function", "function": {"name": "add_memory"}}}
        called = _post(url, forced)
    save("tools-called", called)

    messages, tools = _extraction_messages(SMALL_TALK_TURN)
    body = {"model": MODEL_ALIAS, "max_tokens": 256, "messages": messages, "tools": tools}
    not_called = _post(url, body)
    if _calls(not_called):
        not_called["note"] = "the model called a tool even for small talk"
    save("tools-not-called", not_called)

    save(
        "json-object",
        _post(
            url,
            {
                "model": MODEL_ALIAS,
                "max_tokens": 256,
                "response_format": {"type": "json_object"},
                "messages": [
                    {"role": "system", "content": _json_system()},
                    {"role": "user", "content": render_turn(FACT_TURN)},
                ],
            },
        ),
    )
    save("probe-forced", _post(url, {"model": MODEL_ALIAS, "max_tokens": 64, **_probe()}))

    # Over the window: 8,500 characters of digits, about 2,800 tokens by memchat's
    # estimate (3 characters a token), about 8,500 for SmolLM2's tokenizer.
    over = {
        "model": MODEL_ALIAS,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": digits()}],
    }
    save("over-context", _post(url, over))
    streamed = {**over, "stream": True, "stream_options": {"include_usage": True}}
    save("over-context-stream", _post(url, streamed, stream=True))
    return written


def digits(count: int = 1700) -> str:
    """Digit groups: one token per digit for SmolLM2, a third of that by memchat's estimate."""
    return " ".join(str(1000 + (i * 7919) % 9000) for i in range(count))


def render_turn(turn: tuple[str, str]) -> str:
    from engine.models.prompt_blocks import render_extraction_request

    return render_extraction_request([], *turn)


def main() -> int:
    try:
        python, model = prepare(quiet=False)
    except NotAvailable as exc:
        print(f"real-model: not available: {exc}", file=sys.stderr)
        return 1
    CAPTURED.mkdir(exist_ok=True)
    for chat_format in ("chatml-function-calling", None):
        with LlamaServer(python, model, chat_format) as server:
            for path in capture(server, CAPTURED):
                print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
