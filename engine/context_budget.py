"""Fitting a prompt into the model's context window (``model.context_tokens``).

memchat cannot ask every server for its tokenizer, so tokens are estimated
from characters, on the safe side (:func:`estimate_tokens`). The reply's own
``max_tokens`` is reserved first; what is left holds the system prompt, the
memories and the history, and the oldest history goes first.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4
"""Role markers and separators a chat template adds around each message."""

_WORDS_AND_SPACE = str.maketrans("", "", string.ascii_letters + string.whitespace)


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` may take, erring high.

    ASCII letters and spaces count a token per three characters; every other
    character (a digit, punctuation, any non-ASCII letter) counts one: small
    models' tokenizers spend a token per digit, and CJK text runs near one a
    character. (str.translate keeps this fast on 100,000-character messages.)
    """
    others = len(text.translate(_WORDS_AND_SPACE))
    return -(-(len(text) - others) // CHARS_PER_TOKEN) + others + MESSAGE_OVERHEAD_TOKENS


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
    """``text`` cut in the middle to at most about ``tokens``: its start and end both stay."""
    estimate = estimate_tokens(text)
    if estimate <= tokens:
        return text
    limit = len(text)
    clipped = text
    while estimate > tokens and limit > 0:
        # Shrink by the ratio still to go; the two ends may be denser than the
        # whole (digits at one end, prose at the other), hence the loop.
        room = max(tokens - MESSAGE_OVERHEAD_TOKENS, 0)
        share = room / max(estimate - MESSAGE_OVERHEAD_TOKENS, 1)
        limit = min(int(limit * share), limit - 1)
        if limit <= len(marker) + 2:
            return text[: max(limit, 0)]
        half = (limit - len(marker)) // 2
        clipped = text[:half] + marker + text[len(text) - half :]
        estimate = estimate_tokens(clipped)
    return clipped
