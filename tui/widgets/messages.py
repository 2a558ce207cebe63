"""The conversation: user messages as literal text, replies as streamed Markdown."""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.text import Text
from textual.containers import VerticalScroll
from textual.message import Message as TextualMessage
from textual.widgets import Markdown, Static

from engine.records import Message
from engine.terminal import terminal_safe

# One parser for every reply: Textual builds a new one per update otherwise,
# and linkify (bare URLs as links) made parsing a streamed reply 18 times
# slower.
#
# A reply's [text](target) would be a clickable word whose target nobody sees,
# so a model (or text it quotes) could dress any URL as anything. Links,
# images and reference definitions are not parsed: they show as written,
# target included. <https://...> autolinks stay: their text is their target.
_PARSER = MarkdownIt("gfm-like").disable(["linkify", "link", "image", "reference"])


def _reply_parser() -> MarkdownIt:
    return _PARSER


def literal(text: str | None, style: str = "") -> Text:
    """User or model text, shown exactly: no Rich markup, no control sequences."""
    return Text(terminal_safe(text or ""), style=style)


class UserMessage(Static):
    """What a user typed, verbatim."""

    def __init__(self, content: str, *, message_id: int | None = None) -> None:
        super().__init__(literal(content), classes="message user-message")
        self.message_id = message_id


class AssistantMessage(Markdown):
    """A reply: Markdown, streamed while it arrives, then rendered once in full.

    Control characters are made visible before Markdown sees them; Markdown
    itself never interprets Rich markup, so "[bold]" stays literal.
    """

    def __init__(self, content: str = "", *, message_id: int | None = None) -> None:
        super().__init__(
            terminal_safe(content),
            classes="message assistant-message",
            parser_factory=_reply_parser,
        )
        self.message_id = message_id

    def mark_outcome(self, status: str, error: str | None = None) -> None:
        self.set_class(status == "cancelled", "-cancelled")
        self.set_class(status == "failed", "-failed")
        self.border_subtitle = {"cancelled": "cancelled", "failed": "failed"}.get(status, "")
        if error:
            self.tooltip = error


class TurnError(Static):
    """Why a reply failed, and how to try again."""

    def __init__(self, error: str) -> None:
        text = Text("⚠ ", style="bold")
        text.append(terminal_safe(error))
        text.append("   ctrl+r retries", style="dim")
        super().__init__(text, classes="turn-error")


class OlderMessages(Static):
    """The marker at the top of a long session: older messages load on scrolling up."""

    def __init__(self, count: int) -> None:
        super().__init__(classes="older-messages")
        self.set_count(count)

    def set_count(self, count: int) -> None:
        self.count = count
        self.update(f"↑ {count:,} earlier messages (scroll up to load)")
        self.display = count > 0


class MessageList(VerticalScroll):
    """A stream-layout scroll container that follows the bottom while you are there."""

    class ReachedTop(TextualMessage):
        """Scrolled to the top: time to load older messages, if any."""

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 < old_value and self.query(OlderMessages).first().count:
            self.post_message(self.ReachedTop())

    def message_widgets(self, messages: list[Message]) -> list[Static | Markdown]:
        widgets: list[Static | Markdown] = []
        for message in messages:
            if message.role == "user":
                widgets.append(UserMessage(message.content, message_id=message.message_id))
                continue
            reply = AssistantMessage(message.content, message_id=message.message_id)
            reply.mark_outcome(message.status, message.error)
            widgets.append(reply)
            if message.status == "failed" and message.error:
                widgets.append(TurnError(message.error))
        return widgets
