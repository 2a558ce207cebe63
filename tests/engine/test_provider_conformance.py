"""What real providers send, replayed through the real HTTP path.

Every row is one response shape a real OpenAI-compatible server sends (its
source is in the row), served byte for byte by the fake server's
``queue_response`` to :class:`OpenAIChatModel` over HTTP on 127.0.0.1, with
the outcome memchat needs from it. docs/model-conformance.md is the same
table for people; ``test_every_row_is_documented`` keeps the two in step.

Reasoning text in every shape is ``PRIVATE-REASONING``, so that one check
shows it never leaks into a reply.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import SecretStr

from bench.fake_openai import (
    CannedResponse,
    FakeOpenAI,
    canned_json,
    canned_sse,
    canned_text,
)
from engine.config import ModelSettings
from engine.models import (
    ChatMessage,
    ModelConfigError,
    ModelContextTooLong,
    ModelError,
    ModelRateLimited,
    ModelRequestRefused,
    ModelResponseError,
    ModelToolsUnsupported,
    ModelUnavailable,
    RetryingRequest,
    StreamEnd,
    TextDelta,
    ToolSpec,
    Usage,
)
from engine.models.openai_model import OpenAIChatModel

DOC = Path(__file__).resolve().parents[2] / "docs" / "model-conformance.md"
FAKE_KEY = "sk-memchat-test-SECRET-0123456789"
REASONING = "PRIVATE-REASONING"
MAX_TOKENS = 321
MESSAGES = [ChatMessage("system", "Extract memories."), ChatMessage("user", "I like tea.")]
TOOLS = [
    ToolSpec(
        "add_memory",
        "Store a fact about the user.",
        {"type": "object", "properties": {"memory": {"type": "string"}}, "required": ["memory"]},
    ),
    ToolSpec(
        "delete_memory",
        "Forget a memory.",
        {"type": "object", "properties": {"id": {"type": "string"}}},
    ),
]
# Only here so that the client's retries of 429/5xx take a millisecond, not
# seconds: the header changes when the client retries, never what it reads.
FAST_RETRY = {"retry-after-ms": "1"}
USAGE = {"prompt_tokens": 57, "completion_tokens": 12, "total_tokens": 69}
TEA = {"memory": "Likes tea"}
REPORTED = Usage(57, 12)  # USAGE as the model reports it


def chat_completion(
    message: dict[str, Any],
    finish: str | None,
    usage: dict[str, Any] | None = USAGE,
    **extra: Any,
) -> dict[str, Any]:
    """A chat.completion body around one choice; ``extra`` adds a server's own fields."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_722_181_065,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        **extra,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_722_181_065,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def usage_chunk(usage: dict[str, Any] = USAGE) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_722_181_065,
        "model": "m",
        "choices": [],
        "usage": usage,
    }


