"""How a model is asked for memory changes, and how its answer is read.

Two forms exist (``memory.extraction``):

* ``tools``: the model calls ``add_memory`` / ``update_memory`` /
  ``delete_memory``. No call at all is a normal answer ("nothing to remember").
* ``json``: the model answers one object
  ``{"add": [...], "update": [{"id": "m1", "memory": "..."}], "delete": ["m2"]}``
  (an entry may be an object with a ``"turn"`` when several turns were asked about),
  for endpoints that refuse or ignore tools. Small local models wrap it in
  code fences or prose, so the first JSON object in the text that has one of
  those keys is taken.

``auto`` starts with tools and switches an endpoint to json when it refuses
tools (HTTP 400 "does not support tools") or ignores them (a forced probe call
comes back without a call). What was learnt is kept per endpoint in a small
file (:class:`EndpointModes`), so every process, ``memchat doctor`` and the
status line see the same answer, and the probe runs once, not per job.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import platformdirs

from engine.models.base import ToolCall

ExtractionMode = Literal["tools", "json"]

ADD, UPDATE, DELETE = "add_memory", "update_memory", "delete_memory"
CHANGE_KEYS = ("add", "update", "delete")
MAX_JSON_DEPTH = 10
"""An argument nested deeper than this is refused: memories are flat statements."""
MAX_SCANNED_CHARS = 200_000
"""How much of an answer is searched for the JSON object (answers are bounded by max_tokens)."""
MODES_FILE = "endpoint-modes.json"


@dataclass(frozen=True, slots=True)
class JsonChanges:
    """The changes read from a json-mode answer. ``usable`` is False when the
    text held no change object at all (and was not simply empty)."""

    calls: tuple[ToolCall, ...]
    usable: bool


def parse_json_changes(text: str) -> JsonChanges:
    """Read ``{"add": ..., "update": ..., "delete": ...}`` out of a model's answer."""
    stripped = text.strip()
    if not stripped or stripped.lower().strip(".!") in ("none", "null", "{}", "nothing"):
        return JsonChanges((), usable=True)
    found = _first_change_object(stripped[:MAX_SCANNED_CHARS])
    if found is None:
        return JsonChanges((), usable=False)
    return JsonChanges(tuple(_calls_of(found)), usable=True)


def _first_change_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict) and (any(key in value for key in CHANGE_KEYS) or not value):
            return value
        start = text.find("{", start + 1)
    return None


def _calls_of(changes: dict[str, Any]) -> Iterator[ToolCall]:
    number = 0

    def call(name: str, arguments: dict[str, Any] | None, error: str | None = None) -> ToolCall:
        nonlocal number
        number += 1
        return ToolCall(f"json_{number}", name, arguments or {}, error)

    for item in _items(changes.get("add")):
        if isinstance(item, str):
            yield call(ADD, {"memory": item})
        elif isinstance(item, dict) and depth(item) <= MAX_JSON_DEPTH:
            memory = item.get("memory", item.get("content", item.get("text")))
            yield call(
                ADD, _with_turn({"memory": memory, "topics": item.get("topics") or []}, item)
            )
        else:
            yield call(ADD, None, _bad_item(item))
    for item in _items(changes.get("update")):
        if isinstance(item, dict) and depth(item) <= MAX_JSON_DEPTH:
            memory = item.get("memory", item.get("content", item.get("text")))
            arguments = {"id": item.get("id"), "memory": memory}
            if "topics" in item:
                arguments["topics"] = item["topics"]
            yield call(UPDATE, _with_turn(arguments, item))
        else:
            yield call(UPDATE, None, _bad_item(item))
    for item in _items(changes.get("delete")):
        if isinstance(item, str):
            yield call(DELETE, {"id": item})
        elif isinstance(item, dict) and depth(item) <= MAX_JSON_DEPTH:
            yield call(DELETE, _with_turn({"id": item.get("id")}, item))
        else:
            yield call(DELETE, None, _bad_item(item))


def _with_turn(arguments: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    # Several turns in one request: each change says which one it comes from.
    if "turn" in item:
        arguments["turn"] = item["turn"]
    return arguments


def _items(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _bad_item(item: Any) -> str:
    if isinstance(item, dict | list) and depth(item) > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    return f"a JSON {type(item).__name__} where an entry was expected"


def depth(value: Any, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """How deeply ``value`` nests, counted no further than ``limit`` (no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, level = stack.pop()
        if not isinstance(current, dict | list):
            continue
        deepest = max(deepest, level)
        if deepest >= limit:
            return deepest
        children = current.values() if isinstance(current, dict) else current
        stack.extend((child, level + 1) for child in children)
    return deepest


def excerpt(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- what each endpoint was found to take ------------------------------------------------


@dataclass(frozen=True, slots=True)
class LearntMode:
    mode: ExtractionMode
    reason: str
    at: float


class EndpointModes:
    """The extraction mode learnt per endpoint, in a small JSON file.

    A cache, not state: a missing or broken file means "probe again". Writes
    go to a temporary file that replaces the old one, so a reader never sees
    half a file, and two processes learning at once at worst both probe.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_modes_path()

    def get(self, endpoint: str) -> LearntMode | None:
        entry = self._read().get(endpoint)
        if not isinstance(entry, dict) or entry.get("mode") not in ("tools", "json"):
            return None
        reason = entry.get("reason")
        at = entry.get("at")
        return LearntMode(
            entry["mode"],
            reason if isinstance(reason, str) else "",
            at if isinstance(at, int | float) else 0.0,
        )

    def remember(self, endpoint: str, mode: ExtractionMode, reason: str) -> None:
        data = self._read()
        data[endpoint] = {"mode": mode, "reason": reason, "at": time.time()}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".modes-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def forget(self, endpoint: str) -> None:
        data = self._read()
        if data.pop(endpoint, None) is not None:
            with contextlib.suppress(OSError):
                self.path.write_text(json.dumps(data, indent=1, sort_keys=True), "utf-8")

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}


def default_modes_path() -> Path:
    return Path(platformdirs.user_state_dir("memchat")) / MODES_FILE
