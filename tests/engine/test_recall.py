"""A bounded, relevant memory context (engine/recall.py) on the real PostgreSQL.

Memories are inserted in bulk in the user's own scope (row-level security
checks every row), with updated_at spaced a second apart so that "newest" is
well defined; the turns go through the real agent and the real openai client
over HTTP to the fake server where the prompt is what is checked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine.agent import Agent, TurnCompleted
from engine.config import MemorySettings, ModelSettings, Settings, load_settings
from engine.errors import ConfigError
from engine.models import OpenAIChatModel
from engine.models.prompt_blocks import parse_context_memories
from engine.recall import (
    COMMON_HITS,
    COMMON_SHARE,
    MAX_TERMS,
    chat_memories,
    describe_retrieval,
    extraction_memories,
    relevant_memories,
)
from engine.runtime import open_runtime
from engine.store import Store
from tests.conftest import make_settings

pytestmark = pytest.mark.db


async def _add(
    store: Store, user_id: str, contents: Sequence[str], *, newest_last: bool, later_s: int = 0
) -> None:
    """Memories, the later in ``contents`` the newer (or the older); ``later_s``
    seconds later than a call without it."""
    async with store.scope(user_id) as s:
        await s.ensure_user()
        await s.conn.execute(
            """
            INSERT INTO memories (user_id, content, updated_at, created_at)
            SELECT $1, c, t, t
            FROM unnest($2::text[]) WITH ORDINALITY AS x(c, i),
                 LATERAL (SELECT now() - interval '1 day'
                          + ((CASE WHEN $3 THEN i ELSE -i END) + $4) * interval '1 second' AS t)
                 AS ts
            """,
            user_id,
            list(contents),
            newest_last,
            later_s,
        )


def _filler(n: int, word: str = "colour") -> list[str]:
    return [f"Likes the {word} number {i}" for i in range(n)]


async def _pick(store: Store, user_id: str, text: str, limit: int = 50) -> list[str]:
    async with store.scope(user_id) as s:
        return [m.content for m in await relevant_memories(s, text, limit)]


async def test_relevance_finds_the_one_memory_that_shares_a_word_among_500(store: Store) -> None:
    # The iguana fact is the oldest of 501, and every other memory shares "the"
    # with the turn: only the rare word may decide.
    await _add(store, "ann", ["Keeps a pet iguana called Ziggy"], newest_last=True)
    await _add(store, "ann", _filler(500), newest_last=True)
    picked = await _pick(store, "ann", "Is the iguana eating enough these days?")
    assert picked[0] == "Keeps a pet iguana called Ziggy"
    assert len(picked) == 50
    # Without the shared word it is too old to come back.
    assert "Keeps a pet iguana called Ziggy" not in await _pick(store, "ann", "Hello there")


async def test_several_shared_words_rank_above_one(store: Store) -> None:
    await _add(
        store,
        "ann",
        ["Works in Lisbon", "Is moving to Porto next month", "Was born in Porto", *_filler(80)],
        newest_last=False,
    )
    picked = await _pick(store, "ann", "When am I moving to Porto?", limit=10)
    assert picked[:2] == ["Is moving to Porto next month", "Was born in Porto"]


async def test_the_limit_holds_and_no_memory_comes_twice(store: Store) -> None:
    await _add(store, "ann", _filler(500), newest_last=True)
    for limit in (0, 1, 7, 50, 600):
        async with store.scope("ann") as s:
            picked = await relevant_memories(s, "the colour number 7 and 77 and 177", limit)
        assert len(picked) == min(limit, 500)
        assert len({m.memory_id for m in picked}) == len(picked)


async def test_recency_fills_what_relevance_leaves_and_keeps_a_fifth(store: Store) -> None:
    await _add(store, "ann", [f"Fact {i}" for i in range(30)], newest_last=True)
    picked = await _pick(store, "ann", "nothing in common here", limit=10)
    assert picked == [f"Fact {i}" for i in range(29, 19, -1)]

    # A turn matching many memories still leaves the newest a fifth of the places.
    await _add(store, "bo", _filler(COMMON_HITS - 4, "tiger"), newest_last=True)
    await _add(store, "bo", [f"Newest fact {i}" for i in range(5)], newest_last=True, later_s=1000)
    picked = await _pick(store, "bo", "tiger", limit=20)
    assert len(picked) == 20
    assert {"Newest fact 4", "Newest fact 3", "Newest fact 2", "Newest fact 1"} <= set(picked)
    assert sum(p.startswith("Likes the tiger") for p in picked) == 16


async def test_words_common_among_the_users_memories_do_not_count(store: Store) -> None:
    await _add(store, "ann", _filler(COMMON_HITS + 10), newest_last=False)
    await _add(store, "ann", ["Hates the dentist"], newest_last=False)
    # "colour" is in more than COMMON_HITS memories: it picks none out, recency decides.
    by_recency = await _pick(store, "ann", "nothing shared", limit=5)
    assert await _pick(store, "ann", "colour", limit=5) == by_recency
    # A rarer word in the turn is what counts.
    assert (await _pick(store, "ann", "colour dentist", limit=5))[0] == "Hates the dentist"
    # For a user with few memories no word is common.
    await _add(
        store, "bo", ["Likes the colour red", "Works at night", "Reads a lot"], newest_last=True
    )
    assert (await _pick(store, "bo", "my colour", limit=3))[0] == "Likes the colour red"


async def test_a_word_in_a_quarter_of_a_large_users_memories_does_not_count(
    store: Store,
) -> None:
    # 400 memories: "colour" is in 120 (over COMMON_HITS, and 120 * COMMON_SHARE
    # >= 400): too common. "violet" in 60 is over COMMON_HITS but under a
    # quarter, so it still picks its memories out, above the newest.
    await _add(store, "ann", _filler(120), newest_last=False)
    await _add(store, "ann", _filler(60, "violet"), newest_last=False)
    await _add(store, "ann", [f"Fact {i}" for i in range(220)], newest_last=True, later_s=500)
    assert COMMON_HITS <= 120 and 120 * COMMON_SHARE >= 400 and 60 * COMMON_SHARE < 400
    by_recency = await _pick(store, "ann", "nothing shared", limit=5)
    assert await _pick(store, "ann", "colour", limit=5) == by_recency
    violet = await _pick(store, "ann", "violet", limit=5)
    assert all(p.startswith("Likes the violet") for p in violet[:4])


_RECOUNT = """
    WITH kept AS (SELECT user_id, lexeme, memories FROM memory_words),
    counted AS (
        SELECT m.user_id, l.lexeme, count(*)::int FROM memories AS m,
               unnest(array_append(tsvector_to_array(m.search), '')) AS l(lexeme)
         GROUP BY m.user_id, l.lexeme
    )
    SELECT (SELECT count(*) FROM (TABLE kept EXCEPT ALL TABLE counted) AS a)
         + (SELECT count(*) FROM (TABLE counted EXCEPT ALL TABLE kept) AS b)