def call(name: str, arguments: Any, call_id: str = "call_a1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"memory": "deep"}
    for _ in range(depth - 1):
        value = {"memory": value}
    return value


# --- call_tools ---------------------------------------------------------------------

Expected = tuple[str, dict[str, Any], str | None]  # name, arguments, a word of the error


@dataclass(frozen=True)
class ToolsRow:
    id: str
    source: str
    response: CannedResponse
    text: str = ""
    calls: tuple[Expected, ...] = ()
    finish: str | None = "tool_calls"
    usage: Usage | None = REPORTED


TOOLS_ROWS = [
    ToolsRow(
        "openai-tool-calls-content-null",
        "https://platform.openai.com/docs/api-reference/chat/object",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("add_memory", json.dumps(TEA))],
                    "refusal": None,
                },
                "tool_calls",
            )
        ),
        calls=(("add_memory", TEA, None),),
    ),
    ToolsRow(
        "openai-no-tool-calls-field",
        "https://platform.openai.com/docs/api-reference/chat/object (a plain answer)",
        canned_json(chat_completion({"role": "assistant", "content": "Nothing to store."}, "stop")),
        text="Nothing to store.",
        finish="stop",
    ),
    ToolsRow(
        "mistral-tool-calls-null",
        "https://github.com/mistralai/client-js/pull/54 (tool_calls is null or a list)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": "Nothing to store.", "tool_calls": None},
                "stop",
            )
        ),
        text="Nothing to store.",
        finish="stop",
    ),
    ToolsRow(
        "vllm-tool-calls-empty-list",
        "https://github.com/vllm-project/vllm/issues/44104 and microsoft/autogen#3120",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": "Nothing to store.",
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "stop",
            )
        ),
        text="Nothing to store.",
        finish="stop",
    ),
    ToolsRow(
        "openai-tool-calls-finish-stop",
        "https://github.com/ENTERPILOT/GoModel/pull/124 (calls with finish_reason stop)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": None, "tool_calls": [call("add_memory", "{}")]},
                "stop",
            )
        ),
        calls=(("add_memory", {}, None),),
        finish="stop",
    ),
    ToolsRow(
        "ollama-v1-tool-call-with-reasoning",
        "github:ollama/ollama openai/openai.go (ToToolCalls, Message.Reasoning)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning": REASONING,
                    "tool_calls": [
                        {
                            "id": "call_k3l2",
                            "index": 0,
                            "type": "function",
                            "function": {"name": "add_memory", "arguments": json.dumps(TEA)},
                        }
                    ],
                },
                "tool_calls",
                system_fingerprint="fp_ollama",
            )
        ),
        calls=(("add_memory", TEA, None),),
    ),
    ToolsRow(
        "ollama-arguments-null",
        "github:ollama/ollama openai/openai.go ToToolCalls (json.Marshal of nil arguments)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": "", "tool_calls": [call("add_memory", "null")]},
                "tool_calls",
            )
        ),
        calls=(("add_memory", {}, None),),
    ),
    ToolsRow(
        "ollama-native-arguments-object",
        "github:ollama/ollama api/types.go ToolCallFunction.Arguments (an object, /api/chat)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": "", "tool_calls": [call("add_memory", TEA)]},
                "tool_calls",
            )
        ),
        calls=(("add_memory", TEA, None),),
    ),
    ToolsRow(
        "arguments-empty-string",
        "https://platform.openai.com/docs/guides/function-calling (streamed calls start with "
        'arguments "", what a proxy assembles for a call without arguments)',
        canned_json(
            chat_completion(
                {"role": "assistant", "content": None, "tool_calls": [call("delete_memory", "")]},
                "tool_calls",
            )
        ),
        calls=(("delete_memory", {}, None),),
    ),
    ToolsRow(
        "arguments-in-code-fence",
        "https://github.com/earendil-works/pi/issues/8858 (DeepSeek via gateways)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("add_memory", '```json\n{"memory": "Likes tea"}\n```')],
                },
                "tool_calls",
            )
        ),
        calls=(("add_memory", TEA, None),),
    ),
    ToolsRow(
        "arguments-with-text-around",
        "https://github.com/NousResearch/hermes-agent/pull/79333 and agentscope-ai/agentscope#2154",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        call("add_memory", 'Sure: {"memory": "Likes tea"}', "call_1"),
                        call("add_memory", '{"memory": "Likes tea"}</tool_call>', "call_2"),
                    ],
                },
                "tool_calls",
            )
        ),
        calls=(("add_memory", TEA, None), ("add_memory", TEA, None)),
    ),
    ToolsRow(
        "arguments-not-json-keeps-other-calls",
        "bench/fake_openai.py bad_tool_args (a model's unterminated JSON)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        call("add_memory", '{"memory": "unterminated', "call_1"),
                        call("add_memory", json.dumps(TEA), "call_2"),
                        call("add_memory", '["a list"]', "call_3"),
                    ],
                },
                "tool_calls",
            )
        ),
        calls=(
            ("add_memory", {}, "not valid JSON"),
            ("add_memory", TEA, None),
            ("add_memory", {}, "not an object"),
        ),
    ),
    ToolsRow(
        "arguments-nested-too-deep",
        "a hostile or runaway reply: 11 levels, and 100,000 (json's RecursionError)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        call("add_memory", json.dumps(nested(11)), "call_1"),
                        call("add_memory", json.dumps(nested(10)), "call_2"),
                        call("add_memory", "[" * 100_000 + "]" * 100_000, "call_3"),
                        call("add_memory", json.dumps(TEA), "call_4"),
                    ],
                },
                "tool_calls",
            )
        ),
        calls=(
            ("add_memory", {}, "nested deeper than 10"),
            ("add_memory", nested(10), None),
            ("add_memory", {}, "nested deeper than 10"),
            ("add_memory", TEA, None),
        ),
    ),
    ToolsRow(
        "llamacpp-reasoning-content-and-calls",
        "github:ggml-org/llama.cpp common/chat.cpp common_chat_msg::to_json_oaicompat",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "reasoning_content": REASONING,
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "add_memory", "arguments": json.dumps(TEA)},
                            "id": "OJPw2fJ0RRhoGj0BZ38ydPb9OfOSVEWs",
                        }
                    ],
                },
                "tool_calls",
                system_fingerprint="b6100-4227c9be",
                timings={"prompt_n": 57, "predicted_n": 12},
            )
        ),
        calls=(("add_memory", TEA, None),),
    ),
    ToolsRow(
        "hermes-tool-call-in-content",
        "https://github.com/vllm-project/vllm/issues/17161 (no tool parser: the call is text)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": '<tool_call>\n{"name": "add_memory", "arguments": '
                    '{"memory": "Likes tea"}}\n</tool_call>',
                    "tool_calls": [],
                },
                "stop",
            )
        ),
        calls=(("add_memory", TEA, None),),
        finish="stop",
    ),
    ToolsRow(
        "bare-json-call-in-content",
        "https://github.com/vllm-project/vllm/issues/11786 (Llama 3.2: the call is content)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": '{"type": "function", "function": {"name": "add_memory", '
                    '"parameters": {"memory": "Likes tea"}}}',
                    "tool_calls": [],
                },
                "stop",
                stop_reason=128008,
            )
        ),
        calls=(("add_memory", TEA, None),),
        finish="stop",
    ),
    ToolsRow(
        "json-in-content-for-an-unknown-tool-stays-text",
        "https://github.com/vllm-project/vllm/issues/11786 (a name that was not offered)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": '{"name": "get_current_traffic", "parameters": {"city": "Sydney"}}',
                },
                "stop",
            )
        ),
        text='{"name": "get_current_traffic", "parameters": {"city": "Sydney"}}',
        finish="stop",
    ),
    ToolsRow(
        "deepseek-reasoning-content-answer",
        "https://api-docs.deepseek.com/guides/reasoning_model (reasoning_content beside content)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": "Nothing to store.",
                    "reasoning_content": REASONING,
                },
                "stop",
            )
        ),
        text="Nothing to store.",
        finish="stop",
    ),
    ToolsRow(
        "think-block-in-content",
        "https://docs.vllm.ai/en/latest/api/vllm/reasoning/deepseek_r1_reasoning_parser/ "
        "(<think>...</think> when no reasoning parser runs)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\nNothing."},
                "stop",
            )
        ),
        text="Nothing.",
        finish="stop",
    ),
    ToolsRow(
        "unclosed-think-cut-by-length",
        "the same shape cut off by max_tokens (finish_reason length)",
        canned_json(
            chat_completion({"role": "assistant", "content": f"<think>\n{REASONING}"}, "length")
        ),
        finish="length",
    ),
    ToolsRow(
        "azure-content-filter",
        "https://learn.microsoft.com/azure/ai-services/openai/concepts/content-filter "
        "(content null, finish_reason content_filter)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": None},
                "content_filter",
                prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {}}],
            )
        ),
        finish="content_filter",
    ),
    ToolsRow(
        "usage-missing",
        "servers that send no usage (older llama-cpp-python, some proxies)",
        canned_json(
            chat_completion({"role": "assistant", "content": "Nothing."}, "stop", usage=None)
        ),
        text="Nothing.",
        finish="stop",
        usage=None,
    ),
]


