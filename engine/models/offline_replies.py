"""The offline model's chat replies: a pure function of the prompt.

It answers the last user message from the memories in the system prompt
(the ``<memories>`` block), so the demo shows memory working end to end
without a network. Replies are one to three sentences of plain Markdown; user
text is only ever quoted, never interpreted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.models.base import ChatMessage
from engine.models.offline_rules import (
    Fact,
    Forget,
    Statements,
    content_words,
    parse_statements,
)
from engine.models.prompt_blocks import parse_context_memories

MAX_QUOTE_CHARS = 80
MAX_SENTENCES = 3

_NAME_QUESTION = re.compile(
    r"\b(?:what(?:['’]?s| is) my name|who am i\b|do you (?:know|remember) (?:my name|who i am)"
    r"|what do you call me)",
    re.IGNORECASE,
)
_ABOUT_ME_QUESTION = re.compile(
    r"\bwhat do you (?:know|remember)(?: about me)?\b|\bwhat have i told you\b", re.IGNORECASE
)
_LIKES_QUESTION = re.compile(
    r"\bwhat (?:do|things do) i (?:like|love|enjoy)\b|\bwhat are my (?:interests|hobbies)\b"
    r"|\bwhat am i into\b|\bwhat(?:['’]?s| is| are) my fav(?:ou?rite)?",
    re.IGNORECASE,
)
_LOCATION_QUESTION = re.compile(r"\bwhere do i live\b|\bwhere am i from\b", re.IGNORECASE)
_WORK_QUESTION = re.compile(r"\bwhere do i work\b|\bwhat(?:['’]?s| is) my job\b", re.I)
_AGE_QUESTION = re.compile(r"\bhow old am i\b|\bwhat(?:['’]?s| is) my age\b", re.IGNORECASE)
_PLANS_QUESTION = re.compile(
    r"\bwhat are my plans\b|\bwhat am i (?:doing|going to do|planning)\b", re.IGNORECASE
)
_SUGGEST = re.compile(
    r"\b(?:suggest|suggestion|recommend|recommendation|any ideas|what should i do"
    r"|what can i do|bored)\b",
    re.IGNORECASE,
)
_GREETING = re.compile(
    r"^(?:hi|hello|hey|hiya|howdy|yo|greetings|good (?:morning|afternoon|evening))"
    r"(?:\s+there)?[\s!.,]*$",
    re.IGNORECASE,
)
_THANKS = re.compile(r"^(?:thanks|thank you|thx|ty|cheers)\b", re.IGNORECASE)
_QUESTION_START = re.compile(
    r"^(?:what|who|where|when|why|how|which|do|does|did|can|could|would|should|will|is|are)\b",
    re.IGNORECASE,
)
_LIST_SPLIT = re.compile(r",\s*|\s+and\s+|\s+or\s+", re.IGNORECASE)


@dataclass
class Profile:
    """What the memories in the prompt say about the user."""

    name: str | None = None
    likes: list[tuple[str, str]] = field(default_factory=list)  # (verb, object)
    dislikes: list[str] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)  # "going to the movies tonight"
    location: str | None = None
    work: str | None = None  # "as a nurse"
    age: str | None = None
    memories: list[str] = field(default_factory=list)


_PROFILE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("name", re.compile(r"^name is (?P<v>.+)$", re.IGNORECASE)),
    ("like", re.compile(r"^(?P<verb>likes|loves|enjoys) (?P<v>.+)$", re.IGNORECASE)),
    ("dislike", re.compile(r"^dislikes (?P<v>.+)$", re.IGNORECASE)),
    ("plan", re.compile(r"^is (?P<v>(?:going|planning|hoping) (?:to|on) .+)$", re.IGNORECASE)),
    ("plan", re.compile(r"^(?P<verb>plans|intends|wants) to (?P<v>.+)$", re.IGNORECASE)),
    ("location", re.compile(r"^(?:lives in|is from) (?P<v>.+)$", re.IGNORECASE)),
    ("work", re.compile(r"^works (?P<v>(?:as|at|for|in) .+)$", re.IGNORECASE)),
    ("age", re.compile(r"^is (?P<v>\d+) years old$", re.IGNORECASE)),
)
_VERB_BASE = {"likes": "like", "loves": "love", "enjoys": "enjoy"}
_PLAN_VERB_BASE = {"plans": "plan", "intends": "intend", "wants": "want"}


def compose_reply(messages: Sequence[ChatMessage]) -> str:
    """The offline model's reply to the last user message of ``messages``."""
    memories: list[str] = []
    for message in messages:
        if message.role == "system":
            memories.extend(parse_context_memories(message.content))
    text = next((m.content for m in reversed(messages) if m.role == "user"), "")
    return reply_to(" ".join(text.split()), build_profile(memories))