"""


async def word_count_drift(database_dsn: str) -> int:
    """How many (user, lexeme) counts in memory_words differ from a recount of the
    memories (as the owner: the table is the owner's alone)."""
    owner = await asyncpg.connect(database_dsn)
    try:
        return int(await owner.fetchval(_RECOUNT))
    finally:
        await owner.close()


async def _word_counts(database_dsn: str, user_id: str) -> dict[str, int]:
    owner = await asyncpg.connect(database_dsn)
    try:
        kept = await owner.fetch(
            "SELECT lexeme, memories FROM memory_words WHERE user_id = $1", user_id
        )
        # What they must be: counted from the memories themselves.
        counted = await owner.fetch(
            "SELECT l.lexeme, count(*)::int AS memories FROM memories AS m, "
            "unnest(array_append(tsvector_to_array(m.search), '')) AS l(lexeme) "
            "WHERE m.user_id = $1 GROUP BY l.lexeme",
            user_id,
        )
    finally:
        await owner.close()
    assert dict(kept) == dict(counted)
    return dict(kept)


async def test_word_counts_follow_every_change_of_the_memories(
    store: Store, database_dsn: str
) -> None:
    await _add(store, "ann", ["Keeps an iguana", "Keeps a cat", "Likes tea"], newest_last=True)
    await _add(store, "bo", ["Keeps a dog"], newest_last=True)
    counts = await _word_counts(database_dsn, "ann")
    assert (counts["keeps"], counts["iguana"], counts[""]) == (2, 1, 3)
    async with store.scope("ann") as s:
        added = await s.add_memory("Keeps bees")
        assert added is not None
        iguana = next(m for m in await s.list_memories() if m.content == "Keeps an iguana")
        await s.update_memory(iguana.memory_id, "Had an iguana once")
        await s.conn.execute("UPDATE memories SET topics = ARRAY['pets']")  # words unchanged
    counts = await _word_counts(database_dsn, "ann")
    assert (counts["keeps"], counts["iguana"], counts["had"], counts[""]) == (2, 1, 1, 4)
    async with store.scope("ann") as s:
        await s.delete_memory(iguana.memory_id)
    counts = await _word_counts(database_dsn, "ann")
    assert "iguana" not in counts and "had" not in counts and counts[""] == 3
    async with store.scope("ann") as s:
        assert await s.delete_user()
    assert await _word_counts(database_dsn, "ann") == {}
    assert (await _word_counts(database_dsn, "bo"))["dog"] == 1


async def test_word_counts_stay_exact_under_concurrent_writers(
    store: Store, database_dsn: str
) -> None:
    # 50 users writing at once, and 10 transactions writing one shared user's
    # memories at once (statements interleaved: the '' row is what they queue
    # on, so none deadlocks), then every count is recounted from the memories.
    users = [f"user{i}" for i in range(50)]

    async def write(user_id: str, tag: int) -> None:
        async with store.scope(user_id) as s:
            await s.ensure_user()
            first = await s.add_memory(f"Keeps a parrot number {tag}")
            await s.add_memory(f"Likes the colour {tag} and the sea")
            assert first is not None
            await s.update_memory(first.memory_id, f"Kept a parrot {tag} once")
            await s.add_memory(f"Reads about the sea {tag}")

    await asyncio.gather(*(write(user, i) for i, user in enumerate(users)))
    await asyncio.gather(*(write("shared", 100 + i) for i in range(10)))
    assert await word_count_drift(database_dsn) == 0
    owner = await asyncpg.connect(database_dsn)
    try:
        shared = await owner.fetchval(
            "SELECT memories FROM memory_words WHERE user_id = 'shared' AND lexeme = 'sea'"
        )
    finally:
        await owner.close()
    assert shared == 20


async def test_another_users_memories_never_come_back(store: Store, database_dsn: str) -> None:
    await _add(store, "bob", ["Bob keeps a secret iguana", *_filler(100)], newest_last=True)
    await _add(store, "ann", ["Likes tea"], newest_last=True)
    assert await _pick(store, "ann", "secret iguana Bob colour number") == ["Likes tea"]
    # The search function itself (SECURITY DEFINER) answers for the scope's user
    # only: bob's words from ann's scope find nothing of bob's.
    async with store.scope("ann") as s:
        ids = await s.conn.fetch("SELECT memory_id FROM memchat_recall('secret iguana', 50, 0)")
        anns = {m.memory_id for m in await s.list_memories()}
    assert {row["memory_id"] for row in ids} == anns
    owner = await asyncpg.connect(database_dsn)
    try:
        # Outside any scope it finds nothing, even for the owner.
        assert await owner.fetch("SELECT * FROM memchat_recall('secret iguana', 50, 10)") == []
        roles = dict(await owner.fetch("SELECT kind, rolname FROM memchat_runtime_roles"))
        granted = {
            kind: await owner.fetchval(
                "SELECT has_function_privilege($1, 'memchat_recall(text, integer, integer)', "
                "'EXECUTE')",
                role,
            )
            for kind, role in roles.items()
        }
        public = await owner.fetchval(
            "SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a "
            "WHERE p.proname = 'memchat_recall' AND a.grantee = 0"
        )
    finally:
        await owner.close()
    assert granted == {"app": True, "admin": False, "worker": False} and public == 0


async def test_the_limits_in_python_are_the_functions(store: Store) -> None:
    async with store.scope("ann") as s:
        body = await s.conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'memchat_recall'")
    assert f"LIMIT {MAX_TERMS}\n" in body
    assert f"c.memories >= {COMMON_HITS}\n" in body
    assert f"c.memories * {COMMON_SHARE} >= " in body


async def test_any_script_is_searchable(store: Store) -> None:
    facts = [
        "Моя кошка живёт в Москве",
        "Η γάτα μου ζει στην Αθήνα",
        "住所 東京",
        "يحب القهوة العربية",
        "שותה תה ירוק",
    ]
    await _add(store, "ann", facts, newest_last=False)
    await _add(store, "ann", _filler(200), newest_last=True)
    assert (await _pick(store, "ann", "Где живёт моя кошка?", 5))[0] == facts[0]
    assert (await _pick(store, "ann", "Πού ζει η γάτα μου;", 5))[0] == facts[1]
    assert (await _pick(store, "ann", "東京 の 天気", 5))[0] == facts[2]
    assert (await _pick(store, "ann", "هل يحب القهوة؟", 5))[0] == facts[3]
    assert (await _pick(store, "ann", "תה ירוק בבוקר", 5))[0] == facts[4]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "\x00",
        "iguana\x00iguana",
        "\ud800 lone surrogate",
        "!!! ??? ... ---",
        "& | ! ( ) : * <-> ' \" \\ OR or -iguana",
        "'; DROP TABLE memories; --",
        "\x1b[31mred\x1b[0m",
        "iguana " * 200_000,
        "x" * 1_000_000,
    ],
    ids=repr,
)
async def test_empty_huge_and_hostile_text_does_not_error(store: Store, text: str) -> None:
    await _add(store, "ann", ["Keeps an iguana", *_filler(100)], newest_last=False)
    picked = await _pick(store, "ann", text, limit=20)
    assert len(picked) == 20
    if "iguana" in text and "-iguana" not in text:
        assert picked[0] == "Keeps an iguana"