# --- stream -------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamRow:
    id: str
    source: str
    response: CannedResponse
    text: str
    finish: str
    usage: Usage | None = None


STREAM_ROWS = [
    StreamRow(
        "openai-usage-in-final-chunk",
        "https://platform.openai.com/docs/api-reference/chat/streaming (stream_options)",
        canned_sse(
            [
                chunk({"role": "assistant", "content": ""}, usage=None),
                chunk({"content": "Hello"}, usage=None),
                chunk({"content": " there"}, usage=None),
                chunk({}, "stop", usage=None),
                usage_chunk(),
            ]
        ),
        "Hello there",
        "stop",
        Usage(57, 12),
    ),
    StreamRow(
        "no-usage-chunk",
        "servers that ignore stream_options (older llama.cpp and vLLM)",
        canned_sse([chunk({"content": "Hello"}), chunk({}, "stop")]),
        "Hello",
        "stop",
    ),
    StreamRow(
        "deepseek-reasoning-content-deltas",
        "https://api-docs.deepseek.com/guides/thinking_mode_api_example_streaming",
        canned_sse(
            [
                chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
                chunk({"content": None, "reasoning_content": REASONING}),
                chunk({"content": "Hello", "reasoning_content": None}),
                chunk({"content": "", "reasoning_content": None}, "stop"),
                usage_chunk(),
            ]
        ),
        "Hello",
        "stop",
        Usage(57, 12),
    ),
    StreamRow(
        "ollama-reasoning-deltas",
        "github:ollama/ollama openai/openai.go ToStreamChunks (Delta.Reasoning, FinishChunk)",
        canned_sse(
            [
                chunk({"role": "assistant", "content": "", "reasoning": REASONING}),
                chunk({"content": "Hello"}, system_fingerprint="fp_ollama"),
                chunk({}, "stop", system_fingerprint="fp_ollama"),
            ]
        ),
        "Hello",
        "stop",
    ),
    StreamRow(
        "think-block-split-across-deltas",
        "https://github.com/ggml-org/llama.cpp/issues/14894 (--reasoning-format none: "
        "<think> stays in content)",
        canned_sse(
            [
                chunk({"content": "<th"}),
                chunk({"content": "ink>"}),
                chunk({"content": REASONING}),
                chunk({"content": "</thi"}),
                chunk({"content": "nk>\n\n"}),
                chunk({"content": "Hello"}),
                chunk({"content": " there"}),
                chunk({}, "stop"),
            ]
        ),
        "Hello there",
        "stop",
    ),
    StreamRow(
        "unclosed-think-stream-cut-by-length",
        "the same shape cut off by max_tokens",
        canned_sse([chunk({"content": f"<think>{REASONING}"}), chunk({}, "length")]),
        "",
        "length",
    ),
    StreamRow(
        "streamed-tool-call-deltas",
        "https://platform.openai.com/docs/guides/function-calling#streaming",
        canned_sse(
            [
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a1",
                                "type": "function",
                                "function": {"name": "add_memory", "arguments": ""},
                            }
                        ],
                    }
                ),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"memory"'}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "tea"}'}}]}),
                chunk({}, "tool_calls"),
            ]
        ),
        "",
        "tool_calls",
    ),
    StreamRow(
        "finish-length",
        "https://platform.openai.com/docs/api-reference/chat/object (finish_reason length)",
        canned_sse([chunk({"content": "Hello"}), chunk({}, "length")]),
        "Hello",
        "length",
    ),
    StreamRow(
        "azure-prompt-filter-chunk-and-content-filter",
        "https://learn.microsoft.com/azure/ai-services/openai/concepts/content-filter "
        "(a first chunk with choices [] and prompt_filter_results)",
        canned_sse(
            [
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                },
                chunk({"content": "Hel"}),
                chunk({}, "content_filter"),
            ]
        ),
        "Hel",
        "content_filter",
    ),
    StreamRow(
        "groq-usage-in-x-groq",
        "vercel/ai packages/groq/src/groq-chat-language-model.test.ts (Groq's own bytes)",
        CannedResponse(
            chunks=(
                b'data: {"id":"chatcmpl-e7f8e220-656c-4455-a132-dacfc1370798","object":'
                b'"chat.completion.chunk","created":1711357598,"model":"gemma2-9b-it",'
                b'"system_fingerprint":"fp_3bc1b5746c","choices":[{"index":0,"delta":'
                b'{"role":"assistant","content":"Hello"},"logprobs":null,"finish_reason":null}]}'
                b"\n\n",
                b'data: {"id":"chatcmpl-e7f8e220-656c-4455-a132-dacfc1370798","object":'
                b'"chat.completion.chunk","created":1729171479,"model":"gemma2-9b-it",'
                b'"system_fingerprint":"fp_10c08bf97d","choices":[{"index":0,"delta":{},'
                b'"logprobs":null,"finish_reason":"stop"}],"x_groq":{"id":'
                b'"req_01jadadp0femyae9kav1gpkhe8","usage":{"queue_time":0.061348671,'
                b'"prompt_tokens":18,"prompt_time":0.000211569,"completion_tokens":439,'
                b'"completion_time":0.798181818,"total_tokens":457,"total_time":0.798393387}}}'
                b"\n\n",
                b"data: [DONE]\n\n",
            ),
            content_type="text/event-stream",
        ),
        "Hello",
        "stop",
        Usage(18, 439),
    ),
    StreamRow(
        "usage-on-every-chunk",
        "vercel/ai packages/groq/src/groq-chat-language-model.test.ts (an NVIDIA NIM stream: "
        "usage on every chunk, tool-call deltas, stop_reason)",
        canned_sse(
            [
                chunk(
                    {"role": "assistant", "content": ""},
                    usage={"prompt_tokens": 226, "total_tokens": 226, "completion_tokens": 0},
                ),
                chunk(
                    {"content": "Hi"},
                    usage={"prompt_tokens": 226, "total_tokens": 233, "completion_tokens": 7},
                ),
                {
                    "id": "chat-2267f7e2910a4254bac0650ba74cfc1c",
                    "object": "chat.completion.chunk",
                    "created": 1733162241,
                    "model": "meta/llama-3.1-8b-instruct:fp8",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": "stop",
                            "stop_reason": 128008,
                        }
                    ],
                    "usage": {"prompt_tokens": 226, "total_tokens": 246, "completion_tokens": 20},
                },
                {
                    "id": "chat-2267f7e2910a4254bac0650ba74cfc1c",
                    "object": "chat.completion.chunk",
                    "created": 1733162241,
                    "model": "meta/llama-3.1-8b-instruct:fp8",
                    "choices": [],
                    "usage": {"prompt_tokens": 226, "total_tokens": 246, "completion_tokens": 20},
                },
            ]
        ),
        "Hi",
        "stop",
        Usage(226, 20),
    ),
    StreamRow(
        "mistral-content-part-deltas",
        "https://github.com/braintrustdata/braintrust-sdk-javascript/issues/1857 (Magistral "
        "streams delta.content as thinking and text parts)",
        canned_sse(
            [
                chunk(
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": [{"type": "text", "text": REASONING}]}
                        ],
                    }
                ),
                chunk({"content": [{"type": "text", "text": "Hello"}]}),
                chunk({"content": ""}, "stop"),
            ]
        ),
        "Hello",
        "stop",
    ),
    StreamRow(
        "openrouter-processing-comments",
        "https://openrouter.ai/docs/api-reference/streaming (': OPENROUTER PROCESSING')",
        canned_sse(
            [
                b": OPENROUTER PROCESSING\n\n",
                chunk({"content": "Hello"}, provider="OpenAI"),
                b": OPENROUTER PROCESSING\r\n\r\n",
                chunk({}, "stop", provider="OpenAI"),
            ]
        ),
        "Hello",
        "stop",
    ),
]


