"""Red team of migration 0012's vector index: hostile model names.

memchat_index_vectors(model) pastes the model and its dimension into CREATE
INDEX, and memchat_recall_vector pastes them into its query: a model name made
of quotes, a statement terminator and a comment must stay a literal. Then the
indexed search must still answer only the scope's user. Real PostgreSQL with
pgvector (skipped, with the reason, without it).
"""

from __future__ import annotations

import asyncpg
import pytest

from engine.db import Database
from engine.store import Store

pytestmark = pytest.mark.db

HOSTILE_MODELS = [
    "m'); DROP TABLE memories; --",
    'quoted "model" \\ with $$ dollars $q$',
    "x' || (SELECT string_agg(content, ',') FROM memories) || '",
]


@pytest.mark.parametrize("model", HOSTILE_MODELS)
async def test_a_hostile_model_name_stays_a_literal_and_the_index_serves_one_user(
    db: Database, store: Store, database_dsn: str, model: str
) -> None:
    owner = await asyncpg.connect(database_dsn)
    try:
        if not await owner.fetchval("SELECT to_regclass('public.memory_vectors') IS NOT NULL"):
            pytest.skip("this PostgreSQL server has no pgvector")
        ids = {}
        for user, content, vector in (
            ("alice", "Alice keeps a parrot", "[1,0,0]"),
            ("bob", "Bob keeps a secret iguana", "[1,0.01,0]"),
        ):
            async with store.scope(user) as s:
                await s.ensure_user()
                memory = await s.add_memory(content)
                assert memory is not None
                ids[user] = memory.memory_id
                await s.conn.execute(
                    "INSERT INTO memory_vectors (memory_id, user_id, model, embedding) "
                    "VALUES ($1, $2, $3, $4::vector)",
                    memory.memory_id,
                    user,
                    model,
                    vector,
                )
        said = await owner.fetchval("SELECT memchat_index_vectors($1)", model)
        name = await owner.fetchval("SELECT memchat_vector_index_name($1, 3)", model)
        assert said == f"HNSW index for {model} (3 dimensions)"
        assert await owner.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        assert await owner.fetchval("SELECT count(*) FROM memories") == 2
        # The index's predicate holds the name as it is.
        definition = await owner.fetchval("SELECT pg_get_indexdef($1::regclass)", name)
        assert "DROP" not in definition.split("WHERE", 1)[0]
    finally:
        await owner.close()
    for user, other in (("alice", "bob"), ("bob", "alice")):
        async with store.scope(user) as s:
            rows = await s.conn.fetch(
                "SELECT memory_id, rank FROM memchat_recall_vector($1, $2, $3, 10, 0)",
                "parrot iguana",
                "[1,0,0]",
                model,
            )
        found = {r["memory_id"] for r in rows}
        assert ids[user] in found and ids[other] not in found, (user, rows)
