"""Memory consolidation (`memchat memory optimize`) on a real database.

The offline model gives the deterministic cases (duplicates and outdated
single-valued facts deleted, audited, restorable); real HTTP to the fake
OpenAI-compatible server gives what a real endpoint may answer: a merge, no
change at all, the json form, and a hostile answer naming ids it was not shown.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bench.fake_openai import FakeOpenAI, canned_json
from engine.agent import TurnCompleted
from engine.config import Settings, memory_model_settings
from engine.consolidate import ACTOR, Consolidator, batches
from engine.errors import NotFound
from engine.memory import MemoryManager
from engine.memory_history import restore_event
from engine.models import OfflineChatModel, create_model
from engine.optimize_policy import OptimizePolicy
from engine.runtime import open_runtime
from engine.store import Store
from tests.conftest import make_settings

pytestmark = pytest.mark.db


async def _remember(store: Store, user: str, *texts: str) -> None:
    async with store.scope(user) as s:
        await s.ensure_user()
    for text in texts:  # one transaction each: updated_at orders them oldest first
        async with store.scope(user) as s:
            assert await s.add_memory(text) is not None


async def _texts(store: Store, user: str) -> list[str]:
    async with store.scope(user) as s:
        return sorted(m.content for m in await s.list_memories())


def _offline(store: Store, settings: Settings) -> Consolidator:
    manager = MemoryManager(OfflineChatModel(), settings.memory)
    return Consolidator(store, manager, context_tokens=settings.model.context_tokens)


async def test_offline_deletes_duplicates_and_outdated_facts_audited_and_restorable(
    store: Store, settings: Settings
) -> None:
    await _remember(
        store,
        "ann",
        "Likes green tea",
        "Name is Mark",
        "Lives in Porto",
        "Loves green tea!",
        "Name is Marcus",
    )
    await _remember(store, "bob", "Likes green tea", "Loves green tea")

    result = await _offline(store, settings).run("ann")

    assert (result.before, result.after, result.updated, result.deleted) == (5, 3, 0, 2)
    assert result.summary() == "ann: optimized 0 merged, 2 removed; 5 → 3 memories"
    assert await _texts(store, "ann") == ["Lives in Porto", "Loves green tea!", "Name is Marcus"]
    assert await _texts(store, "bob") == ["Likes green tea", "Loves green tea"]
    async with store.scope("ann") as s:
        events = [e for e in await s.memory_events() if e.actor == ACTOR]
    assert sorted((e.op, e.before, e.after) for e in events) == [
        ("delete", "Likes green tea", None),
        ("delete", "Name is Mark", None),
    ]
    # The history holds the before text: the change can be undone.
    mark = next(e for e in events if e.before == "Name is Mark")
    async with store.scope("ann") as s:
        restored = await restore_event(s, mark.event_id)
    assert (restored.action, restored.memory.content) == ("re-added", "Name is Mark")
    assert "Name is Mark" in await _texts(store, "ann")
    # bob cannot undo ann's change: her event does not exist for him.
    async with store.scope("bob") as s:
        with pytest.raises(NotFound):
            await restore_event(s, mark.event_id)


async def test_dry_run_changes_nothing(store: Store, settings: Settings) -> None:
    await _remember(store, "ann", "Is 30 years old", "Is 31 years old", "Likes kites")
    result = await _offline(store, settings).run("ann", dry_run=True)
    assert [(c.op, c.memory.content) for c in result.changes] == [("delete", "Is 30 years old")]
    assert result.summary() == "ann: would change 0 merged, 1 removed; 3 → 2 memories"
    assert await _texts(store, "ann") == ["Is 30 years old", "Is 31 years old", "Likes kites"]
    async with store.scope("ann") as s:
        assert not [e for e in await s.memory_events() if e.actor == ACTOR]


async def test_distinct_memories_are_nothing_to_merge(store: Store, settings: Settings) -> None:
    await _remember(store, "ann", "Likes kites", "Dislikes kites", "Works as a nurse")
    result = await _offline(store, settings).run("ann")
    assert (result.changes, result.rejected) == ([], [])
    assert result.summary() == "ann: nothing to merge (3 memories)"


async def test_unknown_user_is_not_found(store: Store, settings: Settings) -> None:
    with pytest.raises(NotFound, match="no user 'nobody'"):
        await _offline(store, settings).run("nobody")


def test_batches_fit_the_budget_and_keep_related_memories_together() -> None:
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4

    from engine.records import Memory

    start = datetime(2026, 1, 1, tzinfo=UTC)
    texts = [f"Likes topic number {i:04d}" for i in range(300)] + ["Name is A", "Name is B"]
    memories = [
        Memory(uuid4(), "ann", t, (), None, None, start, start + timedelta(seconds=i))
        for i, t in enumerate(texts)
    ]
    cut = batches(memories, budget=400)
    assert sum(len(b) for b in cut) == len(memories)
    assert all(sum(len(m.content) // 3 + 8 for m in b) <= 400 + 20 for b in cut)
    names = [b for b in cut if any(m.content.startswith("Name") for m in b)]
    assert len(names) == 1  # sorted by text: both names meet in one request
    assert all(
        [m.updated_at for m in b] == sorted(m.updated_at for m in b) for b in cut
    )  # each request oldest first


# -- real HTTP to an OpenAI-compatible server ----------------------------------------


def _http_settings(tmp_path: Path, dsn: str, fake: FakeOpenAI, **memory: Any) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": dsn, "pool_max_size": 10},
        model={"provider": "openai", "base_url": fake.base_url, "max_retries": 0, "timeout": 5},
        memory={"extraction": "tools", **memory},
    )


async def _over_http(settings: Settings, store: Store, user: str, **kw: Any) -> Any:
    model = create_model(memory_model_settings(settings.model, settings.memory))
    try:
        manager = MemoryManager(model, settings.memory)
        consolidator = Consolidator(store, manager, context_tokens=settings.model.context_tokens)
        return await consolidator.run(user, **kw)
    finally:
        await model.aclose()


def _aliases(request: dict[str, Any]) -> dict[str, str]:
    """alias -> text, as the model was shown them."""
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    lines = [line for line in user.splitlines() if line.startswith("[m")]
    return {line[1 : line.index("]")]: line[line.index("]") + 2 :] for line in lines}


async def test_a_merge_over_http_is_an_audited_update_and_delete(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, store: Store
) -> None:
    settings = _http_settings(tmp_path, database_dsn, fake)
    await _remember(store, "ann", "Likes green tea", "Drinks coffee", "Likes coffee too")
    fake.queue_tool_calls(
        [
            {"name": "update_memory", "arguments": {"id": "m2", "memory": "Likes coffee"}},
            {"name": "delete_memory", "arguments": {"id": "m3"}},
        ]
    )
    result = await _over_http(settings, store, "ann")
    shown = _aliases(fake.requests[-1])
    assert shown == {"m1": "Likes green tea", "m2": "Drinks coffee", "m3": "Likes coffee too"}
    assert fake.requests[-1]["tools"][0]["function"]["name"] == "update_memory"
    assert (result.updated, result.deleted, result.before, result.after) == (1, 1, 3, 2)
    assert await _texts(store, "ann") == ["Likes coffee", "Likes green tea"]
    async with store.scope("ann") as s:
        events = [(e.op, e.before, e.after) for e in await s.memory_events() if e.actor == ACTOR]
    assert sorted(events) == [
        ("delete", "Likes coffee too", None),
        ("update", "Drinks coffee", "Likes coffee"),
    ]


async def test_a_hostile_answer_reaches_only_what_it_was_shown(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, store: Store
) -> None:
    settings = _http_settings(tmp_path, database_dsn, fake)
    await _remember(store, "ann", "Likes tea", "Likes tea a lot")
    await _remember(store, "bob", "Likes tea", "Is a pilot")
    async with store.scope("bob") as s:
        bob_ids = [str(m.memory_id) for m in await s.list_memories()]
    fake.queue_tool_calls(
        [{"name": "delete_memory", "arguments": {"id": bob_id}} for bob_id in bob_ids]
        + [
            {"name": "update_memory", "arguments": {"id": bob_ids[0], "memory": "Owned"}},
            {"name": "delete_memory", "arguments": {"id": "m9"}},
            {"name": "add_memory", "arguments": {"memory": "Is a spy"}},
            {"name": "delete_memory", "arguments": {"id": "m1"}},
            {"name": "update_memory", "arguments": {"id": "m1", "memory": "again"}},
            {"name": "delete_memory", "arguments": {"id": "m2"}},  # would empty the list
            {"name": "delete_memory", "arguments": "{not json"},
        ]
    )
    result = await _over_http(settings, store, "ann")
    assert [(c.op, c.memory.content) for c in result.changes] == [("delete", "Likes tea")]
    assert len(result.rejected) == 8
    assert sum("unknown memory id" in r for r in result.rejected) == 4
    assert any("only update and delete" in r for r in result.rejected)
    assert any("already changed" in r for r in result.rejected)
    assert any("every memory shown" in r for r in result.rejected)
    assert any("unusable arguments" in r for r in result.rejected)
    assert await _texts(store, "ann") == ["Likes tea a lot"]
    assert await _texts(store, "bob") == ["Is a pilot", "Likes tea"]
    async with store.scope("bob") as s:
        assert [e.actor for e in await s.memory_events()] == ["user", "user"]


async def test_an_answer_without_changes_is_nothing_to_merge(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, store: Store
) -> None:
    settings = _http_settings(tmp_path, database_dsn, fake)
    await _remember(store, "ann", "Likes tea", "Is a pilot")
    fake.queue_tool_calls([])
    result = await _over_http(settings, store, "ann")
    assert result.requests == 1
    assert result.summary() == "ann: nothing to merge (2 memories)"
    assert await _texts(store, "ann") == ["Is a pilot", "Likes tea"]


async def test_json_mode_endpoint_is_asked_for_one_object(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, store: Store
) -> None:
    settings = _http_settings(tmp_path, database_dsn, fake, extraction="json")
    await _remember(store, "ann", "Name is Ann", "Name is Anna", "Likes kites")
    answer = '```json\n{"delete": ["m1"]}\n```'
    fake.queue_response(
        canned_json(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
            }
        )
    )
    result = await _over_http(settings, store, "ann")
    request = fake.requests[-1]
    assert "tools" not in request and request["response_format"] == {"type": "json_object"}
    deleted = _aliases(request)["m1"]
    assert [(c.op, c.memory.content) for c in result.changes] == [("delete", deleted)]
    assert len(await _texts(store, "ann")) == 2


# -- the command, as a real process ---------------------------------------------------


def test_the_cli_optimizes_restores_and_refuses_bad_input_in_one_line(memchat: Any) -> None:
    for text in ("Likes tea", "Loves tea", "Is a pilot"):
        assert memchat("memory", "add", "--user", "ann", text).returncode == 0

    dry = memchat("memory", "optimize", "--user", "ann", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "ann: would change 0 merged, 1 removed; 3 → 2 memories"
    assert "Likes tea" in dry.stdout
    assert len(json.loads(memchat("memories", "--user", "ann", "--json").stdout)) == 3

    done = memchat("memory", "optimize", "--user", "ann", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["before"], report["after"], report["removed"]) == (3, 2, 1)
    assert [c["before"] for c in report["changes"]] == ["Likes tea"]

    again = memchat("memory", "optimize", "--user", "ann")
    assert again.stdout.strip() == "ann: nothing to merge (2 memories)"

    history = json.loads(memchat("memories", "--user", "ann", "--history", "--json").stdout)
    event = next(e for e in history if e["actor"] == "optimize")
    undo = memchat("memory", "restore", "--user", "ann", "--event", str(event["event_id"]))
    assert undo.returncode == 0, undo.stderr
    assert undo.stdout.startswith(f"change {event['event_id']} (delete) undone: re-added ")
    texts = sorted(
        m["content"] for m in json.loads(memchat("memories", "--user", "ann", "--json").stdout)
    )
    assert texts == ["Is a pilot", "Likes tea", "Loves tea"]

    for args, code, says in [
        (("memory", "optimize", "--user", "nobody"), 3, "error: no user 'nobody'"),
        (("memory", "optimize", "--user", "a\x1b[2Jb"), 2, "error: "),
        (("memory", "optimize"), 2, "memchat: error: the following arguments are required"),
        (("memory", "restore", "--user", "ann", "--event", "x1"), 2, "not an event number"),
        (("memory", "restore", "--user", "ann", "--event", "0"), 2, "not an event number"),
        (("memory", "restore", "--user", "ann", "--event", "99999"), 3, "no memory change 99999"),
        (("memory", "restore", "--user", "bob", "--event", str(event["event_id"])), 3, "error: "),
        (
            ("memory", "restore", "--user", "ann", "--event", str(event["event_id"])),
            2,
            "already has that memory",
        ),
    ]:
        result = memchat(*args)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and says in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and "\x1b" not in result.stderr


# -- the background policy ----------------------------------------------------------


@pytest.mark.parametrize("threshold", [3, 0], ids=["past the threshold", "off"])
async def test_workers_consolidate_a_user_past_the_threshold(
    tmp_path: Path, database_dsn: str, threshold: int
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn, "pool_max_size": 10},
        memory={"optimize_threshold": threshold},
    )
    said = {
        "ann": ["My name is Ann.", "I like tea.", "I live in Porto.", "I love tea."],
        "bob": ["I like tea.", "I love tea."],  # a duplicate too, but under the threshold
    }
    async with open_runtime(settings) as rt:
        for user, texts in said.items():
            async with rt.store.scope(user) as s:
                await s.ensure_user()
                sid = (await s.create_session()).session_id
            for text in texts:
                assert isinstance(await rt.agent.run(user, sid, text), TurnCompleted)
        assert await rt.dispatcher.wait_idle(said, within=30)
        await rt.dispatcher.optimizer.wait_idle()
        ann, bob = await _texts(rt.store, "ann"), await _texts(rt.store, "bob")
        async with rt.store.scope("ann") as s:
            by_optimize = [e.before for e in await s.memory_events() if e.actor == ACTOR]
    assert bob == ["Likes tea", "Loves tea"]
    if threshold:
        assert ann == ["Lives in Porto", "Loves tea", "Name is Ann"]
        assert by_optimize == ["Likes tea"]
    else:
        assert ann == ["Likes tea", "Lives in Porto", "Loves tea", "Name is Ann"]
        assert by_optimize == []


def test_the_policy_is_bounded() -> None:
    policy = OptimizePolicy(Consolidator.__new__(Consolidator), threshold=200)
    assert not policy.consider("ann", 200)  # not past it
    policy._floor["ann"] = 230  # the last run left 210 memories
    assert not policy.consider("ann", 229)
    assert (
        OptimizePolicy(Consolidator.__new__(Consolidator), threshold=0).consider("ann", 10**6)
        is False
    )


async def test_a_memory_changed_while_the_model_thinks_is_left_alone(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI, store: Store
) -> None:
    settings = _http_settings(tmp_path, database_dsn, fake)
    await _remember(store, "ann", "Likes tea", "Likes tea a lot", "Is a pilot")
    fake.first_token_latency = 3.0  # the answer waits; the edit below does not
    fake.queue_tool_calls(
        [
            {"name": "update_memory", "arguments": {"id": "m1", "memory": "Likes tea a lot"}},
            {"name": "delete_memory", "arguments": {"id": "m2"}},
            {"name": "delete_memory", "arguments": {"id": "m3"}},
        ]
    )
    running = asyncio.create_task(_over_http(settings, store, "ann"))
    assert await asyncio.to_thread(fake.wait_for_requests, 1)
    async with store.scope("ann") as s:
        pilot = next(m for m in await s.list_memories() if m.content == "Is a pilot")
        await s.update_memory(pilot.memory_id, "Is a retired pilot")
    result = await running
    assert sorted((c.op, c.memory.content) for c in result.changes) == [
        ("delete", "Likes tea a lot"),
        ("update", "Likes tea"),
    ]
    assert [r for r in result.rejected if "changed while the model was asked" in r]
    assert await _texts(store, "ann") == ["Is a retired pilot", "Likes tea a lot"]
