"""The offline model's memory rules: what a user said -> which memory tool calls.

Pure functions, no I/O, so the offline model stays deterministic and these
rules can be tested (and read) on their own. The chat replies live in
:mod:`engine.models.offline_replies`, which reuses :func:`parse_statements`.

Rules, applied to the user's message only (never to the assistant reply):

* The message is split into sentences, then into clauses at "and I ...",
  ", my ..." and the like, so one message can carry several facts.
  Questions (a clause starting with a question word, or the last clause of a
  sentence ending in "?") state nothing.
* Facts, each becoming one memory in the third person:

  ====================================  ===============================  ===========
  user says                             memory                           topics
  ====================================  ===============================  ===========
  my name is X / call me X              Name is X                        name
  I like / love / enjoy X               Likes / Loves / Enjoys X         interests
  I hate / dislike / don't like X       Dislikes X                       preferences
  my favorite T is X                    Favorite T is X                  preferences
  I'm going / planning / hoping to X    Is going / planning / hoping to  plans
  I plan / intend / want to X           Plans / Intends / Wants to X     plans
  I live in X                           Lives in X                       location
  I'm from X                            Is from X                        location
  I work as / at / for / in X           Works as / at / for / in X       work
  I'm N years old                       Is N years old                   age
  ====================================  ===============================  ===========

  A name is at most five words and stops at punctuation, "and", "but" and the
  like; "I'm X" is deliberately not a name ("I'm going to ..." is not one).
* Name, age and "Lives in" are single-valued: when a memory of that kind
  exists, a different value updates it, the same value does nothing.
  Otherwise a fact whose normalised text (casefolded, spaces collapsed,
  trailing punctuation removed) equals an existing memory adds nothing.
* "forget that I ... / forget my ... / forget about ..." deletes every memory
  that contains all the content words of the phrase after the verb. Content
  words are the phrase's words minus pronouns, articles, prepositions and
  other filler; both sides are compared after light stemming ("likes" ->
  "like") and with like/love/enjoy/adore treated as one word. So "forget that
  I like anime" deletes "Likes anime and video games", and "forget my name"
  deletes "Name is Mark". A phrase without content words ("forget it")
  deletes nothing; "forget everything" deletes all memories. Only a clause
  that starts with the request counts ("please forget ...", "can you forget
  ..."), so "don't forget ..." and "I forget things" delete nothing.
* Only tools the caller offers are called; a rule that needs another tool is
  skipped.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.models.prompt_blocks import AliasedMemory, TurnText

FactKind = Literal[
    "name", "like", "dislike", "favorite", "plan", "location", "origin", "work", "age"
]

# One value per user: a new value replaces the old memory instead of adding.
SINGLE_VALUED: frozenset[FactKind] = frozenset({"name", "age", "location"})

ADD_MEMORY = "add_memory"
UPDATE_MEMORY = "update_memory"
DELETE_MEMORY = "delete_memory"

MAX_NAME_WORDS = 5
MAX_OBJECT_CHARS = 200


@dataclass(frozen=True, slots=True)
class Fact:
    kind: FactKind
    memory: str  # third-person memory text, e.g. "Likes anime and video games"
    topics: tuple[str, ...]
    value: str  # the user's own words for the object/name, e.g. "anime and video games"
    verb: str = ""  # how it was said, e.g. "like", "going to", "at"


@dataclass(frozen=True, slots=True)
class Forget:
    phrase: str
    everything: bool = False


Statement = Fact | Forget


@dataclass(frozen=True, slots=True)
class Statements:
    items: tuple[Statement, ...]
    has_question: bool

    @property
    def facts(self) -> tuple[Fact, ...]:
        return tuple(item for item in self.items if isinstance(item, Fact))

    @property
    def forgets(self) -> tuple[Forget, ...]:
        return tuple(item for item in self.items if isinstance(item, Forget))


@dataclass(frozen=True, slots=True)
class PlannedCall:
    name: str
    arguments: dict[str, Any]


# --- splitting ------------------------------------------------------------------

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_SUBJECT = r"(?:i|i'm|i’m|im|i've|i’ve|my|please)\b"
_QUESTION_WORD = (
    r"(?:what|what's|what’s|whats|who|who's|where|when|why|how|which|do|does|did|can|could"
    r"|would|should|will|is|are|am|have|has)\b"
)
_CLAUSE_SPLIT = re.compile(
    rf"\s*[,;]?\s+(?:and|but|so|also)\s+(?={_SUBJECT})"
    rf"|\s*[,;:—]\s*(?={_SUBJECT}|{_QUESTION_WORD})",
    re.IGNORECASE,
)
_FILLER = re.compile(
    r"^(?:(?:hi|hello|hey|hiya|yo|oh|ok|okay|well|so|and|but|also|btw|by the way|anyway"
    r"|actually|um|uh|just|fyi|oh and|there)\b[\s,!.:;-]*)+",
    re.IGNORECASE,
)
_QUESTION_START = re.compile(rf"^{_QUESTION_WORD}", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_SPLIT.split(text) if part.strip()]


def split_clauses(sentence: str) -> list[str]:
    return [part.strip() for part in _CLAUSE_SPLIT.split(sentence) if part and part.strip()]


def strip_filler(clause: str) -> str:
    return _FILLER.sub("", clause.strip()).strip()


def is_question_clause(clause: str, *, ends_sentence_with_question_mark: bool) -> bool:
    return ends_sentence_with_question_mark or bool(_QUESTION_START.match(strip_filler(clause)))


# --- statements -----------------------------------------------------------------

_APOSTROPHE = "['’]"
_I_AM = rf"(?:i am|i{_APOSTROPHE}m|im)"
_ADVERBS = (
    r"(?:(?:also|really|just|totally|still|truly|absolutely|actually|do|kind of|kinda|sort of"
    r"|definitely|very much|now|currently|finally)\s+)*"
)

# Anchored at the start of a clause so that "I forget things" or "don't forget
# ..." never delete anything.
_FORGET = re.compile(
    r"^(?:please\s+|(?:can|could|would|will)\s+you\s+(?:please\s+)?|i want you to\s+)?"
    r"forget\b(?:\s+(?:that|about|the fact that|what i said about|everything i said about))*"
    r"\s*(?P<phrase>.*)$",
    re.IGNORECASE,
)
_NAME = re.compile(
    rf"\b(?:my name(?:{_APOSTROPHE}s|\s+is)(?:\s+actually)?|call me)\s+(?P<rest>.+)$",
    re.IGNORECASE,
)
_AGE = re.compile(
    rf"^{_I_AM}\s+(?:now\s+|actually\s+)?(?P<n>\d{{1,3}})\s*(?:years?|yrs?)(?:\s+old)?\b",
    re.IGNORECASE,
)
_PLAN_BE = re.compile(
    rf"^{_I_AM}\s+{_ADVERBS}(?P<verb>going|planning|gonna|hoping)\s+(?P<prep>to|on)\s+(?P<obj>.+)$",
    re.IGNORECASE,
)
_PLAN_DO = re.compile(
    rf"^i\s+{_ADVERBS}(?P<verb>plan|intend|want)\s+to\s+(?P<obj>.+)$", re.IGNORECASE
)
_LIVE = re.compile(rf"^i\s+{_ADVERBS}live\s+in\s+(?P<obj>.+)$", re.IGNORECASE)
_FROM = re.compile(rf"^{_I_AM}\s+{_ADVERBS}from\s+(?P<obj>.+)$", re.IGNORECASE)
_WORK = re.compile(rf"^i\s+{_ADVERBS}work\s+(?P<prep>as|at|for|in)\s+(?P<obj>.+)$", re.IGNORECASE)
_DISLIKE = re.compile(
    rf"^i\s+{_ADVERBS}(?:(?:hate|dislike|detest)|(?:can{_APOSTROPHE}t|cannot|can not)\s+stand"
    rf"|(?:don{_APOSTROPHE}t|do not|dont)\s+(?:really\s+)?(?:like|love|enjoy))\s+(?P<obj>.+)$",
    re.IGNORECASE,
)
_LIKE = re.compile(rf"^i\s+{_ADVERBS}(?P<verb>like|love|enjoy|adore)\s+(?P<obj>.+)$", re.IGNORECASE)
_FAVORITE = re.compile(
    r"\bmy\s+fav(?:ou?rite)?\s+(?P<what>[\w ]{1,30}?)\s+is\s+(?P<obj>.+)$", re.IGNORECASE
)

_LIKE_VERBS = {"like": "Likes", "love": "Loves", "enjoy": "Enjoys", "adore": "Loves"}
_PLAN_BE_VERBS = {"going": "going", "gonna": "going", "planning": "planning", "hoping": "hoping"}
_PLAN_DO_VERBS = {"plan": "Plans", "intend": "Intends", "want": "Wants"}

_NAME_WORD = re.compile(r"[^\W\d_][\w'’.-]*")
_NAME_PARTICLES = frozenset({"de", "da", "del", "della", "di", "van", "von", "der", "la", "le"})
_NOT_NAME_WORDS = frozenset(
    {"i", "im", "i'm", "i’m", "and", "but", "so", "or", "from", "who", "because", "though",
     "btw", "nice", "please", "what", "how", "you", "not", "a", "an", "the", "no", "too",
     "also", "actually", "here", "now", "maybe", "later", "back", "anytime", "whenever",
     "tomorrow", "when", "if"}
)  # fmt: skip
_NAME_CUT = re.compile(
    r"[,.!?;:()\"“”]|\s(?:and|but|so|or|from|who|because|though|btw)\s", re.IGNORECASE
)
_MEANINGLESS_OBJECTS = frozenset({"it", "that", "this", "them", "those", "these", "you", "so"})
_TRAILING_WORDS = re.compile(r"(?:\s+(?:too|as well|also|a lot|very much|so much))+$", re.I)
_TRAILING_PUNCTUATION = ".,!?;:…-–— \t"
_THIRD_PERSON = {"my": "their", "me": "them", "myself": "themselves", "mine": "theirs"}


def parse_statements(text: str) -> Statements:
    """Facts and forget requests in ``text``, in the order they were said."""
    items: list[Statement] = []
    has_question = False
    for sentence in split_sentences(text):
        clauses = split_clauses(sentence)
        for index, clause in enumerate(clauses):
            question_mark = sentence.endswith("?") and index == len(clauses) - 1
            # "Can you forget that ...?" is a request, not a question.
            if (forget := _parse_forget(clause)) is not None:
                items.append(forget)
                continue
            if is_question_clause(clause, ends_sentence_with_question_mark=question_mark):
                has_question = True
                continue
            items.extend(_parse_facts(clause))
    return Statements(tuple(items), has_question)


def _parse_forget(clause: str) -> Forget | None:
    match = _FORGET.match(strip_filler(clause))
    if match is None:
        return None
    phrase = _clean_object(match["phrase"])
    everything = bool(
        re.fullmatch(
            r"(?:all|everything|all of it|all (?:my )?memories|all about me"
            r"|everything (?:about me|you know(?: about me)?))",
            phrase,
            re.IGNORECASE,
        )
    )
    return Forget(phrase, everything)


def _parse_facts(raw_clause: str) -> list[Fact]:
    facts = []
    name_match = _NAME.search(raw_clause)
    if name_match and (name := _take_name(name_match["rest"])):
        facts.append(Fact("name", f"Name is {name}", ("name",), name))
    clause = strip_filler(raw_clause)
    if fact := _parse_other_fact(clause):
        facts.append(fact)
    return facts


def _parse_other_fact(clause: str) -> Fact | None:
    if match := _AGE.match(clause):
        age = str(int(match["n"]))
        return Fact("age", f"Is {age} years old", ("age",), age)
    if match := _PLAN_BE.match(clause):
        verb = f"{_PLAN_BE_VERBS[match['verb'].lower()]} {match['prep'].lower()}"
        return _object_fact("plan", f"Is {verb}", match["obj"], ("plans",), verb)
    if match := _PLAN_DO.match(clause):
        verb = match["verb"].lower()
        return _object_fact("plan", f"{_PLAN_DO_VERBS[verb]} to", match["obj"], ("plans",), verb)
    if match := _LIVE.match(clause):
        return _object_fact("location", "Lives in", match["obj"], ("location",), "live in")
    if match := _FROM.match(clause):
        return _object_fact("origin", "Is from", match["obj"], ("location",), "from")
    if match := _WORK.match(clause):
        prep = match["prep"].lower()
        return _object_fact("work", f"Works {prep}", match["obj"], ("work",), prep)
    if match := _DISLIKE.match(clause):
        return _object_fact("dislike", "Dislikes", match["obj"], ("preferences",), "dislike")
    if match := _LIKE.match(clause):
        verb = match["verb"].lower()
        return _object_fact("like", _LIKE_VERBS[verb], match["obj"], ("interests",), verb)
    if match := _FAVORITE.search(clause):
        what = " ".join(match["what"].lower().split())
        return _object_fact("favorite", f"Favorite {what} is", match["obj"], ("preferences",), what)
    return None


def _object_fact(
    kind: FactKind, prefix: str, raw_object: str, topics: tuple[str, ...], verb: str
) -> Fact | None:
    obj = _clean_object(raw_object)
    if not obj or obj.casefold() in _MEANINGLESS_OBJECTS or not re.search(r"\w", obj):
        return None
    return Fact(kind, f"{prefix} {third_person(obj)}", topics, obj, verb)


def _clean_object(raw: str) -> str:
    obj = " ".join(raw.split()).strip(_TRAILING_PUNCTUATION)
    obj = _TRAILING_WORDS.sub("", obj).strip(_TRAILING_PUNCTUATION)
    return obj[:MAX_OBJECT_CHARS].rstrip()


def _take_name(rest: str) -> str | None:
    rest = _NAME_CUT.split(f"{rest} ", maxsplit=1)[0]
    words: list[str] = []
    for word in rest.split():
        lowered = word.casefold()
        if not _NAME_WORD.fullmatch(word) or lowered in _NOT_NAME_WORDS:
            break
        # "Mark Gonzales likes tea": once the name is capitalised, a lower-case
        # word (other than a particle like "van") is where it ends.
        if words and words[0][0].isupper() and word[0].islower() and lowered not in _NAME_PARTICLES:
            break
        words.append(word.rstrip("."))
        if len(words) == MAX_NAME_WORDS:
            break
    if not words:
        return None
    name = " ".join(words)
    return name.title() if name.islower() else name


def third_person(text: str) -> str:
    """ "my dog" -> "their dog": memories are written about the user."""
    return re.sub(
        r"\b(my|me|myself|mine)\b",
        lambda match: _match_case(_THIRD_PERSON[match[1].lower()], match[1]),
        text,
        flags=re.IGNORECASE,
    )


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[0].isupper() else word


# --- comparing memories ---------------------------------------------------------

_KIND_OF_MEMORY: tuple[tuple[FactKind, re.Pattern[str]], ...] = (
    ("name", re.compile(r"^name is\b", re.IGNORECASE)),
    ("age", re.compile(r"^is \d+ years old\b", re.IGNORECASE)),
    ("location", re.compile(r"^lives in\b", re.IGNORECASE)),
)
_STOPWORDS = frozenset(
    {"i", "i'm", "im", "i've", "me", "my", "mine", "myself", "that", "about", "the", "a", "an",
     "is", "am", "are", "was", "were", "be", "been", "to", "of", "in", "on", "at", "for", "with",
     "from", "by", "and", "or", "it", "its", "this", "these", "those", "what", "said", "you",
     "your", "please", "now", "anymore", "any", "more", "thing", "things", "fact", "everything",
     "all"}
)  # fmt: skip
_SYNONYMS = {
    "love": "like", "enjoy": "like", "adore": "like", "liking": "like", "loving": "like",
    "enjoying": "like", "planning": "plan", "going": "go", "living": "live", "working": "work",
}  # fmt: skip


def normalise_memory(text: str) -> str:
    """Casefolded, spaces collapsed, trailing punctuation removed: for duplicate checks."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCTUATION)