# --- complete -----------------------------------------------------------------------


@dataclass(frozen=True)
class CompleteRow:
    id: str
    source: str
    response: CannedResponse
    text: str
    finish: str | None = "stop"
    usage: Usage | None = REPORTED


COMPLETE_ROWS = [
    CompleteRow(
        "json-answer",
        "https://platform.openai.com/docs/guides/structured-outputs#json-mode",
        canned_json(chat_completion({"role": "assistant", "content": '{"add": []}'}, "stop")),
        '{"add": []}',
    ),
    CompleteRow(
        "reasoning-content-and-think-block",
        "https://api-docs.deepseek.com/guides/reasoning_model; vLLM deepseek_r1 parser",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "reasoning_content": REASONING,
                    "content": f"<think>{REASONING}</think>\n{{}}",
                },
                "stop",
            )
        ),
        "{}",
    ),
    CompleteRow(
        "mistral-content-parts",
        "https://github.com/spring-projects/spring-ai/issues/5019 (Magistral: content is "
        "thinking and text chunks)",
        canned_json(
            chat_completion(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": [{"type": "text", "text": REASONING}]},
                        {"type": "text", "text": "{}"},
                    ],
                },
                "stop",
            )
        ),
        "{}",
    ),
    CompleteRow(
        "content-null-length",
        "a reasoning model that spent max_tokens thinking (content null, finish length)",
        canned_json(
            chat_completion(
                {"role": "assistant", "content": None, "reasoning_content": REASONING}, "length"
            )
        ),
        "",
        "length",
    ),
]


# --- errors ---------------------------------------------------------------------------


Call = Literal["tools", "stream", "complete"]