def build_profile(memories: Sequence[str]) -> Profile:
    profile = Profile(memories=list(memories))
    for memory in memories:
        text = memory.strip().rstrip(".")
        for kind, pattern in _PROFILE_PATTERNS:
            match = pattern.match(text)
            if match is None:
                continue
            value = match["v"].strip()
            if kind == "name":
                profile.name = profile.name or value
            elif kind == "like":
                profile.likes.append((_VERB_BASE[match["verb"].lower()], value))
            elif kind == "dislike":
                profile.dislikes.append(value)
            elif kind == "plan":
                verb = match.groupdict().get("verb")
                plan = f"{_PLAN_VERB_BASE[verb.lower()]} to {value}" if verb else value
                profile.plans.append(plan)
            elif kind == "location":
                profile.location = profile.location or value
            elif kind == "work":
                profile.work = profile.work or value
            elif kind == "age":
                profile.age = profile.age or value
            break
    return profile


def reply_to(text: str, profile: Profile) -> str:
    if not text:
        return "I didn't catch that. Could you say it again?"
    for answer in (
        _answer_name,
        _answer_about_me,
        _answer_likes,
        _answer_location,
        _answer_work,
        _answer_age,
        _answer_plans,
        _answer_suggestion,
    ):
        if (reply := answer(text, profile)) is not None:
            return reply
    statements = parse_statements(text)
    if statements.items:
        return _acknowledge(statements, profile)
    if _GREETING.match(text):
        return f"Hello{_comma_name(profile)}! How can I help you today?"
    if _THANKS.match(text):
        return "You're welcome! Anything else on your mind?"
    if text.endswith("?") or _QUESTION_START.match(text):
        return (
            "I'm the offline model, so I can only answer from what you've told me. "
            f'You asked: "{quote(text)}"'
        )
    return f'You said: "{quote(text)}". Tell me more!'


def _answer_name(text: str, profile: Profile) -> str | None:
    if not _NAME_QUESTION.search(text):
        return None
    if profile.name:
        return f"Your name is {profile.name}."
    return "I don't know your name yet. Tell me and I'll remember it."


def _answer_about_me(text: str, profile: Profile) -> str | None:
    if not _ABOUT_ME_QUESTION.search(text):
        return None
    if not profile.memories:
        return "I don't know anything about you yet. Tell me about yourself!"
    lines = "\n".join(f"- {memory}" for memory in profile.memories)
    return f"Here's what I know about you:\n\n{lines}"


def _answer_likes(text: str, profile: Profile) -> str | None:
    if not _LIKES_QUESTION.search(text):
        return None
    if not profile.likes:
        return "I don't know what you like yet. Tell me about your hobbies!"
    parts = [f"you {verb} {obj}" for verb, obj in profile.likes]
    # ", and" keeps "anime and video games" readable as one item.
    return f"You told me that {', and '.join(parts)}."


def _answer_location(text: str, profile: Profile) -> str | None:
    if not _LOCATION_QUESTION.search(text):
        return None
    if profile.location:
        return f"You told me: {profile.location}."
    return "I don't know where you live yet."


def _answer_work(text: str, profile: Profile) -> str | None:
    if not _WORK_QUESTION.search(text):
        return None
    if profile.work:
        return f"You work {profile.work}."
    return "I don't know what you do for work yet."


def _answer_age(text: str, profile: Profile) -> str | None:
    if not _AGE_QUESTION.search(text):
        return None
    if profile.age:
        return f"You're {profile.age} years old."
    return "I don't know how old you are yet."