def memory_kind(text: str) -> FactKind | None:
    """The single-valued kind a memory text is about, if any."""
    for kind, pattern in _KIND_OF_MEMORY:
        if pattern.match(text.strip()):
            return kind
    return None


def content_words(text: str) -> frozenset[str]:
    words = (_stem(word) for word in re.findall(r"[\w'’]+", text.casefold()))
    return frozenset(word for word in words if word and word not in _STOPWORDS)


def _stem(word: str) -> str:
    word = word.replace("’", "'")
    word = word.removesuffix("'s")
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return _SYNONYMS.get(word, word)


def forget_matches(forget: Forget, memory_text: str) -> bool:
    if forget.everything:
        return True
    wanted = content_words(forget.phrase)
    return bool(wanted) and wanted <= content_words(memory_text)


# --- planning tool calls --------------------------------------------------------


def plan_memory_calls(
    user_message: str, memories: Sequence[AliasedMemory], offered_tools: Collection[str]
) -> list[PlannedCall]:
    """The tool calls that bring ``memories`` up to date with ``user_message``."""
    statements = parse_statements(user_message)
    current: dict[str, str] = {memory.alias: memory.text for memory in memories}
    added: set[str] = set()
    calls: list[PlannedCall] = []

    for item in _last_of_each_single_valued_kind(statements.items):
        if isinstance(item, Forget):
            for alias, text in list(current.items()):
                if forget_matches(item, text):
                    calls.append(PlannedCall(DELETE_MEMORY, {"id": alias}))
                    del current[alias]
            continue
        normalised = normalise_memory(item.memory)
        known = {normalise_memory(text) for text in current.values()} | added
        if normalised in known:
            continue
        target = _same_kind_alias(item.kind, current) if item.kind in SINGLE_VALUED else None
        topics = list(item.topics)
        if target is not None:
            calls.append(
                PlannedCall(UPDATE_MEMORY, {"id": target, "memory": item.memory, "topics": topics})
            )
            current[target] = item.memory
        else:
            calls.append(PlannedCall(ADD_MEMORY, {"memory": item.memory, "topics": topics}))
            added.add(normalised)
    return [call for call in calls if call.name in offered_tools]


