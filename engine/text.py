"""Small text helpers shared by the engine and the TUI: one line, a reason, a count."""

from __future__ import annotations


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (any run of whitespace becomes one space), at most ``limit`` chars."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def reason_of(exc: BaseException) -> str:
    """What went wrong, in the exception's words, or its type's name when it has none."""
    text = str(exc).strip()
    return text or type(exc).__name__


def plural(count: int, noun: str) -> str:
    """``1 memory``, ``2 memories``, ``3 keys``: a count with its noun."""
    if count == 1:
        return f"1 {noun}"
    many = noun[:-1] + "ies" if noun.endswith("y") and not noun.endswith("ey") else noun + "s"
    return f"{count} {many}"
