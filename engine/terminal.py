"""Text from users and models, made safe to print on a terminal.

Escape sequences (clear screen, set title, hyperlinks), carriage returns and
other control characters are shown as visible ``\\xNN`` escapes instead of
being obeyed. Newlines and tabs stay.
"""

from __future__ import annotations

import re

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def terminal_safe(text: str) -> str:
    return _CONTROL_RE.sub(_visible, text)