async def test_extraction_sees_the_related_memory_with_the_newest(store: Store) -> None:
    await _add(store, "ann", ["Drinks tea every morning"], newest_last=True)
    await _add(store, "ann", _filler(300), newest_last=True)
    settings = MemorySettings(context_limit=10)
    async with store.scope("ann") as s:
        shown = await extraction_memories(s, settings, "I switched to coffee", "Coffee, then!")
        assert "Drinks tea every morning" not in [m.content for m in shown]
        shown = await extraction_memories(s, settings, "No more tea for me", "Noted.")
        chat = await chat_memories(s, settings, "No more tea for me")
    assert shown[0].content == "Drinks tea every morning" and len(shown) == 10
    assert "Likes the colour number 299" in [m.content for m in shown]
    assert [m.memory_id for m in chat] == [m.memory_id for m in shown]


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[OpenAIChatModel]:
    m = OpenAIChatModel(
        ModelSettings(
            provider="openai", base_url=fake.base_url, api_key="sk-recall-8d41b07c3e", timeout=5.0
        )
    )
    yield m
    await m.aclose()


async def test_the_chat_prompt_over_http_carries_at_most_the_limit(
    store: Store, tmp_path: Path, database_dsn: str, model: OpenAIChatModel, fake: FakeOpenAI
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn},
        memory={"context_limit": 12},
        model={"context_tokens": 100_000},
    )
    await _add(store, "ann", ["Keeps a pet iguana called Ziggy"], newest_last=True)
    await _add(store, "ann", _filler(2000), newest_last=True)
    async with store.scope("ann") as s:
        sid = (await s.create_session()).session_id
    agent = Agent(store, model, settings)
    end = await agent.run("ann", sid, "What should I feed my iguana?")
    assert isinstance(end, TurnCompleted)
    system = fake.requests[-1]["messages"][0]["content"]
    shown = parse_context_memories(system)
    assert len(shown) == 12
    assert shown[0] == "Keeps a pet iguana called Ziggy"
    assert "Likes the colour number 1999" in shown


