"""Memories' vectors (migration 0011's memory_vectors), kept up to date by the memory job.

After a memory job has settled, :func:`embed_missing` gives vectors to the
user's memories that have none for the configured model: the ones the job
added or changed (a content change drops the old vector, by trigger), the ones
edited in the app, and the ones from before embeddings were configured, newest
first, at most :data:`EMBED_BATCH` a run, so a user's backlog is caught up over
a few turns and a run's cost stays bounded. The endpoint is asked with no
transaction open; each read and write is one statement in the user's scope.

A vector is stored only if its memory still says what was embedded (and the
memory row is locked for the write): a memory edited meanwhile keeps no vector
of its old words; its next job embeds the new ones.
"""

from __future__ import annotations

import asyncio
import logging

from engine.embeddings import BACKGROUND_TIMEOUT, Embedder, EmbeddingsFailed, vector_literal
from engine.errors import MemchatError
from engine.store import Store

log = logging.getLogger(__name__)

EMBED_BATCH = 128
"""Memories embedded per job run (one request)."""

# First the counts (index scans): a vector row is one memory's (primary key,
# gone with the memory or its old content), so equal counts mean none is
# missing, the usual case after the first jobs. Else a probe by primary key per
# memory, newest first, stopping at $2 found: a subplan, not an anti-join,
# because on a table whose statistics lag a bulk of new vectors the anti-join's
# generic plan was a nested loop over every pair of rows (9 s at 10,000
# memories); this is one index descent a memory whatever the statistics say.
_MISSING = """
WITH counts AS MATERIALIZED (
    SELECT (SELECT count(*) FROM memories)
           > (SELECT count(*) FROM memory_vectors WHERE model = $1) AS some_missing
)
SELECT m.memory_id, m.content
FROM memories AS m
WHERE (SELECT some_missing FROM counts)
  AND (SELECT v.model FROM memory_vectors AS v WHERE v.memory_id = m.memory_id)
      IS DISTINCT FROM $1
ORDER BY m.updated_at DESC, m.memory_id
LIMIT $2
"""

_STORE = """
INSERT INTO memory_vectors (memory_id, user_id, model, embedding)
SELECT m.memory_id, m.user_id, $1, x.embedding::vector
FROM unnest($2::uuid[], $3::text[], $4::text[]) AS x(memory_id, content, embedding)
JOIN memories AS m ON m.memory_id = x.memory_id AND m.content = x.content
FOR SHARE OF m
ON CONFLICT (memory_id) DO UPDATE
SET model = EXCLUDED.model, embedding = EXCLUDED.embedding, created_at = now()
"""


async def embed_missing(
    store: Store, embedder: Embedder, user_id: str, limit: int = EMBED_BATCH
) -> int:
    """Vectors for up to ``limit`` of the user's memories that lack one; how many were
    stored. Never raises for the endpoint or the database: it logs and returns 0."""
    if not embedder.usable:
        return 0
    try:
        async with store.scope(user_id) as s:
            if not await embedder.table_ready(s):
                return 0
            rows = await s.conn.fetch(_MISSING, embedder.model, limit)
        if not rows:
            return 0
        contents = [row["content"] for row in rows]
        try:
            # The client's retries included: a job's task is not held longer.
            async with asyncio.timeout(BACKGROUND_TIMEOUT):
                vectors = await embedder.embed(contents)
        except TimeoutError:
            embedder.failed(f"no vectors within {BACKGROUND_TIMEOUT:g}s")
            return 0
        except EmbeddingsFailed as exc:
            embedder.failed(str(exc))
            return 0
        async with store.scope(user_id) as s:
            status = await s.conn.execute(
                _STORE,
                embedder.model,
                [row["memory_id"] for row in rows],
                contents,
                [vector_literal(v) for v in vectors],
            )
    except MemchatError as exc:
        log.warning("could not store the memory vectors of %s: %s", user_id, exc.message)
        return 0
    except Exception:
        # Vectors are an index: whatever went wrong, the job's work stands.
        log.exception("could not store the memory vectors of %s", user_id)
        return 0
    return int(status.rsplit(" ", 1)[-1])
