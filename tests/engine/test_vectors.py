"""Memories by similarity (pgvector, migration 0011; engine/embeddings.py, vectors.py,
recall.py) on the real PostgreSQL, with vectors from the fake server's real
``/v1/embeddings`` over HTTP through the openai client.

The fake's vectors are a hashed bag of word stems (bench.fake_openai.hashed_embedding):
"iguanas" is near "iguana", which the 'simple' full-text search sees as another
word, so a memory found only by similarity shows that similarity is in use.
Tests needing the extension are skipped, with the reason, on a server without
it (CI's external PostgreSQL 15); the no-extension path is tested on any server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from bench.fake_openai import EMBEDDING_DIMS, FakeOpenAI, hashed_embedding
from engine.admin import CHECK_RLS, AdminReader
from engine.agent import TurnCompleted
from engine.config import Settings, load_settings
from engine.db import Database
from engine.db.dsn import with_login
from engine.db.migrate import _ENSURE_LEGACY_ROLES
from engine.db.vector_index import index_vectors
from engine.doctor import RETRIEVAL, diagnose
from engine.embeddings import COOLDOWN_SECONDS, Embedder, embeddings_endpoint, vector_literal
from engine.errors import ConfigError
from engine.models.base import ModelConfigError
from engine.models.prompt_blocks import parse_context_memories
from engine.recall import relevant_memories, turn_vector
from engine.redact import remember_secrets, scrub
from engine.runtime import open_runtime
from engine.store import Store
from engine.vectors import embed_missing
from tests.conftest import make_settings

pytestmark = pytest.mark.db

IGUANA = "Keeps a pet iguana called Ziggy"
QUESTION = "How are my iguanas doing?"


def _filler(n: int) -> list[str]:
    return [f"Likes the colour number {i}" for i in range(n)]


async def _add(store: Store, user_id: str, contents: Sequence[str]) -> None:
    """Memories, the later in ``contents`` the newer (a second apart)."""
    async with store.scope(user_id) as s:
        await s.ensure_user()
        await s.conn.execute(
            """
            INSERT INTO memories (user_id, content, updated_at, created_at)
            SELECT $1, c, now() - interval '1 day' + i * interval '1 second',
                   now() - interval '1 day' + i * interval '1 second'
            FROM unnest($2::text[]) WITH ORDINALITY AS x(c, i)
            """,
            user_id,
            list(contents),
        )


@pytest.fixture
async def vector_dsn(database_dsn: str) -> str:
    conn = await asyncpg.connect(database_dsn)
    try:
        ready = await conn.fetchval("SELECT to_regclass('public.memory_vectors') IS NOT NULL")
    finally:
        await conn.close()
    if not ready:
        pytest.skip("this PostgreSQL server has no pgvector: the migration took the full-text path")
    return database_dsn


def _settings(tmp_path: Path, dsn: str, fake: FakeOpenAI, **memory: Any) -> Settings:
    return make_settings(
        tmp_path,
        database={"url": dsn},
        model={"provider": "openai", "base_url": fake.base_url, "api_key": "sk-vectors-5f2c9a1e7b"},
        memory={"embeddings_model": "fake-embed", "extraction": "tools", **memory},
    )


@pytest.fixture
async def embedder(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[Embedder]:
    endpoint = embeddings_endpoint(
        make_settings(
            tmp_path,
            model={
                "provider": "openai",
                "base_url": fake.base_url,
                "api_key": "sk-vectors-5f2c9a1e7b",
            },
            memory={"embeddings_model": "fake-embed"},
        )
    )
    assert not isinstance(endpoint, str)
    e = Embedder(endpoint, query_timeout=2.0)
    yield e
    await e.aclose()


async def _pick(store: Store, embedder: Embedder | None, user_id: str, text: str) -> list[str]:
    near = await turn_vector(embedder, text)
    async with store.scope(user_id) as s:
        return [m.content for m in await relevant_memories(s, text, 50, near)]


async def test_a_memory_near_in_meaning_is_picked_among_500(
    vector_dsn: str, store: Store, embedder: Embedder, fake: FakeOpenAI
) -> None:
    await _add(store, "ann", [IGUANA, *_filler(500)])
    # Full text alone: "iguanas" is not "iguana", and the fact is the oldest of 501.
    assert IGUANA not in await _pick(store, None, "ann", QUESTION)
    assert await embed_missing(store, embedder, "ann", limit=1000) == 501
    assert await embed_missing(store, embedder, "ann", limit=1000) == 0  # none left
    # One request for the whole batch, the vectors the fake computes for the texts.
    assert len(fake.embedding_requests[0]["input"]) == 501
    picked = await _pick(store, embedder, "ann", QUESTION)
    assert picked[0] == IGUANA
    assert len(picked) == 50 and len(set(picked)) == 50
    # The newest keep their fifth of the places.
    assert {f"Likes the colour number {i}" for i in range(490, 500)} <= set(picked)
    async with store.scope("ann") as s:
        stored = await s.conn.fetchval(
            "SELECT embedding::text FROM memory_vectors v JOIN memories m USING (memory_id) "
            "WHERE m.content = $1",
            IGUANA,
        )
    assert [round(float(x), 5) for x in stored.strip("[]").split(",")] == [
        round(x, 5) for x in hashed_embedding(IGUANA)
    ]


async def test_the_hnsw_index_is_built_by_the_owner_and_finds_the_same_memory(
    vector_dsn: str, store: Store, embedder: Embedder
) -> None:
    await _add(store, "ann", [IGUANA, *_filler(500)])
    await _add(store, "bo", ["Bo keeps an iguana too", *_filler(300)])
    for user in ("ann", "bo"):
        await embed_missing(store, embedder, user, limit=1000)
    exact = await _pick(store, embedder, "ann", QUESTION)
    owner = await asyncpg.connect(vector_dsn)
    try:
        assert await index_vectors(owner, None) is None
        said = await index_vectors(owner, "fake-embed")
        assert said == f"HNSW index for fake-embed ({EMBEDDING_DIMS} dimensions)"
        assert await index_vectors(owner, "fake-embed") == said  # once is enough
        assert await index_vectors(owner, "no-such-model") == (
            "exact search: no vectors of no-such-model yet"
        )
        name = await owner.fetchval(
            "SELECT memchat_vector_index_name('fake-embed', $1)", EMBEDDING_DIMS
        )
        index = await owner.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1", name)
        roles = dict(await owner.fetch("SELECT kind, rolname FROM memchat_runtime_roles"))
        may_index = await owner.fetchval(
            "SELECT has_function_privilege($1, 'memchat_index_vectors(text)', 'EXECUTE')",
            roles["app"],
        )
    finally:
        await owner.close()
    assert f"hnsw (((embedding)::vector({EMBEDDING_DIMS})) vector_cosine_ops)" in index
    assert "WHERE ((model = 'fake-embed'::text)" in index
    assert may_index is False, "the runtime logins gain no right"
    # With sorting priced out the planner must take the index: the search
    # goes through it (this transaction's scans of it), still puts the iguana
    # first, and only ann's memories come back.
    near = await turn_vector(embedder, QUESTION)
    async with store.scope("ann") as s:
        await s.conn.execute("SET LOCAL enable_sort = off")
        picked = [m.content for m in await relevant_memories(s, QUESTION, 50, near)]
        scans = await s.conn.fetchval("SELECT pg_stat_get_xact_numscans($1::regclass)", name)
    assert scans >= 1
    assert picked[0] == exact[0] == IGUANA
    assert "Bo keeps an iguana too" not in picked
    assert len(picked) == 50


async def test_the_chat_and_extraction_prompts_over_http_use_similarity(
    vector_dsn: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    settings = _settings(tmp_path, vector_dsn, fake, context_limit=10)
    async with open_runtime(settings, run_workers=False) as rt:
        await _add(rt.store, "ann", [IGUANA, *_filler(300)])
        async with rt.store.scope("ann") as s:
            sid = (await s.create_session()).session_id
        end = await rt.agent.run("ann", sid, "Hello")
        assert isinstance(end, TurnCompleted)
        # The memory job: nothing learnt, and it gives the memories their vectors
        # (128 a run, newest first).
        fake.queue_tool_calls([])
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("ann") as s:
            assert await s.conn.fetchval("SELECT count(*) FROM memory_vectors") == 128
            await s.conn.execute("DELETE FROM memory_vectors")
        assert rt.embedder is not None
        assert await embed_missing(rt.store, rt.embedder, "ann", limit=1000) == 301

        end = await rt.agent.run("ann", sid, QUESTION)
        assert isinstance(end, TurnCompleted)
        shown = parse_context_memories(fake.requests[-1]["messages"][0]["content"])
        assert shown[0] == IGUANA and len(shown) == 10
        # The turn's text was embedded for the search.
        assert fake.embedding_requests[-1]["input"] == [QUESTION]

        fake.queue_tool_calls(
            [{"name": "update_memory", "arguments": {"id": "m1", "memory": "Has two iguanas"}}]
        )
        assert await rt.dispatcher.run_once()
        extraction = fake.requests[-1]["messages"][-1]["content"]
        assert f"[m1] {IGUANA}" in extraction
        async with rt.store.scope("ann") as s:
            row = await s.conn.fetchrow(
                "SELECT m.content, v.embedding IS NOT NULL AS has_vector "
                "FROM memories m LEFT JOIN memory_vectors v USING (memory_id) "
                "WHERE m.content LIKE '%iguana%'"
            )
    # The update landed on the related memory; its old vector was dropped (the
    # trigger) and the job gave the new words a new one.
    assert row["content"] == "Has two iguanas" and row["has_vector"]


async def test_a_content_change_drops_the_vector_and_a_stale_one_is_never_stored(
    vector_dsn: str, store: Store, embedder: Embedder
) -> None:
    await _add(store, "ann", ["Drinks tea"])
    assert await embed_missing(store, embedder, "ann") == 1
    async with store.scope("ann") as s:
        (memory,) = await s.list_memories()
        await s.update_memory(memory.memory_id, "Drinks coffee")
        assert await s.conn.fetchval("SELECT count(*) FROM memory_vectors") == 0
        # A vector of the old words, arriving after the edit, is refused.
        await s.conn.execute(
            "INSERT INTO memory_vectors (memory_id, user_id, model, embedding) "
            "SELECT m.memory_id, m.user_id, 'fake-embed', $2::vector FROM memories m "
            "WHERE m.memory_id = $1 AND m.content = 'Drinks tea'",
            memory.memory_id,
            vector_literal(hashed_embedding("Drinks tea")),
        )
        assert await s.conn.fetchval("SELECT count(*) FROM memory_vectors") == 0
    assert await embed_missing(store, embedder, "ann") == 1


async def test_another_users_vectors_never_come_back(
    vector_dsn: str, store: Store, embedder: Embedder
) -> None:
    await _add(store, "bob", ["Bob keeps a secret iguana", *_filler(60)])
    await _add(store, "ann", ["Likes tea", "Reads a lot"])
    assert await embed_missing(store, embedder, "bob") == 61
    assert await embed_missing(store, embedder, "ann") == 2
    await _add(store, "bob", ["Bob has no vector yet"])
    assert set(await _pick(store, embedder, "ann", "secret iguanas of Bob")) == {
        "Likes tea",
        "Reads a lot",
    }
    bobs_vector = vector_literal(hashed_embedding("Bob keeps a secret iguana"))
    async with store.scope("ann") as s:
        anns = {m.memory_id for m in await s.list_memories()}
        # The function itself answers for the scope's user only.
        found = await s.conn.fetch(
            "SELECT memory_id FROM memchat_recall_vector('secret iguana', $1, 'fake-embed', 50, 0)",
            bobs_vector,
        )
        assert {row["memory_id"] for row in found} == anns
        # Row-level security: ann's scope sees and writes ann's vectors only.
        assert await s.conn.fetchval("SELECT count(*) FROM memory_vectors") == 2
    owner = await asyncpg.connect(vector_dsn)
    try:
        bob_id = await owner.fetchval(
            "SELECT memory_id FROM memories WHERE content = 'Bob has no vector yet'"
        )
        # Outside any scope the function finds nothing, even for the owner.
        assert (
            await owner.fetch(
                "SELECT * FROM memchat_recall_vector('iguana', $1, 'fake-embed', 50, 5)",
                bobs_vector,
            )
            == []
        )
        rls = await owner.fetchrow(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname = 'memory_vectors'"
        )
        roles = dict(await owner.fetch("SELECT kind, rolname FROM memchat_runtime_roles"))
        table = {
            kind: await owner.fetchval(
                "SELECT has_table_privilege($1, 'memory_vectors', 'SELECT')", role
            )
            for kind, role in roles.items()
        }
        function = {
            kind: await owner.fetchval(
                "SELECT has_function_privilege($1, "
                "'memchat_recall_vector(text, text, text, integer, integer)', 'EXECUTE')",
                role,
            )
            for kind, role in roles.items()
        }
        public = await owner.fetchval(
            "SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a "
            "WHERE p.proname = 'memchat_recall_vector' AND a.grantee = 0"
        )
    finally:
        await owner.close()
    assert tuple(rls) == (True, True)
    assert table == {"app": True, "admin": True, "worker": False}
    assert function == {"app": True, "admin": False, "worker": False} and public == 0
    async with store.scope("ann") as s:
        # A vector for bob's memory, or in bob's name, is refused.
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await s.conn.execute(
                "INSERT INTO memory_vectors (memory_id, user_id, model, embedding) "
                "VALUES ($1, 'ann', 'fake-embed', $2::vector)",
                bob_id,
                bobs_vector,
            )
    async with store.scope("ann") as s:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await s.conn.execute(
                "INSERT INTO memory_vectors (memory_id, user_id, model, embedding) "
                "VALUES ($1, 'bob', 'fake-embed', $2::vector)",
                bob_id,
                bobs_vector,
            )


async def test_a_failing_endpoint_falls_back_to_full_text_and_the_turn_works(
    vector_dsn: str, tmp_path: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, vector_dsn, fake, context_limit=10, embeddings_timeout=0.5)
    caplog.set_level(logging.WARNING, logger="engine.embeddings")
    async with open_runtime(settings, run_workers=False) as rt:
        await _add(rt.store, "ann", [IGUANA, *_filler(300)])
        async with rt.store.scope("ann") as s:
            sid = (await s.create_session()).session_id
        fake.fail_next_embeddings("timeout")
        started = time.monotonic()
        end = await rt.agent.run("ann", sid, "Is my iguana eating?")
        waited = time.monotonic() - started
        assert isinstance(end, TurnCompleted)
        # Full text found the iguana by its word; the turn waited the timeout once.
        shown = parse_context_memories(fake.requests[-1]["messages"][0]["content"])
        assert shown[0] == IGUANA
        assert 0.5 <= waited < 0.5 + 5
        assert "no answer within 0.5s (memory.embeddings_timeout)" in caplog.text
        assert "memory retrieval is full text" in caplog.text
        # The next turns, within the cooldown, do not ask the endpoint again.
        asked = len(fake.embedding_requests)
        end = await rt.agent.run("ann", sid, QUESTION)
        assert isinstance(end, TurnCompleted)
        assert len(fake.embedding_requests) == asked
        assert rt.embedder is not None and not rt.embedder.usable
        assert COOLDOWN_SECONDS >= 10


async def test_a_failing_endpoint_never_fails_the_memory_job(
    vector_dsn: str, tmp_path: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, vector_dsn, fake)
    caplog.set_level(logging.WARNING, logger="engine.embeddings")
    async with open_runtime(settings, run_workers=False) as rt:
        async with rt.store.scope("ann") as s:
            await s.ensure_user()
            sid = (await s.create_session()).session_id
        assert isinstance(await rt.agent.run("ann", sid, "I have a cat"), TurnCompleted)
        # The job's turn vector and the memories' vectors fail (the client's retries too).
        fake.fail_next_embeddings("500", count=10)
        fake.queue_tool_calls([{"name": "add_memory", "arguments": {"memory": "Has a cat"}}])
        assert await rt.dispatcher.run_once()
        async with rt.store.scope("ann") as s:
            assert [m.content for m in await s.list_memories()] == ["Has a cat"]
            jobs = await s.conn.fetch("SELECT status FROM memory_jobs")
            assert await s.conn.fetchval("SELECT count(*) FROM memory_vectors") == 0
    assert [j["status"] for j in jobs] == ["done"]
    assert "InternalServerError" in caplog.text and "full text" in caplog.text


async def test_doctor_says_similarity_is_in_use(
    vector_dsn: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    checks = {r.name: r for r in await diagnose(settings=_settings(tmp_path, vector_dsn, fake))}
    line = checks[RETRIEVAL]
    assert line.ok and "cosine similarity (pgvector, fake-embed)" in line.detail
    assert "full-text" in line.detail and "reciprocal rank" in line.detail
    assert f"fake-embed @ {fake.base_url}" in line.detail


async def test_without_the_extension_the_migration_succeeds_and_doctor_says_full_text(
    tmp_path: Path, empty_database_dsn: str, pg_server_dsn: str, fake: FakeOpenAI
) -> None:
    """A database owned by an ordinary login: it may not create the (untrusted)
    vector extension, so migration 0011 takes its no-extension path on any server;
    on one without pgvector at all the reason says so instead."""
    name = urlsplit(empty_database_dsn).path.lstrip("/")
    owner = f"{name}_owner"
    superuser = await asyncpg.connect(pg_server_dsn)
    try:
        await superuser.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE PASSWORD 'pw'")
        await superuser.execute(f"ALTER DATABASE {name} OWNER TO {owner}")
        await superuser.execute(_ENSURE_LEGACY_ROLES)
        in_db = await asyncpg.connect(empty_database_dsn)
        try:
            await in_db.execute(f"ALTER SCHEMA public OWNER TO {owner}")
        finally:
            await in_db.close()
        dsn = with_login(empty_database_dsn, owner, "pw")
        settings = _settings(tmp_path, dsn, fake)
        checks = {r.name: r for r in await diagnose(settings=settings)}
        assert checks["migrations"].ok, checks["migrations"]
        line = checks[RETRIEVAL]
        assert line.ok and line.detail.startswith("full-text search")
        assert "embeddings (pgvector) are not used: memory.embeddings_model is set, but" in (
            line.detail
        )
        assert "superuser" in line.detail or "no pgvector extension" in line.detail
        # And a turn works, by full text, with the endpoint answering.
        async with open_runtime(settings, run_workers=False) as rt:
            await _add(rt.store, "ann", [IGUANA, *_filler(100)])
            async with rt.store.scope("ann") as s:
                sid = (await s.create_session()).session_id
            end = await rt.agent.run("ann", sid, "Is my iguana eating?")
            assert isinstance(end, TurnCompleted)
            shown = parse_context_memories(fake.requests[-1]["messages"][0]["content"])
            assert shown[0] == IGUANA
            assert rt.embedder is not None and not rt.embedder.usable
    finally:
        in_db = await asyncpg.connect(empty_database_dsn)
        try:
            await in_db.execute(f"REASSIGN OWNED BY {owner} TO CURRENT_USER")
        finally:
            await in_db.close()
        await superuser.execute(f"ALTER DATABASE {name} OWNER TO CURRENT_USER")
        await superuser.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        roles = await superuser.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'memchat\\_%' || $1", name
        )
        for role in roles:
            await superuser.execute(f'DROP ROLE "{role["rolname"]}"')
        await superuser.execute(f"DROP ROLE {owner}")
        await superuser.close()


def test_doctor_without_embeddings_names_the_setting(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert embeddings_endpoint(settings) == "memory.embeddings_model is not set"
    offline = make_settings(tmp_path, memory={"embeddings_model": "x"})
    assert "offline" in str(embeddings_endpoint(offline))


def test_an_embeddings_endpoint_from_the_current_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Embeddings requests carry every turn and memory: a redirect like memory.base_url.
    (tmp_path / "config.toml").write_text(
        '[memory]\nembeddings_model = "e"\nembeddings_base_url = "http://203.0.113.9/v1"\n'
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "memory.embeddings_base_url" in caught.value.message
    assert "\n" not in caught.value.message


def test_the_embeddings_key_is_scrubbed_and_a_bad_url_is_one_line(tmp_path: Path) -> None:
    key = "sk-embeddings-secret-0123456789"
    settings = make_settings(
        tmp_path,
        memory={
            "embeddings_model": "e",
            "embeddings_base_url": "ftp://example.com/v1",
            "embeddings_api_key": key,
        },
    )
    remember_secrets(settings)
    assert key not in scrub(f"failed with {key}")
    with pytest.raises(ModelConfigError) as caught:
        embeddings_endpoint(settings)
    assert "memory.embeddings_base_url must be an http(s) URL" in caught.value.message
    assert "\n" not in caught.value.message


async def test_fifty_users_at_once_each_get_only_their_own(
    vector_dsn: str, store: Store, embedder: Embedder
) -> None:
    users = [f"user{i}" for i in range(50)]
    # Every user has an iguana fact of their own: the same words, other owners.
    await asyncio.gather(
        *(_add(store, u, [f"{u} keeps a pet iguana", *_filler(20)]) for u in users)
    )
    stored = await asyncio.gather(*(embed_missing(store, embedder, u) for u in users))
    assert stored == [21] * 50
    picks = await asyncio.gather(*(_pick(store, embedder, u, QUESTION) for u in users))
    for user, picked in zip(users, picks, strict=True):
        assert picked[0] == f"{user} keeps a pet iguana"
        assert len(picked) == 21
        assert not [p for p in picked if "keeps" in p and not p.startswith(f"{user} ")]


async def test_the_isolation_check_covers_the_vector_table(vector_dsn: str, db: Database) -> None:
    # The inspector's and doctor's row-level security check must not stop at
    # the six tables every database has: vectors are user data too.
    (check,) = (await AdminReader(db).run_checks(CHECK_RLS)).checks
    assert check.ok and check.detail.startswith("7 tables"), check
    conn = await asyncpg.connect(vector_dsn)
    try:
        await conn.execute("ALTER TABLE memory_vectors NO FORCE ROW LEVEL SECURITY")
    finally:
        await conn.close()
    (check,) = (await AdminReader(db).run_checks(CHECK_RLS)).checks
    assert not check.ok
    assert [(f.subject, f.message) for f in check.findings] == [
        ("memory_vectors", "row-level security is not forced")
    ]