async def test_the_extraction_prompt_over_http_carries_at_most_the_limit(
    tmp_path: Path, database_dsn: str, fake: FakeOpenAI
) -> None:
    settings = make_settings(
        tmp_path,
        database={"url": database_dsn},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": "sk-recall-8d41b07c3e"},
        memory={"context_limit": 8, "extraction": "tools"},
    )
    async with open_runtime(settings, run_workers=False) as rt:
        await _add(rt.store, "ann", ["Keeps a pet iguana called Ziggy"], newest_last=True)
        await _add(rt.store, "ann", _filler(500), newest_last=True)
        async with rt.store.scope("ann") as s:
            sid = (await s.create_session()).session_id
        await rt.agent.run("ann", sid, "My iguana is called Zorro now")
        fake.queue_tool_calls(
            [{"name": "update_memory", "arguments": {"id": "m1", "memory": "Has an iguana, Zorro"}}]
        )
        assert await rt.dispatcher.run_once()
        request = fake.requests[-1]["messages"][-1]["content"]
        assert request.count("\n[m") + request.startswith("[m") <= 8
        assert "[m1] Keeps a pet iguana called Ziggy" in request
        assert "[m8] " in request and "[m9] " not in request
        async with rt.store.scope("ann") as s:
            contents = {m.content for m in await s.list_memories()}
    # m1 was the related memory: the model's update landed on it.
    assert "Has an iguana, Zorro" in contents and len(contents) == 501
    assert "Keeps a pet iguana called Ziggy" not in contents


def test_doctor_names_the_retrieval(tmp_path: Path) -> None:
    settings: Settings = make_settings(tmp_path, memory={"context_limit": 30})
    line = describe_retrieval(settings.memory)
    assert "full-text" in line and "at most 30 memories" in line
    off = describe_retrieval(MemorySettings(add_to_context=False))
    assert "no memories" in off


@pytest.mark.parametrize("value", ["-1", "10001", "many", ""])
def test_a_bad_context_limit_is_one_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MEMCHAT_MEMORY__CONTEXT_LIMIT", value)
    with pytest.raises(ConfigError) as caught:
        load_settings(os.devnull)
    assert "memory.context_limit" in caught.value.message
    assert "\n" not in caught.value.message
