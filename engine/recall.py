"""Which memories a prompt carries: a bounded, relevant few, never the whole list.

A user may have thousands of memories; a chat or extraction prompt carries at
most ``memory.context_limit`` of them, chosen in one statement in the user's
scope. The search is memchat_recall() (migration 0009), which answers for the
scope's user only; the rows then come through row-level security as always.

* relevance: PostgreSQL full-text search on ``memories.search`` (a generated
  tsvector, 'simple' configuration: any language, no stemming) with OR
  semantics, so any word the turn shares with a memory counts. A word found in
  ``COMMON_HITS`` or more of the user's memories and in ``1/COMMON_SHARE`` of
  them or more ("the", "is", the user's own name) says little about which
  memory the turn is about and would make every memory a match to rank, so it
  does not count: a stop list learnt from the user's own memories, in whatever
  language. The counts are kept as memories change (memory_words, migration
  0012), so judging a turn's words costs one index probe each;
* recency: the newest memories fill what relevance leaves, and a fifth of the
  places are always theirs (what was just learnt stays in view).

* similarity (memory.embeddings_model set, and the database has pgvector:
  migration 0011): the turn's vector is compared with the memories' (exact
  cosine distance over the user's own vectors, memchat_recall_vector), and the
  nearest are fused with the full-text matches by reciprocal rank fusion (each
  list gives a memory 1/(60 + its place); the sums rank): a memory both near
  in meaning and sharing rare words comes first, either alone still counts,
  and neither list's raw scores need to be comparable. Recency keeps its
  fifth. Memories without a vector yet (just learnt, endpoint down) are still
  found by full text and recency. Without a turn vector (no endpoint, the
  endpoint slow or failing: engine/embeddings.py) it is full text as above.

The most relevant come first, then the newest: the prompt builders keep a
prefix of the list when tokens run short.
"""

from __future__ import annotations

from engine.config import MemorySettings
from engine.embeddings import Embedder, QueryVector
from engine.records import Memory
from engine.store import UserScope
from engine.validation import storable

SEARCH_CHARS = 4000
"""Characters of the turn searched: its start and its end, half each. A 100,000
character message is not 100,000 characters of search terms."""

MAX_TERMS = 16
"""Distinct words searched for, longest first (longer words tend to be rarer);
memchat_recall's LIMIT."""

COMMON_HITS = 32
COMMON_SHARE = 4
"""A word in COMMON_HITS or more of the user's memories, and in a COMMON_SHARE-th
of them or more, is too common to pick one out (memchat_recall's figures, 0012).
Up to 128 memories that is the first rule alone, as 0009's sample of the newest
128 said; beyond, the same share of all of them."""

_COLUMNS = (
    "memory_id, user_id, content, topics, source_session_id, source_message_id, "
    "created_at, updated_at"
)

# The search is the database's (memchat_recall, migration 0009: it sees only
# the scope's user); the rows come through row-level security as always.
# $1 turn text, $2 limit, $3 places kept for the newest.
_PICK = f"""
SELECT {", ".join("m." + column for column in _COLUMNS.split(", "))}
FROM memchat_recall($1, $2, $3) AS picked JOIN memories AS m USING (memory_id)
ORDER BY picked.rank DESC NULLS LAST, m.updated_at DESC, m.created_at DESC, m.memory_id
LIMIT $2
"""


# The same with similarity too (memchat_recall_vector, migration 0011).
# $4 the turn's vector (pgvector text), $5 its model.
_PICK_NEAR = _PICK.replace(
    "memchat_recall($1, $2, $3)", "memchat_recall_vector($1, $4, $5, $2, $3)"
)


def search_text(text: str) -> str:
    """The part of a turn that is searched: storable, at most SEARCH_CHARS."""
    text = storable(text)
    if len(text) > SEARCH_CHARS:
        half = SEARCH_CHARS // 2
        text = f"{text[:half]} {text[-half:]}"
    return text


async def relevant_memories(
    scope: UserScope, text: str, limit: int, near: Near | None = None
) -> list[Memory]:
    """At most ``limit`` of the user's memories: relevant to ``text`` first, then newest.

    ``near``: the turn's vector, to rank by similarity too (when the database
    has vectors; else full text alone)."""
    if limit <= 0:
        return []
    if near is not None and await near.embedder.table_ready(scope):
        rows = await scope.conn.fetch(
            _PICK_NEAR, search_text(text), limit, limit // 5, near.vector.literal, near.vector.model
        )
    else:
        rows = await scope.conn.fetch(_PICK, search_text(text), limit, limit // 5)
    return [
        Memory(
            memory_id=row["memory_id"],
            user_id=row["user_id"],
            content=row["content"],
            topics=tuple(row["topics"] or ()),
            source_session_id=row["source_session_id"],
            source_message_id=row["source_message_id"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )
        for row in rows
    ]


class Near:
    """A turn's vector and the embedder it came from (which knows the database's state)."""

    __slots__ = ("embedder", "vector")

    def __init__(self, embedder: Embedder, vector: QueryVector) -> None:
        self.embedder = embedder
        self.vector = vector


async def turn_vector(embedder: Embedder | None, *turn_texts: str) -> Near | None:
    """The vector of the turn(s) to search with, or None (full text): asked with no
    transaction open, bounded by memory.embeddings_timeout (engine/embeddings.py)."""
    if embedder is None:
        return None
    vector = await embedder.query(search_text("\n".join(turn_texts)))
    return None if vector is None else Near(embedder, vector)


async def chat_memories(
    scope: UserScope, settings: MemorySettings, text: str, near: Near | None = None
) -> list[Memory]:
    """The memories of a chat prompt for a turn that says ``text``."""
    return await relevant_memories(scope, text, settings.context_limit, near)


async def extraction_memories(
    scope: UserScope, settings: MemorySettings, *turn_texts: str, near: Near | None = None
) -> list[Memory]:
    """The memories an extraction prompt shows (and aliases): those related to the
    turn(s), so that a fact already known is updated rather than added again, and
    the newest."""
    return await relevant_memories(scope, "\n".join(turn_texts), settings.context_limit, near)


def describe_retrieval(
    settings: MemorySettings, vectors: str | None = "memory.embeddings_model is not set"
) -> str:
    """`memchat doctor`'s line on how prompt memories are chosen.

    ``vectors``: None when similarity is in use, else why it is not."""
    if not settings.add_to_context:
        chat = "chat prompts carry no memories (memory.add_to_context = false)"
    else:
        chat = f"at most {settings.context_limit} memories a prompt (memory.context_limit)"
    full_text = "full-text search ('simple' tsvector, GIN index)"
    if vectors is None:
        return (
            f"cosine similarity (pgvector, {settings.embeddings_model}) fused with {full_text} "
            f"by reciprocal rank, plus recency; {chat}"
        )
    return f"{full_text} plus recency; {chat}; embeddings (pgvector) are not used: {vectors}"