def plan_turns_memory_calls(
    turns: Sequence[TurnText], memories: Sequence[AliasedMemory], offered_tools: Collection[str]
) -> list[PlannedCall]:
    """The calls for several turns at once, each naming its ``turn``: the same end
    state as planning the turns one by one, each on the memories the last one left.

    A change to something an earlier turn of the same request added cannot name
    an alias (the memory does not exist yet), so it rewrites that earlier add
    instead, which then names the later turn: the turn that said the final value.
    """
    if len(turns) == 1:
        return plan_memory_calls(turns[0].user_message, memories, offered_tools)
    current = list(memories)
    calls: list[PlannedCall] = []
    pending: dict[str, int] = {}  # a provisional alias -> index of its add in calls
    for turn in turns:
        for call in plan_memory_calls(turn.user_message, current, offered_tools):
            alias = call.arguments.get("id")
            arguments = {**call.arguments, "turn": turn.label}
            if call.name == ADD_MEMORY:
                provisional = f"new{len(calls) + 1}"
                pending[provisional] = len(calls)
                calls.append(PlannedCall(ADD_MEMORY, arguments))
                current.append(AliasedMemory(provisional, call.arguments["memory"]))
                continue
            if alias in pending:
                index = pending.pop(alias)
                if call.name == UPDATE_MEMORY:
                    added = {k: v for k, v in arguments.items() if k != "id"}
                    calls[index] = PlannedCall(ADD_MEMORY, added)
                    pending[alias] = index
                else:
                    calls[index] = PlannedCall("", {})  # added, then forgotten: nothing
            else:
                calls.append(PlannedCall(call.name, arguments))
            if call.name == UPDATE_MEMORY:
                current = [
                    AliasedMemory(m.alias, call.arguments["memory"]) if m.alias == alias else m
                    for m in current
                ]
            else:
                current = [m for m in current if m.alias != alias]
    return [call for call in calls if call.name]


def _same_kind_alias(kind: FactKind, current: dict[str, str]) -> str | None:
    return next((alias for alias, text in current.items() if memory_kind(text) == kind), None)


def _last_of_each_single_valued_kind(items: Sequence[Statement]) -> list[Statement]:
    # "My name is Mark. Actually, call me Marcus." means Marcus: keep the last
    # value said for a single-valued kind.
    last_index = {
        item.kind: index
        for index, item in enumerate(items)
        if isinstance(item, Fact) and item.kind in SINGLE_VALUED
    }
    return [
        item
        for index, item in enumerate(items)
        if not (isinstance(item, Fact) and item.kind in SINGLE_VALUED)
        or last_index[item.kind] == index
    ]
