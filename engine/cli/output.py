"""How commands print: safe text for people, exact JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from datetime import datetime
from typing import Any, TextIO

from engine.redact import scrub
from engine.terminal import terminal_safe


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def print_json(value: Any, stream: TextIO | None = None) -> None:
    # ensure_ascii keeps control characters and lone surrogates as \\u escapes.
    out = stream or sys.stdout
    out.write(scrub(json.dumps(value, default=_default, ensure_ascii=True)) + "\n")
    out.flush()


def say(text: str = "", stream: TextIO | None = None, end: str = "\n") -> None:
    out = stream or sys.stdout
    out.write(terminal_safe(scrub(text)) + end)
    out.flush()


def warn(text: str) -> None:
    sys.stderr.write("memchat: " + terminal_safe(scrub(text)) + "\n")
    sys.stderr.flush()


def when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def one_line(text: str) -> str:
    """Newlines as visible ``\\n``, for text that must stay on one line."""
    return text.replace("\r\n", "\n").replace("\n", "\\n")


def tokens_cell(prompt: int | None, completion: int | None) -> str:
    """``1,204/96`` (prompt/completion); empty when the endpoint reported nothing."""
    if prompt is None and completion is None:
        return ""
    return f"{prompt or 0:,}/{completion or 0:,}"


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [len(h) for h in headers]
    safe_rows = [[terminal_safe(cell).replace("\n", " ") for cell in row] for row in rows]
    for row in safe_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in safe_rows:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
