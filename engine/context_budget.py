"""Fitting a prompt into the model's context window (``model.context_tokens``).

memchat cannot ask every server for its tokenizer, so tokens are estimated
from characters, on the safe side: one token per three characters (English
prose runs near four, code and other scripts nearer three). The reply's own
``max_tokens`` is reserved first; what is left holds the system prompt, the
memories and the history, and the oldest history goes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4
"""Role markers and separators a chat template adds around each message."""


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


def prompt_budget(context_tokens: int, reply_tokens: int) -> int:
    """Tokens left for the prompt once the reply's room is kept free.

    A reply allowance larger than the window itself would leave nothing; then
    at least a quarter of the window stays for the prompt (the server cuts the
    reply short instead of refusing the request).
    """
    return max(context_tokens - reply_tokens, context_tokens // 4)


@dataclass(frozen=True, slots=True)
class Fitted:
    kept: int
    """How many of the newest items fit."""
    used: int
    """Tokens they take."""


def fit_newest(texts: Sequence[str], budget: int) -> Fitted:
    """How many of ``texts`` (oldest first) fit into ``budget``, keeping the newest."""
    used = 0
    kept = 0
    for text in reversed(texts):
        cost = estimate_tokens(text)
        if used + cost > budget:
            break
        used += cost
        kept += 1
    return Fitted(kept, used)


def clip_to_tokens(text: str, tokens: int, marker: str = " […] ") -> str:
    """``text`` cut in the middle to about ``tokens``: its start and end both stay."""
    limit = max(tokens - MESSAGE_OVERHEAD_TOKENS, 0) * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    if limit <= len(marker) + 2:
        return text[:limit]
    half = (limit - len(marker)) // 2
    return text[:half] + marker + text[len(text) - half :]
