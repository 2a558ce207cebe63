"""The tagged text blocks that carry memories and turns inside prompts.

Two shapes exist, and both the prompt builders (agent, memory manager) and the
offline model use these functions, so what one side renders the other parses:

* the chat system prompt carries the user's memories as ``- text`` lines::

      <memories>
      - Name is Mark Gonzales
      </memories>

* the memory-extraction request carries memories under short aliases (so a
  model never sees or has to copy database ids), then the turn::

      <memories>
      [m1] Name is Mark Gonzales
      </memories>
      <user_message>
      Actually my name is Marcus.
      </user_message>
      <assistant_reply>
      ...
      </assistant_reply>

* when one job extracts from several turns of a user at once (coalesced
  extraction), each turn is a ``<turn id="t1">`` block holding those two
  blocks, oldest first, after a line asking for the turn of each change::

      <memories>
      ...
      </memories>
      Several turns follow, oldest first. ...
      <turn id="t1">
      <user_message>
      ...
      </assistant_reply>
      </turn>
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MEMORIES_TAG = "memories"
USER_MESSAGE_TAG = "user_message"
ASSISTANT_REPLY_TAG = "assistant_reply"
TURN_TAG = "turn"
CONSOLIDATE_TAG = "consolidate"
NO_MEMORIES = "(none)"
SEVERAL_TURNS = (
    "Several turns follow, oldest first. Give every change the id of the turn it "
    'comes from as its "turn" (for example "t2"); a later turn overrides an earlier one.'
)

_TAGS = (MEMORIES_TAG, USER_MESSAGE_TAG, ASSISTANT_REPLY_TAG, TURN_TAG, CONSOLIDATE_TAG)
_ALIASED_LINE = re.compile(r"^\[(?P<alias>[A-Za-z0-9_-]+)\]\s*(?P<text>.*)$")
_TURN_BLOCK = re.compile(r'<turn id="(?P<label>t[0-9]+)">(?P<body>.*?)(?:</turn>|\Z)', re.DOTALL)


@dataclass(frozen=True, slots=True)
class AliasedMemory:
    alias: str  # e.g. "m1"; what tool calls use as the memory id
    text: str


@dataclass(frozen=True, slots=True)
class ExtractionRequest:
    memories: tuple[AliasedMemory, ...]
    user_message: str
    assistant_reply: str


@dataclass(frozen=True, slots=True)
class TurnText:
    label: str  # e.g. "t1"; what a change names as its "turn"
    user_message: str
    assistant_reply: str


def turn_label(index: int) -> str:
    """Label of the turn at 0-based ``index`` in a several-turn extraction request."""
    return f"t{index + 1}"


def memory_alias(index: int) -> str:
    """Alias of the memory at 0-based ``index`` in an extraction request."""
    return f"m{index + 1}"


def render_context_memories(memories: Iterable[str]) -> str:
    """The ``<memories>`` block of a chat system prompt."""
    lines = [f"- {_one_line(text)}" for text in memories]
    return _block(MEMORIES_TAG, "\n".join(lines) if lines else NO_MEMORIES)


def render_extraction_memories(memories: Iterable[AliasedMemory]) -> str:
    """The ``<memories>`` block of an extraction request, one ``[alias] text`` per line."""
    lines = [f"[{memory.alias}] {_one_line(memory.text)}" for memory in memories]
    return _block(MEMORIES_TAG, "\n".join(lines) if lines else NO_MEMORIES)


def render_extraction_request(
    memories: Iterable[AliasedMemory], user_message: str, assistant_reply: str
) -> str:
    """The whole tagged part of an extraction request (memories, then the turn)."""
    return "\n".join(
        (
            render_extraction_memories(memories),
            _block(USER_MESSAGE_TAG, _neutralise_tags(user_message.strip())),
            _block(ASSISTANT_REPLY_TAG, _neutralise_tags(assistant_reply.strip())),
        )
    )


def render_extraction_turns(memories: Iterable[AliasedMemory], turns: Sequence[TurnText]) -> str:
    """An extraction request for one turn (exactly :func:`render_extraction_request`)
    or for several, each in its own labelled ``<turn>`` block, oldest first."""
    if len(turns) == 1:
        return render_extraction_request(memories, turns[0].user_message, turns[0].assistant_reply)
    parts = [render_extraction_memories(memories), SEVERAL_TURNS]
    for turn in turns:
        parts += [
            f'<{TURN_TAG} id="{turn.label}">',
            _block(USER_MESSAGE_TAG, _neutralise_tags(turn.user_message.strip())),
            _block(ASSISTANT_REPLY_TAG, _neutralise_tags(turn.assistant_reply.strip())),
            f"</{TURN_TAG}>",
        ]
    return "\n".join(parts)


def parse_extraction_turns(text: str) -> list[TurnText]:
    """The turns of an extraction request: its ``<turn>`` blocks in order, or, for a
    one-turn request, that turn as ``t1``."""
    turns = [
        TurnText(
            match["label"],
            (extract_block(match["body"], USER_MESSAGE_TAG) or "").strip(),
            (extract_block(match["body"], ASSISTANT_REPLY_TAG) or "").strip(),
        )
        for match in _TURN_BLOCK.finditer(text)
    ]
    if turns:
        return turns
    single = parse_extraction_request(text)
    return [TurnText(turn_label(0), single.user_message, single.assistant_reply)]


def render_consolidation_request(memories: Iterable[AliasedMemory]) -> str:
    """A memory-consolidation request (engine/consolidate.py): the memories, oldest
    first, inside a ``<consolidate>`` block, so no turn is mistaken for it."""
    return _block(CONSOLIDATE_TAG, render_extraction_memories(memories))


def parse_consolidation_request(text: str) -> list[AliasedMemory] | None:
    """The memories of a consolidation request, oldest first; None if ``text`` is none."""
    body = extract_block(text, CONSOLIDATE_TAG)
    return None if body is None else parse_extraction_memories(body)


def parse_context_memories(text: str) -> list[str]:
    """Memory texts of the ``<memories>`` block in ``text``; [] when there is none.

    Accepts both ``- text`` and ``[alias] text`` lines so that either renderer's
    output is understood.
    """
    body = extract_block(text, MEMORIES_TAG)
    if body is None:
        return []
    memories = []
    for raw in body.splitlines():
        line = raw.strip()
        if line.startswith("- "):
            memories.append(line[2:].strip())
        elif match := _ALIASED_LINE.match(line):
            memories.append(match["text"].strip())
    return [memory for memory in memories if memory]


def parse_extraction_memories(text: str) -> list[AliasedMemory]:
    """``[alias] text`` lines of the ``<memories>`` block in ``text``."""
    body = extract_block(text, MEMORIES_TAG)
    if body is None:
        return []
    memories = []
    for raw in body.splitlines():
        match = _ALIASED_LINE.match(raw.strip())
        if match and match["text"].strip():
            memories.append(AliasedMemory(match["alias"], match["text"].strip()))
    return memories


def parse_extraction_request(text: str) -> ExtractionRequest:
    """Parse what :func:`render_extraction_request` produced, tolerating prose around it.

    Without a ``<user_message>`` block the whole text (minus any memories
    block) is taken as the user's message, so a hand-written prompt still works.
    """
    user_message = extract_block(text, USER_MESSAGE_TAG)
    if user_message is None:
        user_message = _remove_block(text, MEMORIES_TAG)
    return ExtractionRequest(
        memories=tuple(parse_extraction_memories(text)),
        user_message=user_message.strip(),
        assistant_reply=(extract_block(text, ASSISTANT_REPLY_TAG) or "").strip(),
    )


def extract_block(text: str, tag: str) -> str | None:
    """Content between the first ``<tag>`` and the next ``</tag>``, or None."""
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    # An unclosed block runs to the end: a truncated prompt still parses.
    return text[start:] if end < 0 else text[start:end]


def _remove_block(text: str, tag: str) -> str:
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.find(open_tag)
    if start < 0:
        return text
    end = text.find(close_tag, start)
    return text[:start] if end < 0 else text[:start] + text[end + len(close_tag) :]


def _block(tag: str, body: str) -> str:
    return f"<{tag}>\n{body}\n</{tag}>"


def _one_line(text: str) -> str:
    # One memory per line is what makes the block parseable.
    return " ".join(_neutralise_tags(text).split())


def _neutralise_tags(text: str) -> str:
    # User text that spells one of our tags would otherwise end its block
    # early; a space inside the tag keeps it readable but no longer a tag.
    for tag in _TAGS:
        text = text.replace(f"<{tag}>", f"< {tag}>").replace(f"</{tag}>", f"</ {tag}>")
    return text.replace(f"<{TURN_TAG} id=", f"< {TURN_TAG} id=")