@dataclass(frozen=True)
class ErrorRow:
    id: str
    source: str
    response: CannedResponse
    call: Call
    error: type[ModelError]
    words: tuple[str, ...]
    attempts: int = 1  # requests the client makes (its own retries included)


OLLAMA_NO_TOOLS = (
    '{"error":{"message":"registry.ollama.ai/library/gemma:2b does not support tools",'
    '"type":"api_error","param":null,"code":null}}'
)
ERROR_ROWS = [
    ErrorRow(
        "ollama-v1-does-not-support-tools",
        "https://github.com/ollama/ollama/issues/6027; github:ollama/ollama server/images.go",
        canned_json(OLLAMA_NO_TOOLS, 400),
        "tools",
        ModelToolsUnsupported,
        ("does not take tools", "does not support tools", "HTTP 400"),
    ),
    ErrorRow(
        "ollama-native-error-string",
        'https://github.com/ollama/ollama/issues/14795 ({"error": "..."})',
        canned_json(
            '{"error":"registry.ollama.ai/library/Qwen3.5:0.8b does not support tools"}', 400
        ),
        "tools",
        ModelToolsUnsupported,
        ("does not support tools",),
    ),
    ErrorRow(
        "vllm-auto-tool-choice-not-enabled",
        "https://github.com/vllm-project/vllm/issues/9986 (vLLM's top-level error object)",
        canned_json(
            {
                "object": "error",
                "message": '"auto" tool choice requires --enable-auto-tool-choice and '
                "--tool-call-parser to be set",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            400,
        ),
        "tools",
        ModelToolsUnsupported,
        ("--enable-auto-tool-choice",),
    ),
    ErrorRow(
        "llamacpp-tools-need-jinja-500",
        "https://github.com/containers/ramalama/issues/988; llama.cpp server utils.hpp",
        canned_json(
            '{"error":{"code":500,"message":"tools param requires --jinja flag",'
            '"type":"server_error"}}',
            500,
            FAST_RETRY,
        ),
        "tools",
        ModelToolsUnsupported,
        ("--jinja", "HTTP 500"),
        attempts=3,  # a 500 is retried by the client before it is read
    ),
    ErrorRow(
        "openrouter-no-tool-endpoints-404",
        "https://github.com/bobrware/bobrchat/issues/60",
        canned_json(
            '{"error":{"message":"No endpoints found that support tool use. To learn more '
            "about provider routing, visit: https://openrouter.ai/docs/guides/routing/"
            'provider-selection","code":404}}',
            404,
        ),
        "tools",
        ModelToolsUnsupported,
        ("support tool use",),
    ),
    ErrorRow(
        "openai-context-length-exceeded",
        "https://manifest.build/errors/openai/400-context-length-exceeded/",
        canned_json(
            {
                "error": {
                    "message": "This model's maximum context length is 128000 tokens. However, "
                    "your messages resulted in 130532 tokens. Please reduce the length of the "
                    "messages.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            400,
        ),
        "stream",
        ModelContextTooLong,
        ("longer than the model's context", "128000", "lower model.context_tokens"),
    ),
    ErrorRow(
        "vllm-maximum-context-length",
        "https://github.com/vllm-project/vllm/issues/20409",
        canned_json(
            {
                "object": "error",
                "message": "This model's maximum context length is 16384 tokens. However, you "
                "requested 122946 tokens (112946 in the messages, 10000 in the completion). "
                "Please reduce the length of the messages or completion.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            400,
        ),
        "tools",
        ModelContextTooLong,
        ("16384",),
    ),
    ErrorRow(
        "vllm-max-tokens-too-large-for-context",
        "vLLM's OpenAI server (serving_engine.py _validate_input), as its users quote it",
        canned_json(
            '{"error":{"message":"\'max_tokens\' or \'max_completion_tokens\' is too large: '
            "8000. This model's maximum context length is 4096 tokens and your request has "
            '2778 input tokens (8000 > 4096 - 2778). None","type":"BadRequestError",'
            '"param":null,"code":400}}',
            400,
        ),
        "stream",
        ModelContextTooLong,
        ("4096 tokens",),  # and one request: not taken for a max_tokens rename
    ),
    ErrorRow(
        "llamacpp-exceeds-available-context",
        "https://github.com/oobabooga/textgen/issues/7257; ggml-org/llama.cpp#15780",
        canned_json(
            '{"error":{"code":400,"message":"the request exceeds the available context size. '
            'try increasing the context size or enable context shift","type":'
            '"exceed_context_size_error","n_prompt_tokens":14429,"n_ctx":8192}}',
            400,
        ),
        "complete",
        ModelContextTooLong,
        ("available context size",),
    ),
    ErrorRow(
        "llamacpp-exceeds-context-500",
        "https://github.com/ggml-org/llama.cpp/pull/15780 (code 500 in builds of that time)",
        canned_json(
            '{"error":{"code":500,"message":"request (1407 tokens) exceeds the available '
            'context size (256 tokens), try increasing it","type":"exceed_context_size_error",'
            '"n_prompt_tokens":1407,"n_ctx":256}}',
            500,
            FAST_RETRY,
        ),
        "stream",
        ModelContextTooLong,
        ("1407 tokens",),
        attempts=3,
    ),
    ErrorRow(
        "lmstudio-context-overflows",
        "https://github.com/lmstudio-ai/lmstudio-bug-tracker/issues/237 and #546",
        canned_json(
            '{"error":"Trying to keep the first 15857 tokens when context the overflows. '
            "However, the model is loaded with context length of only 4096 tokens, which is "
            "not enough. Try to load the model with a larger context length, or provide a "
            'shorter input."}',
            400,
        ),
        "stream",
        ModelContextTooLong,
        ("15857",),
    ),
    ErrorRow(
        "ollama-input-length-exceeds-context",
        "github:ollama/ollama server/routes.go, llm/llama_server.go",
        canned_json(
            '{"error":{"message":"the input length exceeds the context length",'
            '"type":"invalid_request_error","param":null,"code":null}}',
            400,
        ),
        "complete",
        ModelContextTooLong,
        ("exceeds the context length",),
    ),
    ErrorRow(
        "openrouter-200-with-upstream-context-error",
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (errors after the 200; "
        "metadata.provider_name/raw)",
        canned_json(
            {
                "error": {
                    "code": 400,
                    "message": "Provider returned error",
                    "metadata": {
                        "provider_name": "DeepInfra",
                        "raw": "This model's maximum context length is 8192 tokens.",
                    },
                }
            }
        ),
        "complete",
        ModelContextTooLong,
        ("DeepInfra", "8192"),
    ),
    ErrorRow(
        "ollama-model-not-found-404",
        "https://github.com/netease-youdao/QAnything/issues/555; ollama server/routes.go",
        canned_json(
            '{"error":{"message":"model \\"llama9\\" not found, try pulling it first",'
            '"type":"api_error","param":null,"code":null}}',
            404,
        ),
        "stream",
        ModelConfigError,
        ("model 'fake-model' is not available", "HTTP 404", "try pulling it first"),
    ),
    ErrorRow(
        "openai-model-not-found-404",
        "https://platform.openai.com/docs/guides/error-codes (model_not_found)",
        canned_json(
            {
                "error": {
                    "message": "The model `gpt-9` does not exist or you do not have access to it.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            },
            404,
        ),
        "tools",
        ModelConfigError,
        ("model 'fake-model' is not available", "does not exist"),
    ),
    ErrorRow(
        "openai-invalid-api-key-401",
        "https://platform.openai.com/docs/guides/error-codes (invalid_api_key)",
        canned_json(
            {
                "error": {
                    "message": "Incorrect API key provided: sk-memch**********************6789. "
                    "You can find your API key at https://platform.openai.com/account/api-keys.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            401,
        ),
        "stream",
        ModelConfigError,
        ("API key was rejected", "HTTP 401"),
    ),
    ErrorRow(
        "openrouter-insufficient-credits-402",
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (402)",
        canned_json('{"error":{"code":402,"message":"Insufficient credits."}}', 402),
        "complete",
        ModelConfigError,
        ("HTTP 402", "Insufficient credits"),
    ),
    ErrorRow(
        "openrouter-moderation-403",
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (403, moderation)",
        canned_json(
            '{"error":{"code":403,"message":"Input was flagged for moderation",'
            '"metadata":{"reasons":["harassment"],"flagged_input":"...",'
            '"provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}',
            403,
        ),
        "stream",
        ModelConfigError,
        ("access denied (HTTP 403)", "flagged"),
    ),
    ErrorRow(
        "azure-prompt-content-filter-400",
        "https://github.com/microsoft/azurechat/issues/351",
        canned_json(
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering Azure "
                    "OpenAI's content management policy. Please modify your prompt and retry.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {
                            "hate": {"filtered": False, "severity": "safe"},
                            "violence": {"filtered": True, "severity": "medium"},
                        },
                    },
                }
            },
            400,
        ),
        "stream",
        ModelRequestRefused,
        ("HTTP 400", "content management policy"),
    ),
    ErrorRow(
        "groq-tool-use-failed-400",
        "https://github.com/groq/groq-typescript/issues/103",
        canned_json(
            '{"error":{"message":"Failed to call a function. Please adjust your prompt. See '
            '\'failed_generation\' for more details.","type":"invalid_request_error",'
            '"code":"tool_use_failed","failed_generation":"<tool-use>{}</tool-use>"}}',
            400,
        ),
        "tools",
        ModelRequestRefused,
        ("HTTP 400", "Failed to call a function"),
    ),
    ErrorRow(
        "fastapi-422-validation",
        "vLLM/FastAPI request validation (detail: [{loc, msg, type}])",
        canned_json(
            '{"detail":[{"type":"missing","loc":["body","messages"],"msg":"Field required"}]}',
            422,
        ),
        "complete",
        ModelRequestRefused,
        ("HTTP 422", "Field required"),
    ),
    ErrorRow(
        "proxy-html-502",
        "nginx's default 502 page in front of a model server",
        canned_text(
            "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>"
            "502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n"
            "</html>\r\n",
            502,
            "text/html",
        ),
        "stream",
        ModelUnavailable,
        ("HTTP 502 from the server (an HTML page, probably a proxy)", "3 attempts"),
        attempts=3,
    ),
    ErrorRow(
        "html-404-wrong-base-url",
        "a web server's 404 page: model.base_url points at a site, not the API",
        canned_text(
            "<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
            "<body><h1>Not Found</h1></body></html>",
            404,
            "text/html; charset=utf-8",
        ),
        "tools",
        ModelConfigError,
        ("HTML page", "check model.base_url"),
    ),
    ErrorRow(
        "html-200-wrong-base-url",
        "a web UI answering 200 at the configured URL (Open WebUI, a router page)",
        canned_text(
            "<!doctype html><html><body>Sign in</body></html>", 200, "text/html; charset=utf-8"
        ),
        "complete",
        ModelConfigError,
        ("HTML page", "check model.base_url"),
    ),
    ErrorRow(
        "ollama-plain-404-page-not-found",
        "gin's plain-text 404 (Ollama without /v1 in the base URL)",
        canned_text("404 page not found", 404),
        "stream",
        ModelConfigError,
        ("endpoint not found (HTTP 404)", "check model.base_url", "404 page not found"),
    ),
    ErrorRow(
        "plain-text-500",
        "a server's bare 'Internal Server Error'",
        canned_text("Internal Server Error", 500),
        "complete",
        ModelUnavailable,
        ("HTTP 500", "Internal Server Error"),
        attempts=3,
    ),
    ErrorRow(
        "openai-rate-limit-429",
        "https://platform.openai.com/docs/guides/error-codes (rate_limit_exceeded)",
        canned_json(
            {
                "error": {
                    "message": "Rate limit reached for gpt-4o-mini in organization org-abc on "
                    "requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in "
                    "20s.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            429,
            FAST_RETRY,
        ),
        "tools",
        ModelRateLimited,
        ("HTTP 429", "3 attempts"),
        attempts=3,
    ),
    ErrorRow(
        "openrouter-error-event-mid-stream",
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (an SSE error event)",
        canned_sse(
            [
                chunk({"content": "Hel"}),
                {
                    "id": "cmpl-1",
                    "object": "chat.completion.chunk",
                    "error": {"code": "server_error", "message": "Provider disconnected"},
                    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
                },
            ]
        ),
        "stream",
        ModelResponseError,
        ("Provider disconnected",),
    ),
]


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def model(server: FakeOpenAI) -> AsyncIterator[OpenAIChatModel]:
    settings = ModelSettings(
        provider="openai",
        name="fake-model",
        base_url=server.base_url,
        api_key=SecretStr(FAKE_KEY),
        timeout=5.0,
        max_retries=2,
        max_tokens=MAX_TOKENS,
    )
    chat_model = OpenAIChatModel(settings)
    yield chat_model
    await chat_model.aclose()


async def collect(chat_model: OpenAIChatModel) -> tuple[list[str], StreamEnd]:
    deltas: list[str] = []
    async for event in chat_model.stream(MESSAGES):
        if isinstance(event, RetryingRequest):
            continue  # told to the user ("retrying 2/3…"); the answer follows
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            return deltas, event
    raise AssertionError("stream ended without StreamEnd")


async def run(chat_model: OpenAIChatModel, kind: Call) -> object:
    if kind == "tools":
        return await chat_model.call_tools(MESSAGES, TOOLS)
    if kind == "complete":
        return await chat_model.complete(MESSAGES)
    return await collect(chat_model)


def row_id(row: ToolsRow | StreamRow | CompleteRow | ErrorRow) -> str:
    return row.id


# --- the table ------------------------------------------------------------------------


@pytest.mark.parametrize("row", TOOLS_ROWS, ids=row_id)
async def test_call_tools_shape(row: ToolsRow, server: FakeOpenAI, model: OpenAIChatModel) -> None:
    server.queue_response(row.response)

    response = await model.call_tools(MESSAGES, TOOLS)

    assert response.text == row.text
    assert REASONING not in response.text
    got = [(c.name, c.arguments, c.error) for c in response.tool_calls]
    assert len(got) == len(row.calls), got
    for (name, arguments, error), (want_name, want_arguments, want_error) in zip(
        got, row.calls, strict=True
    ):
        assert (name, arguments) == (want_name, want_arguments)
        if want_error is None:
            assert error is None
        else:
            assert error is not None and want_error in error
    assert len({c.id for c in response.tool_calls}) == len(response.tool_calls)
    assert response.finish_reason == row.finish
    assert response.usage == row.usage


@pytest.mark.parametrize("row", STREAM_ROWS, ids=row_id)
async def test_stream_shape(row: StreamRow, server: FakeOpenAI, model: OpenAIChatModel) -> None:
    server.queue_response(row.response)

    deltas, end = await collect(model)

    assert "".join(deltas) == end.text == row.text
    assert all(deltas), "no empty deltas"
    assert not any(REASONING in delta or "think>" in delta for delta in deltas)
    assert end.finish_reason == row.finish
    assert end.usage == row.usage


@pytest.mark.parametrize("row", COMPLETE_ROWS, ids=row_id)
async def test_complete_shape(row: CompleteRow, server: FakeOpenAI, model: OpenAIChatModel) -> None:
    server.queue_response(row.response)

    completion = await model.complete(MESSAGES, json_object=True)

    assert completion.text == row.text
    assert completion.finish_reason == row.finish
    assert completion.usage == row.usage
    [request] = server.requests
    assert request["response_format"] == {"type": "json_object"}
    assert "tools" not in request and "stream" not in request


@pytest.mark.parametrize("row", ERROR_ROWS, ids=row_id)
async def test_error_shape(row: ErrorRow, server: FakeOpenAI, model: OpenAIChatModel) -> None:
    server.queue_response(*[row.response] * row.attempts)

    with pytest.raises(ModelError) as caught:
        await run(model, row.call)

    error = caught.value
    assert type(error) is row.error, repr(error)
    message = str(error)
    for word in row.words:
        assert word in message, message
    assert error.permanent is (row.error not in TRANSIENT)
    assert server.request_count == row.attempts  # permanent ones are sent once
    assert "\n" not in message and "<" not in message
    assert FAKE_KEY not in message and "SECRET" not in message
    assert "(fake-model at http://127.0.0.1:" in message


TRANSIENT = (ModelUnavailable, ModelRateLimited, ModelResponseError)


# --- requests: fields sent, and the one-time fallbacks -------------------------------


async def test_request_max_tokens_and_no_tool_choice(
    server: FakeOpenAI, model: OpenAIChatModel
) -> None:
    await collect(model)
    await model.call_tools(MESSAGES, TOOLS)
    await model.complete(MESSAGES)

    stream, tools, complete = server.requests
    assert [r["max_tokens"] for r in (stream, tools, complete)] == [MAX_TOKENS] * 3
    assert "tool_choice" not in tools  # servers default to auto
    assert "response_format" not in complete


async def test_request_force_sends_tool_choice(server: FakeOpenAI, model: OpenAIChatModel) -> None:
    response = await model.call_tools(MESSAGES, TOOLS, force="add_memory")

    assert response.tool_calls[0].name == "add_memory"
    assert server.requests[-1]["tool_choice"] == {
        "type": "function",
        "function": {"name": "add_memory"},
    }


async def test_request_named_tool_choice_fallback(
    server: FakeOpenAI, model: OpenAIChatModel
) -> None:
    # https://github.com/zed-industries/zed/issues/36094 (OpenRouter)
    refusal = canned_json(
        '{"error":{"message":"No endpoints found that support the provided \'tool_choice\' '
        "value. To learn more about provider routing, visit: "
        'https://openrouter.ai/docs/provider-routing","code":404}}',
        404,
    )
    server.queue_response(refusal, refusal)

    first = await model.call_tools(MESSAGES, TOOLS[:1], force="add_memory")
    second = await model.call_tools(MESSAGES, TOOLS[:1], force="add_memory")

    assert [call.name for call in (*first.tool_calls, *second.tool_calls)] == ["add_memory"] * 2
    named, required, omitted, later = server.requests
    assert named["tool_choice"] == {"type": "function", "function": {"name": "add_memory"}}
    assert required["tool_choice"] == "required"
    assert "tool_choice" not in omitted and "tool_choice" not in later


async def test_request_max_completion_tokens_fallback(
    server: FakeOpenAI, model: OpenAIChatModel
) -> None:
    # https://github.com/griptape-ai/ComfyUI-Griptape/issues/312 (gpt-5, o-series)
    server.queue_response(
        canned_json(
            {
                "error": {
                    "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                    "model. Use 'max_completion_tokens' instead.",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": "unsupported_parameter",
                }
            },
            400,
        )
    )

    _, end = await collect(model)
    await model.call_tools(MESSAGES, TOOLS)

    assert end.text.startswith("Echo:")
    first, retried, later = server.requests
    assert first["max_tokens"] == MAX_TOKENS and "max_completion_tokens" not in first
    assert retried["max_completion_tokens"] == MAX_TOKENS and "max_tokens" not in retried
    assert later["max_completion_tokens"] == MAX_TOKENS and "max_tokens" not in later


@pytest.mark.parametrize(
    "refusal",
    [
        # https://github.com/lmstudio-ai/lmstudio-bug-tracker/issues/189
        canned_json("{\"error\":\"'response_format.type' must be 'json_schema' or 'text'\"}", 400),
        # https://github.com/openai/openai-node/issues/439
        canned_json(
            {
                "error": {
                    "message": "Invalid parameter: 'response_format' of type 'json_object' is "
                    "not supported with this model.",
                    "type": "invalid_request_error",
                    "param": "response_format",
                    "code": None,
                }
            },
            400,
        ),
    ],
    ids=["lmstudio-response-format", "openai-response-format"],
)
async def test_request_response_format_fallback(
    refusal: CannedResponse, server: FakeOpenAI, model: OpenAIChatModel
) -> None:
    server.queue_response(refusal)

    first = await model.complete(MESSAGES, json_object=True)
    second = await model.complete(MESSAGES, json_object=True)

    assert first.text == second.text == "Echo: I like tea."
    refused, retried, later = server.requests
    assert refused["response_format"] == {"type": "json_object"}
    assert "response_format" not in retried and "response_format" not in later


async def test_request_refusal_of_another_field_is_not_retried(
    server: FakeOpenAI, model: OpenAIChatModel
) -> None:
    # A refusal that names no field this model can drop is final, after one request.
    server.queue_response(canned_json('{"error":{"message":"temperature: bad value"}}', 400))

    with pytest.raises(ModelRequestRefused):
        await model.complete(MESSAGES, json_object=True)

    assert server.request_count == 1


def test_endpoint_names_model_and_server(model: OpenAIChatModel, server: FakeOpenAI) -> None:
    assert model.endpoint == f"fake-model @ {server.base_url}"


# --- the documentation --------------------------------------------------------------


def test_every_row_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8")
    rows = [*TOOLS_ROWS, *STREAM_ROWS, *COMPLETE_ROWS, *ERROR_ROWS]
    ids = [row.id for row in rows]
    assert len(ids) == len(set(ids))
    missing = [row_id for row_id in ids if f"[{row_id}]" not in doc]
    assert not missing, f"rows missing from {DOC.name}: {missing}"
