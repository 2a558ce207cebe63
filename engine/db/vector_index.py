"""The approximate index for a model's memory vectors, made by the owner at start.

memory_vectors.embedding has no dimension (models differ) and an HNSW index
needs one, so migration 0012's memchat_index_vectors(model) builds one per
model and dimension, on an expression cast to it, once the model's vectors
exist. It runs as the owner (``database.url``) right after the migrations:
the runtime logins get no right to create anything. The first start after a
model's first vectors builds it (about a minute at 10,000 x 1,536 dimensions
on 2 cores; writers of vectors wait meanwhile); later starts find it.
"""

from __future__ import annotations

import logging

import asyncpg

log = logging.getLogger(__name__)


async def index_vectors(owner: asyncpg.Connection, model: str | None) -> str | None:
    """What memchat_index_vectors did for ``model`` (or why not); None if not asked.

    A failure (another process building it at the same moment, no memory for
    the build) leaves the exact search in place and is logged, not raised."""
    if model is None:
        return None
    if not await owner.fetchval(
        "SELECT to_regprocedure('memchat_index_vectors(text)') IS NOT NULL"
    ):
        return None  # a schema before 0012 (only tests migrate part of the way)
    try:
        said = str(await owner.fetchval("SELECT memchat_index_vectors($1)", model))
    except asyncpg.PostgresError as exc:
        log.warning("memory vectors of %s keep the exact search: %s", model, exc)
        return None
    log.info("memory vectors: %s", said)
    return said
