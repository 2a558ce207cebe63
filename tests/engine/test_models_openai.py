"""OpenAIChatModel: the real openai client against the fake server, over HTTP."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from bench.fake_openai import FakeOpenAI
from engine.config import ModelSettings
from engine.models import (
    ChatMessage,
    ModelConfigError,
    ModelError,
    ModelRateLimited,
    ModelResponseError,
    ModelTimeout,
    ModelUnavailable,
    OfflineChatModel,
    RetryingRequest,
    StreamEnd,
    TextDelta,
    ToolSpec,
    create_model,
)
from engine.models.openai_model import (
    MAX_ARGUMENT_DEPTH,
    OpenAIChatModel,
    _arguments,
    _strip_reasoning,
    _ThinkFilter,
)

# Recognisable, so that a leak into any error message is easy to assert on.
FAKE_KEY = "sk-memchat-test-SECRET-0123456789"
MESSAGES = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "tell me about the sea"),
]
MEMORY_TOOLS = [
    ToolSpec(
        "add_memory",
        "Store a fact about the user.",
        {
            "type": "object",
            "properties": {"memory": {"type": "string"}, "topics": {"type": "array"}},
            "required": ["memory"],
        },
    ),
    ToolSpec(
        "update_memory",
        "Replace a memory.",
        {"type": "object", "properties": {"id": {"type": "string"}}},
    ),
]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def settings_for(server: FakeOpenAI, **overrides: Any) -> ModelSettings:
    values: dict[str, Any] = {
        "provider": "openai",
        "name": "fake-model",
        "base_url": server.base_url,
        "api_key": SecretStr(FAKE_KEY),
        "timeout": 5.0,
        "max_retries": 2,
    }
    values.update(overrides)
    return ModelSettings(**values)


@pytest.fixture
async def model(server: FakeOpenAI) -> AsyncIterator[OpenAIChatModel]:
    chat_model = OpenAIChatModel(settings_for(server))
    yield chat_model
    await chat_model.aclose()


async def collect(chat_model: OpenAIChatModel) -> tuple[list[str], StreamEnd]:
    deltas: list[str] = []
    async for event in chat_model.stream(MESSAGES):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        elif isinstance(event, StreamEnd):
            return deltas, event
    raise AssertionError("stream ended without StreamEnd")


def assert_no_key(exc: BaseException) -> None:
    assert FAKE_KEY not in str(exc)
    assert "SECRET" not in str(exc)
    assert "\n" not in str(exc)


async def test_streamed_text_equals_the_non_streaming_text(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    deltas, end = await collect(model)

    assert len(deltas) > 1
    assert "".join(deltas) == end.text == "Echo: tell me about the sea"
    assert end.finish_reason == "stop"
    assert end.usage is not None
    assert end.usage.completion_tokens == len(deltas)
    assert end.usage.prompt_tokens == 8
    request = server.requests[-1]
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["model"] == "fake-model"
    assert request["messages"] == [{"role": m.role, "content": m.content} for m in MESSAGES]


async def test_tool_calls_are_parsed(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.queue_tool_calls(
        [
            {"name": "update_memory", "arguments": {"id": "m1", "memory": "Name is Marcus"}},
            {"name": "add_memory", "arguments": '["a list"]'},
            {"name": "add_memory", "arguments": ""},
        ]
    )

    response = await model.call_tools(MESSAGES, MEMORY_TOOLS)

    first, not_an_object, empty = response.tool_calls
    assert (first.id, first.name, first.error) == ("call_1", "update_memory", None)
    assert first.arguments == {"id": "m1", "memory": "Name is Marcus"}
    assert not_an_object.arguments == {}
    assert not_an_object.error is not None and "not an object" in not_an_object.error
    assert (empty.arguments, empty.error) == ({}, None)
    assert response.usage is not None
    sent = server.requests[-1]["tools"]
    assert [tool["function"]["name"] for tool in sent] == ["add_memory", "update_memory"]
    assert sent[0] == {
        "type": "function",
        "function": {
            "name": "add_memory",
            "description": "Store a fact about the user.",
            "parameters": MEMORY_TOOLS[0].parameters,
        },
    }


async def test_bad_json_arguments_become_a_tool_call_error(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    server.fail_next("bad_tool_args")

    response = await model.call_tools(MESSAGES, MEMORY_TOOLS)

    [call] = response.tool_calls
    assert call.name == "add_memory"
    assert call.arguments == {}
    assert call.error is not None and "not valid JSON" in call.error


async def test_default_tool_call_from_the_fake(model: OpenAIChatModel) -> None:
    request = ChatMessage("user", "<user_message>\nI like tea.\n</user_message>")

    response = await model.call_tools([request], MEMORY_TOOLS)

    [call] = response.tool_calls
    assert call.arguments == {"memory": "I like tea.", "topics": ["general"]}


async def test_429_is_retried_by_the_client(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("429", count=2, retry_after=0.001)

    _, end = await collect(model)

    assert end.text == "Echo: tell me about the sea"
    assert server.request_count == 3
    server.fail_next("429", count=1, retry_after=0.001)
    told = [e async for e in model.stream(MESSAGES) if isinstance(e, RetryingRequest)]
    assert told == [RetryingRequest(1, 2)], "each retry is told, before any text"


async def test_persistent_429_is_rate_limited(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("429", count=3, retry_after=0.001)

    with pytest.raises(ModelRateLimited) as caught:
        await collect(model)

    assert server.request_count == 3
    assert "429" in str(caught.value) and "fake-model" in str(caught.value)
    assert_no_key(caught.value)


async def test_persistent_500_is_unavailable(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("500", count=3, retry_after=0.001)

    with pytest.raises(ModelUnavailable) as caught:
        await model.call_tools(MESSAGES, MEMORY_TOOLS)

    assert server.request_count == 3
    assert "500" in str(caught.value)
    assert_no_key(caught.value)


async def test_500_then_success(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("500", count=2, retry_after=0.001)

    response = await model.call_tools(MESSAGES, MEMORY_TOOLS)

    assert len(response.tool_calls) == 1
    assert server.request_count == 3


async def test_cut_stream_raises_after_the_partial_deltas(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    server.fail_next("cut", after=3)
    deltas: list[str] = []

    with pytest.raises(ModelResponseError) as caught:
        async for event in model.stream(MESSAGES):
            assert isinstance(event, TextDelta)
            deltas.append(event.text)

    assert "".join(deltas) == "Echo: tell me "
    assert "cut off" in str(caught.value)
    assert_no_key(caught.value)


async def test_stream_ending_without_finish_reason_is_incomplete(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    server.fail_next("cut", after=2, clean=True)
    deltas: list[str] = []

    with pytest.raises(ModelResponseError) as caught:
        async for event in model.stream(MESSAGES):
            assert isinstance(event, TextDelta)
            deltas.append(event.text)

    assert deltas == ["Echo: ", "tell "]
    assert "before the reply was complete" in str(caught.value)


async def test_timeout(server: FakeOpenAI) -> None:
    server.fail_next("timeout")
    chat_model = OpenAIChatModel(settings_for(server, timeout=0.5, max_retries=0))
    try:
        with pytest.raises(ModelTimeout) as caught:
            await collect(chat_model)
    finally:
        await chat_model.aclose()

    assert str(caught.value).startswith("model request timed out after 0.5s (fake-model at http")
    assert_no_key(caught.value)


async def test_malformed_json_response(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("malformed")

    with pytest.raises(ModelResponseError) as caught:
        await model.call_tools(MESSAGES, MEMORY_TOOLS)

    assert "malformed" in str(caught.value)
    assert_no_key(caught.value)


async def test_malformed_sse_data(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    server.fail_next("malformed")

    with pytest.raises(ModelResponseError) as caught:
        await collect(model)

    assert "malformed" in str(caught.value)


async def test_server_without_stream_options_support() -> None:
    with FakeOpenAI(reject_stream_options=True) as server:
        chat_model = OpenAIChatModel(settings_for(server))
        try:
            _, first = await collect(chat_model)
            _, second = await collect(chat_model)
        finally:
            await chat_model.aclose()
        requests = server.requests

    assert first.text == second.text == "Echo: tell me about the sea"
    assert first.usage is None  # no usage chunk without stream_options
    # Rejected once, retried without it, and never sent again.
    assert ["stream_options" in request for request in requests] == [True, False, False]


async def test_connection_refused_is_unavailable() -> None:
    with FakeOpenAI() as server:
        settings = settings_for(server, max_retries=0)
    chat_model = OpenAIChatModel(settings)  # the server is gone: nothing listens there
    try:
        with pytest.raises(ModelUnavailable) as caught:
            await collect(chat_model)
    finally:
        await chat_model.aclose()

    assert "cannot reach" in str(caught.value)
    assert_no_key(caught.value)


def test_missing_key_for_the_real_endpoint_fails_at_construction() -> None:
    for base_url in (None, "https://api.openai.com/v1"):
        settings = ModelSettings(provider="openai", base_url=base_url, api_key=None)
        with pytest.raises(ModelConfigError, match=r"^OPENAI_API_KEY is not set"):
            OpenAIChatModel(settings)
        with pytest.raises(ModelConfigError):
            create_model(settings)


@pytest.mark.parametrize(
    "base_url", ["localhost:8080/v1", "ftp://example.com/v1", "http://host:port/v1", "http://"]
)
def test_invalid_base_url_fails_at_construction(base_url: str) -> None:
    settings = ModelSettings(provider="openai", base_url=base_url, api_key=SecretStr(FAKE_KEY))
    with pytest.raises(ModelConfigError, match="must be an http") as caught:
        OpenAIChatModel(settings)
    assert_no_key(caught.value)


async def test_local_server_needs_no_key(server: FakeOpenAI) -> None:
    chat_model = create_model(settings_for(server, api_key=None))
    try:
        assert isinstance(chat_model, OpenAIChatModel)
        _, end = await collect(chat_model)
    finally:
        await chat_model.aclose()
    assert end.text.startswith("Echo:")


async def test_label_shows_model_and_endpoint_but_no_secret() -> None:
    settings = ModelSettings(
        name="gpt-4o-mini",
        base_url=f"http://user:{FAKE_KEY}@127.0.0.1:8080/v1/?key={FAKE_KEY}",
        api_key=SecretStr(FAKE_KEY),
    )
    chat_model = OpenAIChatModel(settings)
    await chat_model.aclose()

    assert chat_model.label == "gpt-4o-mini @ http://127.0.0.1:8080/v1"
    assert chat_model.is_offline is False


async def test_create_model_picks_the_provider(server: FakeOpenAI) -> None:
    offline = create_model(ModelSettings(provider="auto", offline_token_delay_ms=5))
    assert isinstance(offline, OfflineChatModel)
    assert offline.is_offline and offline.label == "offline model"
    online = create_model(settings_for(server, provider="auto"))
    await online.aclose()
    assert isinstance(online, OpenAIChatModel)


async def test_errors_are_model_errors_with_one_line(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    for kind in ("429", "500", "malformed"):
        server.fail_next(kind, count=3, retry_after=0.001)
        with pytest.raises(ModelError) as caught:
            await model.call_tools(MESSAGES, MEMORY_TOOLS)
        server.reset()
        assert_no_key(caught.value)
        assert "(fake-model at http://127.0.0.1:" in str(caught.value)


# --- reply reading, without a server ----------------------------------------------

# Text made of the pieces that matter to a leading think block.
THINKISH = st.lists(
    st.sampled_from(["<think>", "</think>", "<", "think>", "</", " ", "\n", "a", "Hi", "<b>"]),
    max_size=12,
).map("".join)


@given(text=THINKISH, cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_streamed_think_filter_matches_the_whole_text_rule(text: str, cuts: list[int]) -> None:
    # However a reply is split into deltas, the stream shows what the
    # non-streamed path shows for the whole text.
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    thinking = _ThinkFilter()

    shown = "".join(thinking.feed(chunk) for chunk in chunks) + thinking.finish()

    assert shown == _strip_reasoning(text)


def test_think_filter_passes_a_plain_reply_through_at_once() -> None:
    thinking = _ThinkFilter()

    assert thinking.feed("Hello") == "Hello"
    assert thinking.feed(" <think>not reasoning</think>") == " <think>not reasoning</think>"


@given(raw=st.one_of(st.text(max_size=40), st.none(), st.integers(), st.lists(st.integers())))
def test_arguments_never_raise(raw: object) -> None:
    arguments, error = _arguments(raw)

    assert isinstance(arguments, dict)
    assert (error is None) or (arguments == {} and isinstance(error, str) and "\n" not in error)


def test_arguments_depth_limit_is_on_containers() -> None:
    deepest: dict[str, Any] = {"a": 1}
    for _ in range(MAX_ARGUMENT_DEPTH - 1):
        deepest = {"a": deepest}

    assert _arguments(deepest) == (deepest, None)
    assert (
        _arguments({"a": deepest})[1]
        == f"arguments are nested deeper than {MAX_ARGUMENT_DEPTH} levels"
    )
    assert _arguments('"{\\"memory\\": \\"tea\\"}"') == ({"memory": "tea"}, None)  # encoded twice


async def test_complete_sends_max_tokens_and_json_mode(
    model: OpenAIChatModel, server: FakeOpenAI
) -> None:
    completion = await model.complete(MESSAGES, json_object=True)

    assert completion.text == "Echo: tell me about the sea"
    assert completion.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens == 8
    request = server.requests[-1]
    assert request["response_format"] == {"type": "json_object"}
    assert request["max_tokens"] == ModelSettings().max_tokens
    assert "tools" not in request and "stream" not in request
