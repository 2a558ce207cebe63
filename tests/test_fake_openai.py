"""The fake OpenAI-compatible server: wire shapes, keep-alive, faults, CLI mode."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from bench.fake_openai import (
    CannedResponse,
    FakeOpenAI,
    canned_json,
    canned_sse,
    canned_text,
    echo_tokens,
)

ROOT = Path(__file__).resolve().parent.parent
STREAMS = 200
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hello there world"}]}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def http(server: FakeOpenAI) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.base_url, timeout=5.0) as client:
        yield client


def sse_payloads(response: httpx2.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def stream_chat(http: httpx2.Client, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_payloads(response)


def test_non_streaming_completion_shape(http: httpx2.Client) -> None:
    response = http.post("/chat/completions", json=HELLO)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there world"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_streaming_chunks_assemble_to_the_non_streaming_text(http: httpx2.Client) -> None:
    payloads = stream_chat(http, {**HELLO, "stream_options": {"include_usage": True}})

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([d for d in deltas if d]) == 4  # one chunk per token
    assert "".join(d for d in deltas if d) == "Echo: hello there world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_streaming_sends_no_usage_chunk_unless_asked(http: httpx2.Client) -> None:
    chunks = [json.loads(p) for p in stream_chat(http, HELLO)[:-1]]

    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


def test_reply_tokens_sets_the_reply_length() -> None:
    assert echo_tokens("a b", 6) == ["Echo: ", "a ", "b ", "tok3 ", "tok4 ", "tok5"]
    assert echo_tokens("a b c d", 2) == ["Echo: ", "a"]
    with FakeOpenAI(reply_tokens=32) as server, httpx2.Client(base_url=server.base_url) as http:
        content = http.post("/chat/completions", json=HELLO).json()["choices"][0]["message"]
    assert len(content["content"].split()) == 32


def test_latency_knobs_delay_the_first_token_and_space_the_rest() -> None:
    latency, delay, tokens = 0.15, 0.02, 5
    with (
        FakeOpenAI(first_token_latency=latency, token_delay=delay, reply_tokens=tokens) as server,
        httpx2.Client(base_url=server.base_url, timeout=5) as http,
    ):
        started = time.perf_counter()
        with http.stream("POST", "/chat/completions", json={**HELLO, "stream": True}) as response:
            arrivals = [
                time.perf_counter() - started
                for line in response.iter_lines()
                if line.startswith("data: {")
            ]
        started = time.perf_counter()
        http.post("/chat/completions", json=HELLO)
        whole = time.perf_counter() - started

    # Lower bounds only: a loaded machine may be slower, never faster.
    assert len(arrivals) == tokens + 1  # the tokens, then the finish chunk
    assert arrivals[0] >= latency
    assert arrivals[-1] >= latency + delay * tokens
    assert whole >= latency + delay * (tokens - 1)


def test_models_endpoint_and_unknown_routes(http: httpx2.Client) -> None:
    models = http.get("/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "fake-model"
    assert http.get("/nowhere").status_code == 404
    assert http.post("/chat/completions", content=b"{nope").status_code == 400


def test_keep_alive_reuses_one_connection(server: FakeOpenAI, http: httpx2.Client) -> None:
    for _ in range(5):
        assert http.post("/chat/completions", json=HELLO).status_code == 200
        stream_chat(http, HELLO)

    assert server.request_count == 10
    assert server.accepted_connections == 1


def test_records_request_bodies(server: FakeOpenAI, http: httpx2.Client) -> None:
    http.post("/chat/completions", json={**HELLO, "temperature": 0.5})

    assert server.wait_for_requests(1, timeout=1)
    assert server.requests == [{**HELLO, "temperature": 0.5}]
    assert not server.wait_for_requests(2, timeout=0.01)


def test_429_carries_retry_after(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("429", retry_after=2.5)

    response = http.post("/chat/completions", json=HELLO)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["retry-after-ms"] == "2500"
    assert response.json()["error"]["type"] == "rate_limit_exceeded"
    assert http.post("/chat/completions", json=HELLO).status_code == 200


def test_500_then_recovers(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("500", count=2)

    statuses = [http.post("/chat/completions", json=HELLO).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


def test_cut_stream_drops_the_connection_after_n_chunks(
    server: FakeOpenAI, http: httpx2.Client
) -> None:
    server.fail_next("cut", after=2)
    received: list[str] = []

    with (
        pytest.raises(httpx2.RemoteProtocolError),
        http.stream("POST", "/chat/completions", json={**HELLO, "stream": True}) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(line)
    assert len(received) == 2


def test_clean_cut_ends_the_stream_early(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("cut", after=2, clean=True)

    payloads = stream_chat(http, HELLO)

    assert len(payloads) == 2
    assert "[DONE]" not in payloads
    assert all(json.loads(p)["choices"][0]["finish_reason"] is None for p in payloads)
    assert http.post("/chat/completions", json=HELLO).status_code == 200  # still usable


def test_cut_non_streaming_body(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("cut")

    with pytest.raises(httpx2.RemoteProtocolError):
        http.post("/chat/completions", json=HELLO)


def test_malformed_json_body(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("malformed")

    response = http.post("/chat/completions", json=HELLO)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_malformed_sse_data(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("malformed")

    payloads = stream_chat(http, HELLO)
    with pytest.raises(ValueError):
        json.loads(payloads[0])


def test_timeout_never_answers(server: FakeOpenAI) -> None:
    server.fail_next("timeout")

    with (
        httpx2.Client(base_url=server.base_url, timeout=0.3) as http,
        pytest.raises(httpx2.ReadTimeout),
    ):
        http.post("/chat/completions", json=HELLO)
    with httpx2.Client(base_url=server.base_url, timeout=5) as http:
        assert http.post("/chat/completions", json=HELLO).status_code == 200


def test_bad_tool_args(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.fail_next("bad_tool_args")
    tools = [{"type": "function", "function": {"name": "add_memory", "parameters": {}}}]

    body = http.post("/chat/completions", json={**HELLO, "tools": tools}).json()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "add_memory"
    with pytest.raises(ValueError):
        json.loads(call["function"]["arguments"])


def test_queued_tool_calls_then_the_default_add_memory(
    server: FakeOpenAI, http: httpx2.Client
) -> None:
    tools = [{"type": "function", "function": {"name": "update_memory", "parameters": {}}}]
    server.queue_tool_calls(
        [
            {"name": "update_memory", "arguments": {"id": "m1", "memory": "Name is Marcus"}},
            {"name": "delete_memory", "arguments": '["not", "an", "object"]'},
        ]
    )
    content = "Remember this.\n<user_message>\nI like tea.\n</user_message>\n"
    request = {"model": "m", "tools": tools, "messages": [{"role": "user", "content": content}]}

    # A request without tools does not consume the queue.
    assert "tool_calls" not in http.post("/chat/completions", json=HELLO).json()["choices"][0]
    first = http.post("/chat/completions", json=request).json()["choices"][0]
    second = http.post("/chat/completions", json=request).json()["choices"][0]

    assert first["finish_reason"] == "tool_calls"
    calls = first["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert json.loads(calls[0]["function"]["arguments"])["memory"] == "Name is Marcus"
    assert calls[1]["function"]["arguments"] == '["not", "an", "object"]'
    [default] = second["message"]["tool_calls"]
    assert default["function"]["name"] == "add_memory"
    assert json.loads(default["function"]["arguments"]) == {
        "memory": "I like tea.",
        "topics": ["general"],
    }


def test_rejecting_stream_options() -> None:
    with (
        FakeOpenAI(reject_stream_options=True) as server,
        httpx2.Client(base_url=server.base_url) as http,
    ):
        body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
        response = http.post("/chat/completions", json=body)
        assert response.status_code == 400
        assert "stream_options" in response.json()["error"]["message"]
        assert stream_chat(http, HELLO)[-1] == "[DONE]"


def outcomes_with_fault_rate(seed: int) -> list[int]:
    with FakeOpenAI(seed=seed) as server, httpx2.Client(base_url=server.base_url) as http:
        server.fault_rate(0.5, kinds=("429", "500"))
        return [http.post("/chat/completions", json=HELLO).status_code for _ in range(30)]


def test_fault_rate_is_seeded() -> None:
    first, again, other = (outcomes_with_fault_rate(seed) for seed in (7, 7, 8))

    assert first == again
    assert first != other
    assert {200, 429, 500} == set(first)


def test_reset_clears_faults_and_requests(server: FakeOpenAI, http: httpx2.Client) -> None:
    http.post("/chat/completions", json=HELLO)
    server.fail_next("500", count=3)
    server.fault_rate(1.0)
    server.reset()

    assert server.request_count == 0
    assert http.post("/chat/completions", json=HELLO).status_code == 200


def test_canned_responses_are_replayed_in_order_then_normal_replies(
    server: FakeOpenAI, http: httpx2.Client
) -> None:
    server.fail_next("500")
    server.queue_response(
        canned_json({"error": "model 'x' not found"}, status=404, headers={"X-Server": "o"}),
        canned_text("<html><body>502 Bad Gateway</body></html>", 502, "text/html"),
        CannedResponse(529, b"overloaded", content_type="text/plain"),
    )

    first = http.post("/chat/completions", json=HELLO)
    second = http.post("/chat/completions", json=HELLO)
    third = http.post("/chat/completions", json=HELLO)
    fourth = http.post("/chat/completions", json=HELLO)  # the pending fault comes after
    fifth = http.post("/chat/completions", json=HELLO)

    assert (first.status_code, first.content) == (404, b'{"error": "model \'x\' not found"}')
    assert first.headers["x-server"] == "o"
    assert first.headers["content-type"] == "application/json"
    assert second.status_code == 502
    assert second.headers["content-type"] == "text/html"
    assert (third.status_code, third.text) == (529, "overloaded")
    assert fourth.status_code == 500
    assert fifth.json()["choices"][0]["message"]["content"] == "Echo: hello there world"
    assert server.request_count == 5


def test_canned_sse_is_sent_chunk_by_chunk(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.queue_response(
        canned_sse([{"choices": [{"index": 0, "delta": {"content": "hi"}}]}, b": keep-alive\n\n"]),
        CannedResponse(chunks=(b'data: {"a"', b": 1}\n", b"\n"), content_type="text/event-stream"),
    )

    with http.stream("POST", "/chat/completions", json={**HELLO, "stream": True}) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        first = sse_payloads(response)
    with http.stream("POST", "/chat/completions", json={**HELLO, "stream": True}) as response:
        raw = b"".join(response.iter_raw())

    assert first == ['{"choices": [{"index": 0, "delta": {"content": "hi"}}]}', "[DONE]"]
    assert raw == b'data: {"a": 1}\n\n'


def test_reset_forgets_canned_responses(server: FakeOpenAI, http: httpx2.Client) -> None:
    server.queue_response(canned_text("no", 400))
    server.reset()

    assert http.post("/chat/completions", json=HELLO).status_code == 200


def test_rejects_unknown_fault_kind(server: FakeOpenAI) -> None:
    with pytest.raises(ValueError):
        server.fail_next("418")  # type: ignore[arg-type]


async def test_many_concurrent_streams_with_the_openai_client(server: FakeOpenAI) -> None:
    # Kept at 200: the client's connection pool (httpcore2) costs O(n) per
    # request, so bigger fan-outs mostly measure the client.
    server.token_delay = 0.001
    limits = httpx2.Limits(max_connections=300, max_keepalive_connections=300)
    async with (
        httpx2.AsyncClient(limits=limits, timeout=30) as http_client,
        openai.AsyncOpenAI(
            base_url=server.base_url, api_key="sk-test", http_client=http_client
        ) as client,
    ):

        async def one(index: int) -> str:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"user {index}"}], stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return "".join(parts)

        replies = await asyncio.gather(*(one(i) for i in range(STREAMS)))

    assert replies == [f"Echo: user {i}" for i in range(STREAMS)]
    # Most ran side by side, each on its own connection.
    assert server.accepted_connections >= STREAMS // 2


def test_cli_mode_prints_ready_and_serves() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_openai", "--port", "0", "--reply-tokens", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().split()
        assert ready[0] == "READY"
        assert ready[1].startswith("http://127.0.0.1:")
        with httpx2.Client(base_url=ready[1], timeout=5) as http:
            content = http.post("/chat/completions", json=HELLO).json()
        assert content["choices"][0]["message"]["content"] == "Echo: hello there"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "STOPPED after 1 chat requests" in stderr
