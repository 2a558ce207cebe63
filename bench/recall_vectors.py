"""Vector retrieval at scale: one user's vectors, the exact scan against the HNSW index.

Part of ``python -m bench recall``, where the server has pgvector (the embedded
one does). The bench's big user gets a vector of ``DIMS`` dimensions for each
of its memories, loaded in bulk as the owner: vectors clustered around
``CENTRES`` random centres (real embeddings are clustered; uniformly random
vectors are the worst case of any graph index), and each search asks with a
centre plus noise. No embeddings endpoint is involved: the turn's vector is
given, as engine.recall receives it. The searches run through
``engine.recall.relevant_memories`` in the user's scope, first with the exact
scan (migration 0011's way, what runs without the index), then after the
owner has built the index (``memchat_index_vectors``, migration 0012, as
memchat does at start), on the same queries.

Figures: p50 / p95 of each, their ratio, the seconds the index took to build,
and the share of memories the indexed search returned that the exact one did.
"""

from __future__ import annotations

import random
import time

import asyncpg

from bench.harness import Point, percentile
from engine.embeddings import Embedder, EmbeddingsEndpoint, QueryVector, vector_literal
from engine.recall import Near, relevant_memories
from engine.runtime import Runtime

MODEL = "bench-embed-1536"
DIMS = 1536
CENTRES = 200
NOISE = 0.6
TARGET_P95_MS = 5.0

_HAS_VECTORS = "SELECT to_regclass('public.memory_vectors') IS NOT NULL"
# One random centre per row; then each memory's vector: its centre plus noise.
_CENTRES = """
SELECT (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, $1) WHERE c IS NOT NULL)
FROM generate_series(1, $2) AS c
"""
_VECTORS = """
INSERT INTO memory_vectors (memory_id, user_id, model, embedding)
SELECT m.memory_id, m.user_id, $2,
       (SELECT array_agg(u.x + (random()::real - 0.5) * $4 ORDER BY u.i)
        FROM unnest(($3::real[][])[abs(hashtext(m.memory_id::text)) % $5 + 1:
                                   abs(hashtext(m.memory_id::text)) % $5 + 1][1:$6])
             WITH ORDINALITY AS u(x, i))::vector
FROM memories AS m
WHERE m.user_id = $1
"""


async def vector_point(
    runtime: Runtime, dsn: str, user: str, per_user: int, searches: int, rng: random.Random
) -> Point | None:
    """The point, or None where the server has no pgvector (retrieval is full text there)."""
    owner = await asyncpg.connect(dsn)
    try:
        if not await owner.fetchval(_HAS_VECTORS):
            return None
        centres = [list(row[0]) for row in await owner.fetch(_CENTRES, DIMS, CENTRES)]
        await owner.execute(_VECTORS, user, MODEL, centres, NOISE, CENTRES, DIMS)
        await owner.execute("ANALYZE memory_vectors")
        queries = [
            vector_literal([x + (rng.random() - 0.5) * NOISE for x in rng.choice(centres)])
            for _ in range(searches + searches // 10)
        ]
        # Never asked: the turn's vector is given (no endpoint is running).
        embedder = Embedder(
            EmbeddingsEndpoint(MODEL, "http://127.0.0.1:9/v1", "sk-bench-unused-5e1f"),
            query_timeout=1.0,
        )
        try:
            exact_s, exact = await _searches(runtime, embedder, user, queries)
            began = time.perf_counter()
            said = str(await owner.fetchval("SELECT memchat_index_vectors($1)", MODEL))
            build_s = time.perf_counter() - began
            indexed_s, indexed = await _searches(runtime, embedder, user, queries)
        finally:
            await embedder.aclose()
    finally:
        await owner.close()
    if not said.startswith("HNSW index"):
        raise RuntimeError(f"the bench's vectors got no index: {said}")
    same = sum(len(a & b) for a, b in zip(exact, indexed, strict=True))
    exact_p95 = percentile(exact_s, 95) * 1000
    indexed_p95 = percentile(indexed_s, 95) * 1000
    return Point(
        scenario="recall",
        point=f"vector retrieval, {per_user:,} x {DIMS:,}",
        params={
            "vectors_of_the_user": per_user,
            "dimensions": DIMS,
            "centres": CENTRES,
            "searches": searches,
        },
        figures={
            "exact_p50_ms": round(percentile(exact_s, 50) * 1000, 2),
            "exact_p95_ms": round(exact_p95, 2),
            "hnsw_p50_ms": round(percentile(indexed_s, 50) * 1000, 2),
            "hnsw_p95_ms": round(indexed_p95, 2),
            "hnsw_to_exact_p95": round(indexed_p95 / exact_p95, 3) if exact_p95 else None,
            "index_build_s": round(build_s, 1),
            "same_memories_as_exact": round(same / max(sum(map(len, exact)), 1), 3),
        },
        targets={"same_memories_as_exact": (">=", 0.95)},
    )


async def _searches(
    runtime: Runtime, embedder: Embedder, user: str, queries: list[str]
) -> tuple[list[float], list[set[str]]]:
    """Seconds per relevant_memories call with the given vectors (the first tenth
    warms up), and the memories each returned."""
    latencies: list[float] = []
    picked: list[set[str]] = []
    limit = runtime.settings.memory.context_limit
    warm_up = len(queries) - len(queries) * 10 // 11
    for index, literal in enumerate(queries):
        near = Near(embedder, QueryVector(MODEL, literal))
        async with runtime.store.scope(user) as s:
            began = time.perf_counter()
            memories = await relevant_memories(s, "", limit, near)
            took = time.perf_counter() - began
        if index >= warm_up:
            latencies.append(took)
            picked.append({str(m.memory_id) for m in memories})
    return latencies, picked
