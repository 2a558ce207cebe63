"""The offline model's memory-consolidation rule: which memories to delete.

A pure function of the memories shown (oldest first), so ``memchat memory
optimize`` is deterministic offline (tests, the no-network demo):

* a memory that says the same as a newer one (the same content words after
  light stemming, with like/love/enjoy as one word: "Likes tea" and "Loves
  tea!") is a duplicate: the older is deleted, the newest kept;
* of the single-valued kinds (name, age, "Lives in"), only the newest memory
  is true: "Name is Mark" older than "Name is Marcus" is deleted.

It never rewrites a memory (a real model may merge two into one updated
text); keeping the newest wording is the safe offline choice.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from engine.models.offline_rules import (
    DELETE_MEMORY,
    SINGLE_VALUED,
    PlannedCall,
    content_words,
    memory_kind,
    normalise_memory,
)
from engine.models.prompt_blocks import AliasedMemory


def plan_consolidation(
    memories: Sequence[AliasedMemory], offered_tools: Collection[str]
) -> list[PlannedCall]:
    """The deletes that leave one memory per fact (``memories`` oldest first)."""
    if DELETE_MEMORY not in offered_tools:
        return []
    seen_kinds: set[str] = set()
    seen_keys: set[frozenset[str] | str] = set()
    outdated: set[str] = set()
    for memory in reversed(memories):  # newest first: the first of a kind wins
        kind = memory_kind(memory.text)
        words = content_words(memory.text)
        key: frozenset[str] | str = words or normalise_memory(memory.text)
        if (kind in SINGLE_VALUED and kind in seen_kinds) or key in seen_keys:
            outdated.add(memory.alias)
            continue
        if kind is not None:
            seen_kinds.add(kind)
        seen_keys.add(key)
    return [PlannedCall(DELETE_MEMORY, {"id": m.alias}) for m in memories if m.alias in outdated]
