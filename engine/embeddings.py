"""Embeddings: vectors of memories and turns from an OpenAI-compatible ``/v1/embeddings``.

Configured by ``memory.embeddings_model`` (unset: no embeddings, full-text
retrieval as before). The endpoint is ``memory.embeddings_base_url``, else the
memory endpoint (``memory.base_url``, else ``model.base_url``), with its key
resolved the way :func:`engine.config.memory_model_settings` resolves the memory
model's: a key goes only to the endpoint it was given for.

Embeddings are an index, never data: when the endpoint fails or is slow, a turn
does not wait for it. A turn's vector is asked for at most
``memory.embeddings_timeout`` seconds, without retries; any failure is logged
with its reason, the turn's memories are picked by full text, and so are the
turns of the next :data:`COOLDOWN_SECONDS` (one slow endpoint costs one wait,
not one per turn). Memories' vectors are computed by the memory job after it
has settled (engine/vectors.py), outside any transaction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import Settings, memory_model_settings
from engine.models.base import ModelConfigError
from engine.models.endpoint import (
    OPENAI_BASE_URL,
    PLACEHOLDER_API_KEY,
    _display_url,
    _is_http_url,
    _is_openai_host,
)
from engine.store import UserScope
from engine.text import one_line

log = logging.getLogger(__name__)

COOLDOWN_SECONDS = 30.0
"""After a failure, turns use full text this long before the endpoint is asked again."""

BACKGROUND_TIMEOUT = 30.0
"""Seconds per request of the memory job's vectors (nobody waits for them)."""

MAX_INPUT_CHARS = 8000
"""Characters of one text sent: models take about 8,000 tokens, and a turn's
search text is shorter anyway (engine.recall.SEARCH_CHARS)."""

_HAS_TABLE = "SELECT to_regclass('public.memory_vectors') IS NOT NULL"


class EmbeddingsFailed(Exception):
    """The endpoint did not answer with usable vectors; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class EmbeddingsEndpoint:
    model: str
    base_url: str
    api_key: str

    @property
    def label(self) -> str:
        return f"{self.model} @ {_display_url(self.base_url)}"


def embeddings_endpoint(settings: Settings) -> EmbeddingsEndpoint | str:
    """Where embeddings come from, or why there are none (a reason for doctor).

    Raises :class:`ModelConfigError` for an endpoint that cannot work (not an
    http(s) URL, OpenAI without a key): broken settings are one line at start.
    """
    memory = settings.memory
    if memory.embeddings_model is None:
        return "memory.embeddings_model is not set"
    extraction = memory_model_settings(settings.model, memory)
    own = memory.embeddings_base_url is not None and (
        memory.embeddings_base_url != extraction.base_url
    )
    if own:
        base_url = memory.embeddings_base_url or ""
        key = memory.embeddings_api_key
    elif extraction.resolved_provider == "offline":
        return "the model is offline and memory.embeddings_base_url is not set"
    else:
        base_url = extraction.base_url or OPENAI_BASE_URL
        key = memory.embeddings_api_key or extraction.api_key
    base_url = base_url.strip() or OPENAI_BASE_URL
    api_key = key.get_secret_value() if key else ""
    if not _is_http_url(base_url):
        raise ModelConfigError(
            "memory.embeddings_base_url must be an http(s) URL like http://127.0.0.1:11434/v1, "
            f"got {_display_url(base_url)!r}"
        )
    if not api_key and _is_openai_host(base_url):
        raise ModelConfigError(
            f"embeddings at {_display_url(base_url)} need an API key: set "
            "memory.embeddings_api_key (or OPENAI_API_KEY), or unset memory.embeddings_model"
        )
    return EmbeddingsEndpoint(memory.embeddings_model, base_url, api_key)


@dataclass(frozen=True, slots=True)
class QueryVector:
    """A turn's vector, as pgvector's text form, and the model it came from."""

    model: str
    literal: str


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text input form: asyncpg needs no codec for it."""
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


