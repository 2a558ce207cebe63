"""Text from users, models and libraries, made safe to print on a terminal.

Escape sequences (clear screen, set title, hyperlinks, OSC 52 clipboard
writes), carriage returns and other control characters are shown as visible
``\\xNN`` escapes instead of being obeyed. Newlines and tabs stay.

Characters that are invisible but change what the reader sees are shown as
``\\uNNNN`` too: the bidirectional overrides, embeddings, isolates and marks
(an RTL override makes ``exe.txt`` read as ``txt.exe``) and the zero-width
space, no-break space, word joiner and invisible operators. U+200D (zero-width
joiner) stays: emoji sequences (👩‍👩‍👧) are built with it and it cannot
reorder text.
"""

from __future__ import annotations

import re

_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f"
    # Bidi: Arabic letter mark, LRM/RLM, embeddings and overrides, isolates.
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
    # Zero width: space, non-joiner, word joiner, invisible operators, BOM/ZWNBSP.
    "\u200b\u200c\u2060-\u2064\ufeff"
    "]"
)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    return _CONTROL_RE.sub(_visible, text)
