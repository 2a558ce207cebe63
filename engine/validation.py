"""Checks and normalisation for everything a user or a model hands us.

Storage rules (documented in README, "Bad input"):
- PostgreSQL ``text`` cannot hold NUL, and lone UTF-16 surrogates cannot be
  encoded as UTF-8: both are replaced with U+FFFD so nothing else is lost.
- Other control characters are stored as they are; every display path escapes
  them instead, so what was said is kept exactly.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from engine.errors import InvalidInput

USER_ID_MAX = 128
_USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]*")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
REPLACEMENT = "\ufffd"


def printable(value: object, limit: int = 60) -> str:
    """A short, quoted, escape-safe rendering of a bad value for an error line."""
    text = value if isinstance(value, str) else repr(value)
    shown = text[:limit]
    shown = _SURROGATE_RE.sub(REPLACEMENT, shown)
    shown = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", shown)
    suffix = "…" if len(text) > limit else ""
    return f"'{shown}{suffix}'"


def validate_user_id(user_id: str) -> str:
    """The canonical form of a user id: trimmed and lower-cased.

    User ids are case-insensitive: ``ALICE@EXAMPLE.COM`` is ``alice@example.com``
    (the database enforces the lower-cased form, migration 0005). Only ASCII
    letters, digits and ``. _ @ + -`` are allowed, so Unicode look-alikes,
    zero-width and bidi characters are refused; ASCII look-alikes (I/l/1,
    O/0, rn/m) are flagged by :func:`look_alike_key`.
    """
    if not isinstance(user_id, str):
        raise InvalidInput(f"invalid user id {printable(user_id)}: expected text")
    candidate = user_id.strip()
    if not candidate:
        raise InvalidInput("user id is empty")
    if len(candidate) > USER_ID_MAX:
        raise InvalidInput(
            f"user id is too long ({len(candidate)} characters, at most {USER_ID_MAX})"
        )
    if not _USER_ID_RE.fullmatch(candidate):
        raise InvalidInput(
            f"invalid user id {printable(candidate)}: use letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return candidate.lower()


# Lower-cased ASCII that reads alike in common terminal fonts. Applied to the
# canonical (lower-cased) id, so a capital I typed for an l arrives as "i".
_LOOK_ALIKE_SEQUENCES = (("rn", "m"), ("vv", "w"), ("cl", "d"))
_LOOK_ALIKE_CHARS = str.maketrans({"1": "l", "i": "l", "|": "l", "0": "o"})


def look_alike_key(user_id: str) -> str:
    """Ids with the same key differ only by characters that look alike (I/l/1, O/0, rn/m)."""
    key = user_id.lower()
    for sequence, single in _LOOK_ALIKE_SEQUENCES:
        key = key.replace(sequence, single)
    return key.translate(_LOOK_ALIKE_CHARS)


def look_alikes(user_id: str, others: Iterable[str]) -> list[str]:
    """The ids among ``others`` that look like ``user_id`` but are not it."""
    key = look_alike_key(user_id)
    return sorted({o for o in others if o != user_id and look_alike_key(o) == key})


def parse_session_id(session_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(session_id, uuid.UUID):
        return session_id
    try:
        return uuid.UUID(str(session_id).strip())
    except ValueError:
        raise InvalidInput(
            f"invalid session id {printable(session_id)}: expected a UUID "
            "(see `memchat sessions --user U`)"
        ) from None


def parse_memory_id(memory_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(memory_id, uuid.UUID):
        return memory_id
    try:
        return uuid.UUID(str(memory_id).strip())
    except ValueError:
        raise InvalidInput(
            f"invalid memory id {printable(memory_id)}: expected a UUID "
            "(see `memchat memories --user U`)"
        ) from None


def storable(text: str) -> str:
    """Make any text storable in PostgreSQL without dropping anything else."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if _SURROGATE_RE.search(text):
        text = _SURROGATE_RE.sub(REPLACEMENT, text)
    return text


def clean_text(text: str, *, what: str, max_chars: int, setting: str) -> str:
    """User-supplied text: storable, not blank, within its limit."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text")
    text = storable(text)
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    if len(text) > max_chars:
        raise InvalidInput(
            f"{what} is too long: {len(text):,} characters, the limit is {max_chars:,} ({setting})"
        )
    return text


def clean_title(title: str, *, max_chars: int) -> str:
    """Session titles are one line: controls become spaces, runs of space collapse."""
    text = storable(title if isinstance(title, str) else "")
    text = " ".join(_CONTROL_RE.sub(" ", text).split())
    if not text:
        raise InvalidInput("session title is empty")
    if len(text) > max_chars:
        raise InvalidInput(
            f"session title is too long: {len(text):,} characters, the limit is {max_chars:,} "
            "(limits.max_title_chars)"
        )
    return text


def default_title(first_message: str, max_chars: int = 60) -> str:
    """A session's title taken from its first user message."""
    text = " ".join(_CONTROL_RE.sub(" ", storable(first_message)).split())
    if len(text) <= max_chars:
        return text or "New session"
    return text[: max_chars - 1].rstrip() + "…"