def _answer_plans(text: str, profile: Profile) -> str | None:
    if not _PLANS_QUESTION.search(text):
        return None
    if profile.plans:
        return f"You told me you're {_join(profile.plans)}."
    return "I don't know about any plans of yours yet."


def _answer_suggestion(text: str, profile: Profile) -> str | None:
    if not _SUGGEST.search(text):
        return None
    when = next(
        (f" {word}" for word in ("this weekend", "tonight", "today", "tomorrow") if word in text),
        "",
    )
    sentences = []
    if profile.likes:
        verb, obj = profile.likes[0]
        sentences.append(
            f"Since you {verb} {obj}, how about an afternoon of {_first_item(obj)}{when}?"
        )
        if len(profile.likes) > 1:
            sentences.append(f"You could also make time for {_first_item(profile.likes[1][1])}.")
    else:
        sentences.append(
            f"How about a walk outside, a new recipe or catching up with a friend{when}? "
            "Tell me what you enjoy and I can tailor my suggestions."
        )
    if profile.plans:
        sentences.append(f"And don't forget: you're {profile.plans[0]}.")
    return " ".join(sentences[:MAX_SENTENCES])


def _acknowledge(statements: Statements, profile: Profile) -> str:
    # One sentence per statement, duplicates dropped, capped so replies stay short.
    sentences = dict.fromkeys(_acknowledge_one(item, profile) for item in statements.items)
    return " ".join(list(sentences)[:MAX_SENTENCES])


def _acknowledge_one(item: Fact | Forget, profile: Profile) -> str:
    if isinstance(item, Forget):
        if item.everything:
            return "Okay, I'll forget everything I know about you."
        if not content_words(item.phrase):
            return 'Tell me what to forget, for example "forget that I like anime".'
        return "Okay, I'll forget that."
    value = second_person(item.value)
    match item.kind:
        case "name":
            if profile.name and profile.name.casefold() != item.value.casefold():
                return f"Got it, {item.value}, I'll call you that from now on!"
            return f"Nice to meet you, {item.value}!"
        case "like":
            return f"Nice, I'll remember that you {item.verb} {value}!"
        case "dislike":
            return f"Noted: you're not a fan of {value}."
        case "favorite":
            return f"Good choice, I'll remember that your favorite {item.verb} is {value}!"
        case "plan":
            if item.verb == "going to" and _is_place(value):
                return f"Have a great time at {value}!"
            if item.verb == "hoping to":
                return f"I hope you get to {value}!"
            if item.verb.endswith(" on"):
                return f"Good luck with {value}!"
            return f"Good luck with your plan to {value}!"
        case "location" | "origin":
            return f"{value[:1].upper()}{value[1:]} sounds like a lovely place!"
        case "work":
            return f"Working {item.verb} {value} sounds interesting!"
        case "age":
            return f"Thanks, I'll remember that you're {value}!"
    return "Thanks, I'll remember that."


def _is_place(value: str) -> bool:
    # "going to the movies tonight" reads as a place, "going to study" does not.
    return value.casefold().startswith(("the ", "a ", "an "))


def second_person(text: str) -> str:
    """ "my dog" -> "your dog": the reply speaks to the user."""
    swaps = {"my": "your", "me": "you", "myself": "yourself", "mine": "yours"}
    return re.sub(
        r"\b(my|me|myself|mine)\b",
        lambda match: swaps[match[1].lower()],
        text,
        flags=re.IGNORECASE,
    )


def quote(text: str) -> str:
    """``text`` on one line, cut to a readable length."""
    one_line = " ".join(text.split())
    if len(one_line) <= MAX_QUOTE_CHARS:
        return one_line
    return one_line[: MAX_QUOTE_CHARS - 1].rstrip() + "…"


def _first_item(obj: str) -> str:
    return _LIST_SPLIT.split(obj, maxsplit=1)[0].strip() or obj


def _comma_name(profile: Profile) -> str:
    return f", {profile.name}" if profile.name else ""


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return f"{', '.join(parts[:-1])} and {parts[-1]}"
