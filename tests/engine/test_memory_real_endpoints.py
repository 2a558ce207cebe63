"""Memory jobs against endpoints that behave like real ones, over real HTTP, on a real database.

Each test gives the fake server the answer a real provider gives (no tool
call, a refusal of tools, JSON in prose, too many calls, a permanent error)
and checks where the job ends: done with the memories, done with a note that
says why nothing was stored, or failed with one clear line, never stuck and
never silently empty.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI, canned_json, canned_sse
from engine.agent import TurnCompleted, TurnFailed
from engine.config import Settings
from engine.extraction import EndpointModes
from engine.queue import JobQueue
from engine.records import MemoryJob
from engine.runtime import Runtime, open_runtime
from tests.conftest import make_settings

pytestmark = pytest.mark.db

TOOLS_REFUSED = {
    # Ollama's answer for a model without tool support (its /v1 error object).
    "error": {
        "message": "registry.ollama.ai/library/gemma:2b does not support tools",
        "type": "api_error",
        "param": None,
        "code": None,
    }
}


def _settings(tmp_path: Path, dsn: str, fake: FakeOpenAI, **memory: Any) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": dsn, "pool_max_size": 10},
        model={"provider": "openai", "base_url": fake.base_url, "max_retries": 0, "timeout": 5},
        memory={"retry_delay": 0.01, "drain_timeout": 10, **memory},
    )


@pytest.fixture
async def rt_factory(tmp_path: Path, database_dsn: str, fake: FakeOpenAI) -> AsyncIterator[Any]:
    opened: list[Any] = []

    async def open_one(**memory: Any) -> Runtime:
        context = open_runtime(_settings(tmp_path, database_dsn, fake, **memory), run_workers=False)
        opened.append(context)
        return await context.__aenter__()

    yield open_one
    for context in reversed(opened):
        await context.__aexit__(None, None, None)


async def _turn(rt: Runtime, user: str, text: str) -> int:
    async with rt.store.scope(user) as s:
        await s.ensure_user()
        sid = (await s.create_session()).session_id
    end = await rt.agent.run(user, sid, text)
    assert isinstance(end, TurnCompleted), end
    async with rt.store.scope(user) as s:
        job = await JobQueue.job_for_reply(s, end.reply.message_id)
    assert job is not None
    return job.job_id


async def _ann_session(rt: Runtime) -> uuid.UUID:
    async with rt.store.scope("ann") as s:
        return (await s.create_session()).session_id


async def _settle(rt: Runtime, user: str, job_id: int) -> MemoryJob:
    job = await rt.dispatcher.run_own_jobs(user, job_id, within=20)
    assert job is not None and job.status in ("done", "failed"), job
    return job


async def _memories(rt: Runtime, user: str) -> list[str]:
    async with rt.store.scope(user) as s:
        return sorted(m.content for m in await s.list_memories())


def _completion(content: str | None, **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
    }


@pytest.mark.parametrize(
    "message",
    [{}, {"tool_calls": None}, {"tool_calls": []}],
    ids=["tool_calls absent (OpenAI)", "tool_calls null", "tool_calls []"],
)
async def test_an_answer_without_tool_calls_is_a_done_job_with_nothing_to_remember(
    rt_factory: Any, fake: FakeOpenAI, message: dict[str, Any]
) -> None:
    rt = await rt_factory(extraction="tools")
    job_id = await _turn(rt, "ann", "Nice weather today.")
    fake.queue_response(canned_json(_completion("Nothing to remember.", **message)))
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.attempts, job.last_error, job.note) == ("done", 1, None, None)
    assert (job.extraction, job.prompt_tokens, job.completion_tokens) == ("tools", 120, 9)
    assert await _memories(rt, "ann") == []


async def test_auto_switches_an_endpoint_that_refuses_tools_to_json_and_remembers(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory()  # extraction = "auto", the default
    job_id = await _turn(rt, "ann", "My name is Ann and I like kites.")
    fake.queue_response(
        canned_json(TOOLS_REFUSED, status=400),  # the probe
        canned_json(_completion('```json\n{"add": ["Name is Ann", "Likes kites"]}\n```')),
    )
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.extraction, job.note) == ("done", "json", None)
    assert await _memories(rt, "ann") == ["Likes kites", "Name is Ann"]
    json_request = fake.requests[-1]
    assert "tools" not in json_request
    assert json_request["response_format"] == {"type": "json_object"}
    learnt = EndpointModes().get(rt.memory_model.endpoint)
    assert (
        learnt is not None and learnt.mode == "json" and "does not support tools" in learnt.reason
    )

    # Remembered: the next job asks in json at once, without a probe.
    before = len(fake.requests)
    job_id = await _turn(rt, "ann", "I live in Oslo.")
    fake.queue_response(canned_json(_completion('{"add": ["Lives in Oslo"]}')))
    assert (await _settle(rt, "ann", job_id)).status == "done"
    chat_and_memory = fake.requests[before:]
    assert len(chat_and_memory) == 2 and "tools" not in chat_and_memory[1]
    assert "Lives in Oslo" in await _memories(rt, "ann")


async def test_auto_detects_an_endpoint_that_ignores_tools(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    # llama.cpp's default chat format and many shims drop `tools`: a forced
    # call comes back as plain text.
    rt = await rt_factory()
    job_id = await _turn(rt, "ann", "I like tea.")
    fake.queue_response(
        canned_json(_completion("I would call memchat_probe now.")),
        canned_json(_completion('Here you go: {"add": ["Likes tea"]}')),
    )
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.extraction) == ("done", "json")
    assert await _memories(rt, "ann") == ["Likes tea"]
    assert rt.dispatcher.manager.mode_label() == "json (auto)"


async def test_a_json_answer_without_changes_says_so_on_the_job(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory(extraction="json")
    job_id = await _turn(rt, "ann", "I like tea.")
    fake.queue_response(canned_json(_completion("The user enjoys tea, it seems.")))
    job = await _settle(rt, "ann", job_id)
    assert job.status == "done" and job.last_error is None
    assert job.note == (
        "the model's answer held no JSON change list: 'The user enjoys tea, it seems.'"
    )


async def test_tools_set_explicitly_on_an_endpoint_without_tools_fails_once_with_the_fix(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory(extraction="tools", max_attempts=3)
    job_id = await _turn(rt, "ann", "I like tea.")
    fake.queue_response(canned_json(TOOLS_REFUSED, status=400))
    job = await _settle(rt, "ann", job_id)
    # Permanent: one model call, not max_attempts of them.
    assert (job.status, job.attempts) == ("failed", 1)
    assert job.last_error is not None
    assert "does not support tools" in job.last_error
    assert 'set memory.extraction = "json" (or "auto")' in job.last_error


async def test_an_unknown_model_fails_the_job_at_once(rt_factory: Any, fake: FakeOpenAI) -> None:
    rt = await rt_factory(extraction="tools", max_attempts=3)
    job_id = await _turn(rt, "ann", "I like tea.")
    before = len(fake.requests)
    fake.queue_response(
        canned_json({"error": {"message": 'model "m" not found, try pulling it first'}}, 404)
    )
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert len(fake.requests) - before == 1
    assert job.last_error is not None and "not found" in job.last_error


async def test_a_transient_failure_then_success_leaves_no_stale_error(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory(extraction="tools", max_attempts=3)
    job_id = await _turn(rt, "ann", "My name is Ann.")
    fake.fail_next("500")
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.attempts, job.last_error) == ("done", 2, None)
    assert job.note is not None and job.note.startswith("succeeded after: model server error")
    assert await _memories(rt, "ann") == ["My name is Ann."]


async def test_calls_over_the_per_job_bound_are_refused_and_noted(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory(extraction="tools", max_calls_per_job=5)
    job_id = await _turn(rt, "ann", "Remember these.")
    fake.queue_tool_calls(
        [{"name": "add_memory", "arguments": {"memory": f"Fact {i}"}} for i in range(30)]
    )
    job = await _settle(rt, "ann", job_id)
    assert job.status == "done"
    assert await _memories(rt, "ann") == [f"Fact {i}" for i in range(5)]
    assert job.note == "refused 25 change(s) over memory.max_calls_per_job (5)"


async def test_adds_past_the_per_user_bound_are_refused_and_noted(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    rt = await rt_factory(extraction="tools", max_per_user=3)
    job_id = await _turn(rt, "ann", "Remember these.")
    fake.queue_tool_calls(
        [{"name": "add_memory", "arguments": {"memory": f"Fact {i}"}} for i in range(5)]
    )
    job = await _settle(rt, "ann", job_id)
    assert await _memories(rt, "ann") == ["Fact 0", "Fact 1", "Fact 2"]
    assert job.note == "refused 2 new memories: the user has memory.max_per_user (3)"

    # A delete in the same answer makes room for one more add.
    job_id = await _turn(rt, "ann", "Forget fact 0, remember fact 9.")
    fake.queue_tool_calls(
        [
            {"name": "delete_memory", "arguments": {"id": "m3"}},  # newest first: m3 = Fact 0
            {"name": "add_memory", "arguments": {"memory": "Fact 9"}},
            {"name": "add_memory", "arguments": {"memory": "Fact 10"}},
        ]
    )
    job = await _settle(rt, "ann", job_id)
    assert await _memories(rt, "ann") == ["Fact 1", "Fact 2", "Fact 9"]
    assert job.note == "refused 1 new memory: the user has memory.max_per_user (3)"


async def test_a_deeply_nested_call_is_refused_alone(rt_factory: Any, fake: FakeOpenAI) -> None:
    rt = await rt_factory(extraction="tools")
    job_id = await _turn(rt, "ann", "I like tea.")
    deep = '{"memory": ' + "[" * 50_000 + "]" * 50_000 + "}"
    fake.queue_tool_calls(
        [
            {"name": "add_memory", "arguments": deep},
            {"name": "add_memory", "arguments": {"memory": "Likes tea"}},
        ]
    )
    job = await _settle(rt, "ann", job_id)
    assert job.status == "done"
    assert await _memories(rt, "ann") == ["Likes tea"]
    assert job.note is not None and job.note.startswith(
        "rejected 1: add_memory: unusable arguments"
    )


async def test_extraction_waits_while_a_reply_streams(rt_factory: Any, fake: FakeOpenAI) -> None:
    rt = await rt_factory(extraction="tools", pause_while_streaming=True)
    job_id = await _turn(rt, "ann", "I like tea.")
    with rt.agent.priority.replying():  # a reply of this process is streaming
        task = asyncio.create_task(rt.dispatcher.run_own_jobs("ann", job_id, within=20))
        while True:  # wait for the claim: the job is running, its model call held back
            async with rt.store.scope("ann") as s:
                job = await JobQueue.get_job(s, job_id)
            if job is not None and job.status == "running":
                break
            await asyncio.sleep(0.01)
        requests = len(fake.requests)
        await asyncio.sleep(0)  # let the job task reach its wait
        assert len(fake.requests) == requests and not task.done()
    job = await task
    assert job is not None and job.status == "done"
    assert len(fake.requests) == requests + 1


async def test_a_reply_over_max_reply_chars_is_cut_and_marked(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake)
    settings.limits.max_reply_chars = 40
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _ann_session(rt)
        fake.queue_response(
            canned_sse(
                [
                    {"choices": [{"index": 0, "delta": {"content": "word " * 10}}]}
                    for _ in range(1000)  # 50,000 characters, far past the limit
                ]
            )
        )
        end = await rt.agent.run("ann", sid, "Talk forever.")
        assert isinstance(end, TurnCompleted)
        assert end.reply.content == (
            "word " * 8 + "\n\n*[reply cut: longer than limits.max_reply_chars (40 characters)]*"
        )


@pytest.mark.parametrize(
    ("finish", "outcome"),
    [
        ("length", "*[reply cut off: it reached model.max_tokens (2,048 tokens)]*"),
        ("content_filter", "the provider's content filter stopped the reply"),
    ],
)
async def test_finish_reasons_are_marked(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, finish: str, outcome: str
) -> None:
    async with open_runtime(_settings(tmp_path, database_dsn, fake), run_workers=False) as rt:
        sid = await _ann_session(rt)
        fake.queue_response(
            canned_sse(
                [
                    {"choices": [{"index": 0, "delta": {"content": "Once upon"}}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                    {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 2}},
                ]
            )
        )
        end = await rt.agent.run("ann", sid, "Tell me a story.")
        if finish == "length":
            assert isinstance(end, TurnCompleted)
            assert end.reply.content.startswith("Once upon\n\n") and end.reply.content.endswith(
                outcome
            )
            assert (end.reply.prompt_tokens, end.reply.completion_tokens) == (30, 2)
        else:
            assert isinstance(end, TurnFailed) and end.error == outcome
            assert end.reply.content == "Once upon"  # what came is kept


async def test_history_is_fitted_to_the_context_oldest_first(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake)
    settings.model.context_tokens = 1000
    settings.model.max_tokens = 200
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _ann_session(rt)
        for i in range(10):
            end = await rt.agent.run("ann", sid, f"turn {i} " + "x" * 300)
            assert isinstance(end, TurnCompleted)
        sent = fake.requests[-1]["messages"]
        chars = sum(len(m["content"]) for m in sent)
        assert chars <= (1000 - 200) * 3, "the prompt fits the window, on the safe side"
        assert sent[-1]["content"].startswith("turn 9 ")
        assert sent[1]["content"] != "turn 0 " + "x" * 300, "the oldest went first"
        users = [m["content"][:7] for m in sent if m["role"] == "user"]
        assert users == sorted(users) and len(users) >= 2, "newest kept, in order"


async def test_a_message_that_cannot_fit_fails_without_a_model_call_and_is_kept(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake)
    settings.model.context_tokens = 1000
    settings.model.max_tokens = 200
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _ann_session(rt)
        before = len(fake.requests)
        end = await rt.agent.run("ann", sid, "y" * 5000)
        assert isinstance(end, TurnFailed)
        assert end.error == (
            "the message is too long for the model's context (model.context_tokens = 1000, "
            "of which model.max_tokens = 200 is kept for the reply)"
        )
        assert len(fake.requests) == before
        async with rt.store.scope("ann") as s:
            stored = await s.last_messages(sid, 5)
        assert [m.content for m in stored if m.role == "user"] == ["y" * 5000]


async def test_every_request_carries_max_tokens(rt_factory: Any, fake: FakeOpenAI) -> None:
    rt = await rt_factory(extraction="tools", max_tokens=77)
    job_id = await _turn(rt, "ann", "I like tea.")
    await _settle(rt, "ann", job_id)
    chat, memory = fake.requests[-2:]
    assert chat.get("max_tokens") == 2048 and memory.get("max_tokens") == 77
    assert json.dumps(memory).count("add_memory") >= 1


async def test_a_memory_model_of_its_own(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    with FakeOpenAI() as memory_server:
        settings = make_settings(
            tmp_path,
            database={"url": database_dsn},
            model={"base_url": fake.base_url, "api_key": "sk-chat-only-secret", "name": "big"},
            memory={
                "base_url": memory_server.base_url,
                "model": "small",
                "max_tokens": 99,
                "extraction": "tools",
            },
        )
        async with open_runtime(settings, run_workers=False) as rt:
            job_id = await _turn(rt, "ann", "My name is Ann.")
            job = await _settle(rt, "ann", job_id)
        assert job.status == "done"
        assert [r["model"] for r in fake.requests] == ["big"], "chat only"
        extraction = memory_server.requests[-1]
        assert (extraction["model"], extraction["max_tokens"]) == ("small", 99)
        assert "tools" in extraction


def test_the_chat_key_goes_only_to_the_chat_endpoint() -> None:
    from pydantic import SecretStr

    from engine.config import MemorySettings, ModelSettings, memory_model_settings

    chat = ModelSettings(base_url="https://api.example/v1", api_key=SecretStr("sk-chat"))
    same = memory_model_settings(chat, MemorySettings(model="mini"))
    assert same.api_key == chat.api_key and same.base_url == chat.base_url and same.name == "mini"
    other = memory_model_settings(chat, MemorySettings(base_url="http://127.0.0.1:8080/v1"))
    assert other.api_key is None and other.base_url == "http://127.0.0.1:8080/v1"
    own = memory_model_settings(
        chat, MemorySettings(base_url="http://h/v1", api_key=SecretStr("sk-mem"))
    )
    assert own.api_key is not None and own.api_key.get_secret_value() == "sk-mem"
    offline = memory_model_settings(ModelSettings(), MemorySettings())
    assert offline.resolved_provider == "offline"


async def test_an_endpoint_that_calls_tools_only_when_forced_gets_json(
    rt_factory: Any, fake: FakeOpenAI
) -> None:
    # llama-cpp-python honours a forced tool_choice in any chat format (a
    # grammar) yet ignores `tools` otherwise (tests/real_model/captured/).
    rt = await rt_factory()
    job_id = await _turn(rt, "ann", "I like tea.")
    forced_call = _completion(
        None,
        tool_calls=[
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "memchat_probe", "arguments": '{"ok": true}'},
            }
        ],
    )
    fake.queue_response(
        canned_json(forced_call),
        canned_json(_completion("Sure, I can help with that.")),
        canned_json(_completion('{"add": ["Likes tea"]}')),
    )
    job = await _settle(rt, "ann", job_id)
    assert (job.status, job.extraction) == ("done", "json")
    learnt = EndpointModes().get(rt.memory_model.endpoint)
    assert learnt is not None and learnt.reason == (
        "the endpoint calls tools only when forced, and extraction does not force"
    )
    assert await _memories(rt, "ann") == ["Likes tea"]


async def test_a_copy_of_the_prompts_example_is_refused(rt_factory: Any, fake: FakeOpenAI) -> None:
    rt = await rt_factory(extraction="json")
    job_id = await _turn(rt, "ann", "I like tea.")
    fake.queue_response(
        canned_json(_completion('{"add": ["Name is Ana Lima", "Likes tea"], "delete": []}'))
    )
    job = await _settle(rt, "ann", job_id)
    assert await _memories(rt, "ann") == ["Likes tea"]
    assert job.note == (
        "rejected 1: add_memory: copies the prompt's example, not something the user said"
    )


async def test_an_empty_reply_stream_names_the_likely_cause(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    async with open_runtime(_settings(tmp_path, database_dsn, fake), run_workers=False) as rt:
        sid = await _ann_session(rt)
        # llama.cpp's answer to a streamed prompt over its window: 200, no body.
        fake.queue_response(canned_sse([], done=False))
        end = await rt.agent.run("ann", sid, "Hello")
        assert isinstance(end, TurnFailed)
        assert end.error.startswith(
            "the server ended the reply stream without sending anything (a prompt over the "
            "server's context window does this: is model.context_tokens at most the "
            "server's window?)"
        )


async def test_a_failed_turn_is_left_out_of_later_prompts(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    async with open_runtime(_settings(tmp_path, database_dsn, fake), run_workers=False) as rt:
        sid = await _ann_session(rt)
        fake.queue_response(canned_sse([], done=False))
        assert isinstance(await rt.agent.run("ann", sid, "poison " * 50), TurnFailed)
        end = await rt.agent.run("ann", sid, "Hello again")
        assert isinstance(end, TurnCompleted)
        sent = [m["content"] for m in fake.requests[-1]["messages"] if m["role"] != "system"]
        assert sent == ["Hello again"], "the failed turn's message is not sent again"


async def test_digits_count_a_token_each_so_a_long_number_fails_before_sending(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, database_dsn, fake)
    settings.model.context_tokens = 4096
    settings.model.max_tokens = 64
    async with open_runtime(settings, run_workers=False) as rt:
        sid = await _ann_session(rt)
        before = len(fake.requests)
        end = await rt.agent.run("ann", sid, "1234567890" * 850)  # ~8,500 tokens for small models
        assert isinstance(end, TurnFailed) and "too long for the model's context" in end.error
        assert len(fake.requests) == before
