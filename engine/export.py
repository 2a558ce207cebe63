"""A session as a Markdown document: the app's export and `memchat export`.

Read through the user's scope (row-level security decides what exists), in
one transaction, so the document is one consistent moment of the session.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.errors import NotFound
from engine.records import Message, Session
from engine.store import Store
from engine.text import plural

PAGE = 500
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._@]+")


@dataclass(frozen=True, slots=True)
class Export:
    session: Session
    messages: list[Message]
    markdown: str

    @property
    def summary(self) -> str:
        return plural(len(self.messages), "message")


async def export_session(store: Store, user_id: str, session_id: str | uuid.UUID) -> Export:
    """The session and all its messages, oldest first, as Markdown."""
    async with store.scope(user_id) as s:
        if await s.get_user() is None:
            raise NotFound(f"no user {user_id}")
        session = await s.get_session(session_id)
        messages: list[Message] = []
        after = 0
        while page := await s.messages_after(session.session_id, after, PAGE):
            messages += page
            after = page[-1].message_id
    return Export(session, messages, render_markdown(session, messages))


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def render_markdown(session: Session, messages: list[Message]) -> str:
    """A heading per message (who, when, and an outcome other than complete)."""
    lines = [
        f"# {session.title or 'Untitled session'}",
        "",
        f"- user: {session.user_id}",
        f"- session: {session.session_id}",
        f"- started: {_when(session.created_at)}",
        f"- messages: {len(messages)}",
    ]
    for message in messages:
        who = session.user_id if message.role == "user" else "assistant"
        mark = "" if message.status == "complete" else f" ({message.status})"
        lines += ["", f"## {who} · {_when(message.created_at)}{mark}", "", message.content]
        if message.error:
            lines += ["", f"> error: {message.error}"]
    return "\n".join(lines) + "\n"


def file_name(session: Session) -> str:
    """``memchat-alice@example.com-trip-to-paris-3f2b1a9c.md``: who, what, which."""
    title = _UNSAFE_NAME.sub("-", (session.title or "session").lower()).strip("-.")[:40]
    user = _UNSAFE_NAME.sub("-", session.user_id).strip("-.")
    return f"memchat-{user}-{title or 'session'}-{str(session.session_id)[:8]}.md"


def write_new_file(directory: Path, name: str, text: str) -> Path:
    """Write into a file that did not exist (name-2.md, name-3.md, ... when taken).

    Never replaces an earlier export, and never follows a planted symlink.
    The file is 0600 whatever the umask: a chat is as private as the data dir
    it came from (red team, finding E1).
    """
    stem, suffix = os.path.splitext(name)
    for attempt in range(1, 1000):
        path = directory / (name if attempt == 1 else f"{stem}-{attempt}{suffix}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        return path
    raise FileExistsError(f"{directory / name} and 998 numbered copies exist")