class Embedder:
    """One endpoint's embeddings for the life of a runtime, with its failure state."""

    def __init__(self, endpoint: EmbeddingsEndpoint, *, query_timeout: float) -> None:
        self.model = endpoint.model
        self.label = endpoint.label
        self.query_timeout = query_timeout
        # Imported here: `openai` is most of a command's start-up, and only a
        # runtime with an embeddings endpoint needs it.
        import openai

        self._client = openai.AsyncOpenAI(
            api_key=endpoint.api_key or PLACEHOLDER_API_KEY,
            base_url=endpoint.base_url,
            timeout=BACKGROUND_TIMEOUT,
            max_retries=2,
            http_client=openai.DefaultAioHttpClient(),
        )
        self._down_until = 0.0
        self._table: bool | None = None
        """Whether this database has memory_vectors (pgvector); None: not asked yet."""

    @property
    def usable(self) -> bool:
        """False while the endpoint is cooling down, or for good without the table."""
        return self._table is not False and time.monotonic() >= self._down_until

    async def table_ready(self, scope: UserScope) -> bool:
        """Whether the database can hold vectors; asked once per process."""
        if self._table is None:
            self._table = bool(await scope.conn.fetchval(_HAS_TABLE))
            if not self._table:
                log.warning(
                    "embeddings are configured but this database has no memory_vectors "
                    "(pgvector): memory retrieval is full text (`memchat doctor` says why)"
                )
        return self._table

    async def embed(self, texts: Sequence[str], *, query: bool = False) -> list[list[float]]:
        """One vector per text, in order. Raises :class:`EmbeddingsFailed`."""
        import openai  # loaded by __init__ already; see there

        inputs = [text[:MAX_INPUT_CHARS] or " " for text in texts]
        client = self._client
        if query:
            client = client.with_options(timeout=self.query_timeout, max_retries=0)
        try:
            response = await client.embeddings.create(
                model=self.model, input=inputs, encoding_format="float"
            )
        except openai.OpenAIError as exc:
            raise EmbeddingsFailed(f"{type(exc).__name__}: {one_line(str(exc))}") from exc
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        if len(vectors) != len(inputs):
            raise EmbeddingsFailed(f"{len(vectors)} vectors came for {len(inputs)} texts")
        dims = {len(v) for v in vectors}
        if len(dims) != 1 or 0 in dims:
            raise EmbeddingsFailed(f"vectors of unusable dimensions {sorted(dims)}")
        if not all(math.isfinite(x) for v in vectors for x in v):
            raise EmbeddingsFailed("a vector has values that are not finite numbers")
        if any(not any(v) for v in vectors):
            raise EmbeddingsFailed("a zero vector came (no direction to compare)")
        return vectors

    async def query(self, text: str) -> QueryVector | None:
        """The turn's vector within ``query_timeout``, or None: full text this turn."""
        if not self.usable or not text.strip():
            return None
        try:
            async with asyncio.timeout(self.query_timeout):
                (vector,) = await self.embed([text], query=True)
        except TimeoutError:
            self.failed(f"no answer within {self.query_timeout:g}s (memory.embeddings_timeout)")
            return None
        except EmbeddingsFailed as exc:
            self.failed(str(exc))
            return None
        return QueryVector(self.model, vector_literal(vector))

    def failed(self, reason: str) -> None:
        """Log why, and keep turns on full text for a while."""
        self._down_until = time.monotonic() + COOLDOWN_SECONDS
        log.warning(
            "embeddings from %s failed: %s; memory retrieval is full text for %gs",
            self.label,
            reason,
            COOLDOWN_SECONDS,
        )

    async def aclose(self) -> None:
        await self._client.close()


def create_embedder(settings: Settings) -> Embedder | None:
    """The runtime's embedder, or None (not configured; the reason is doctor's)."""
    endpoint = embeddings_endpoint(settings)
    if isinstance(endpoint, str):
        return None
    return Embedder(endpoint, query_timeout=settings.memory.embeddings_timeout)
