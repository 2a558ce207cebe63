"""The conversation: user messages as literal text, replies as streamed Markdown.

Each message carries a dim label (who, and when) in its top edge. The list is
focusable (shift+tab from the prompt): ↑/↓/Home/End highlight a message,
Enter offers what can be done with it (copy it or a code block, view its raw
Markdown, export the session), ctrl+c copies it, Esc goes back to the prompt.
Printable keys never act here: the app hands them to the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from markdown_it import MarkdownIt
from rich.text import Text
from textual.await_remove import AwaitRemove
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import QueryType
from textual.message import Message as TextualMessage
from textual.widget import AwaitMount, Widget
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


def code_blocks(markdown: str) -> list[str]:
    """The fenced (and indented) code blocks of a message, in order, as written."""
    return [
        token.content
        for token in _PARSER.parse(markdown)
        if token.type in ("fence", "code_block") and token.content.strip()
    ]


class MessageClock:
    """Now, and when a message was written as its label shows it.

    Local time: HH:MM for today, the date too for an earlier day.
    """

    def __init__(self, now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now().astimezone())

    def now(self) -> datetime:
        return self._now()

    def label(self, moment: datetime | None) -> str:
        now = self.now().astimezone()
        moment = (moment or now).astimezone()
        if moment.date() == now.date():
            return f"{moment:%H:%M}"
        return f"{moment:%Y-%m-%d %H:%M}"


class FixedClock(MessageClock):
    """Every message written at one moment: pictures that do not depend on the day."""

    def __init__(self, moment: datetime) -> None:
        super().__init__(lambda: moment)
        self.moment = moment

    def label(self, moment: datetime | None) -> str:
        # Its own time zone, not the machine's: the same picture everywhere.
        return f"{self.moment:%H:%M}"


DEFAULT_CLOCK = MessageClock()


class _Labelled(Widget):
    """A message: its author and time in the dim label above it."""

    author = "assistant"
    created_at: datetime | None = None

    @property
    def raw_text(self) -> str:
        raise NotImplementedError

    def _label(self) -> None:
        clock = getattr(self.app, "message_clock", DEFAULT_CLOCK)
        if not isinstance(clock, MessageClock):
            clock = DEFAULT_CLOCK
        if self.created_at is None:
            # Written now (a live turn): the time it appeared.
            self.created_at = clock.now()
        self.border_title = f"{terminal_safe(self.author)} · {clock.label(self.created_at)}"

    @property
    def label(self) -> str:
        return str(self.border_title or "")


class UserMessage(Static, _Labelled):
    """What a user typed, verbatim."""

    def __init__(
        self,
        content: str,
        *,
        message_id: int | None = None,
        created_at: datetime | None = None,
        author: str | None = None,
    ) -> None:
        super().__init__(literal(content), classes="message user-message")
        self.message_id = message_id
        self.content_text = content
        self.created_at = created_at
        self._author = author

    @property
    def raw_text(self) -> str:
        return self.content_text

    def on_mount(self) -> None:
        # Who typed it: the pane's user (the pane has a user_id), else "you".
        owners = (getattr(a, "user_id", None) for a in self.ancestors)
        self.author = self._author or next((o for o in owners if isinstance(o, str)), "you")
        self._label()


class AssistantMessage(Markdown, _Labelled):
    """A reply: Markdown, streamed while it arrives, then rendered once in full.

    Control characters are made visible before Markdown sees them; Markdown
    itself never interprets Rich markup, so "[bold]" stays literal.
    """

    def __init__(
        self,
        content: str = "",
        *,
        message_id: int | None = None,
        created_at: datetime | None = None,
    ) -> None:
        super().__init__(
            terminal_safe(content),
            classes="message assistant-message",
            parser_factory=_reply_parser,
        )
        self.message_id = message_id
        self.created_at = created_at

    @property
    def raw_text(self) -> str:
        # What the widget shows (control characters made visible): a copy
        # never carries an escape sequence the reader did not see.
        return self.source

    def on_mount(self) -> None:
        self._label()

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


class EmptyHint(Static):
    """What a pane with no messages yet says: who you are typing as, and how to start."""

    def __init__(self, text: str) -> None:
        # markup=False: the text names a user id, which is the user's own text.
        super().__init__(text, classes="empty-hint", markup=False)


class MessageList(VerticalScroll):
    """A stream-layout scroll container that follows the bottom while you are there.

    Focused, it highlights one message at a time and acts on it.
    """

    BINDINGS = [
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("down", "move(1)", "Next", show=False),
        Binding("home", "move_to(0)", "First", show=False),
        Binding("end", "move_to(-1)", "Last", show=False),
        Binding("enter", "actions", "Actions"),
        Binding("ctrl+c", "copy", "Copy"),
        Binding("escape", "leave", "Prompt"),
    ]

    class ReachedTop(TextualMessage):
        """Scrolled to the top: time to load older messages, if any."""

    class ExportRequested(TextualMessage):
        """Export this session to a Markdown file (the pane knows user and session)."""

    highlighted: _Labelled | None = None

    def mount(
        self,
        *widgets: Widget,
        before: int | str | Widget | None = None,
        after: int | str | Widget | None = None,
    ) -> AwaitMount:
        # Every way a message arrives (a page, a turn, another process's
        # message) mounts it here: the hint goes with the first one.
        if any(isinstance(w, _Labelled | TurnError) for w in widgets):
            for hint in self.query(EmptyHint):
                hint.display = False
        return super().mount(*widgets, before=before, after=after)

    def remove_children(
        self, selector: str | type[QueryType] | Iterable[Widget] = "*"
    ) -> AwaitRemove:
        # Decided now, from what stays: a switch to an empty session shows the
        # hint, a switch to one with messages mounts them (which hides it).
        if isinstance(selector, str | type):
            doomed = set(self.query_children(selector))
        else:
            selector = list(selector)
            doomed = set(selector)
        if not any(isinstance(c, _Labelled | TurnError) and c not in doomed for c in self.children):
            for hint in self.query(EmptyHint):
                hint.display = True
        return super().remove_children(selector)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 < old_value and self.query(OlderMessages).first().count:
            self.post_message(self.ReachedTop())

    def message_widgets(self, messages: list[Message]) -> list[Static | Markdown]:
        widgets: list[Static | Markdown] = []
        for message in messages:
            if message.role == "user":
                widgets.append(
                    UserMessage(
                        message.content,
                        message_id=message.message_id,
                        created_at=message.created_at,
                    )
                )
                continue
            reply = AssistantMessage(
                message.content, message_id=message.message_id, created_at=message.created_at
            )
            reply.mark_outcome(message.status, message.error)
            widgets.append(reply)
            if message.status == "failed" and message.error:
                widgets.append(TurnError(message.error))
        return widgets

    # -- the highlighted message ------------------------------------------

    @property
    def shown_messages(self) -> list[_Labelled]:
        return [c for c in self.children if isinstance(c, _Labelled)]

    def on_focus(self) -> None:
        shown = self.shown_messages
        if self.highlighted not in shown:
            self.highlighted = None
        self._highlight(self.highlighted or (shown[-1] if shown else None))

    def on_blur(self) -> None:
        # Remembered for the next visit, shown only while the list has focus.
        if self.highlighted is not None:
            self.highlighted.remove_class("-highlight")

    def _highlight(self, widget: _Labelled | None) -> None:
        if self.highlighted is not None:
            self.highlighted.remove_class("-highlight")
        self.highlighted = widget
        if widget is not None:
            widget.add_class("-highlight")
            self.scroll_to_widget(widget, animate=False, immediate=True)

    def action_move(self, step: int) -> None:
        shown = self.shown_messages
        if not shown:
            return
        if self.highlighted not in shown:
            self._highlight(shown[-1])
            return
        assert self.highlighted is not None
        index = shown.index(self.highlighted) + step
        if index < 0:
            # At the first message shown: older ones load, as when scrolling up.
            self.scroll_home(animate=False)
            if self.query(OlderMessages).first().count:
                self.post_message(self.ReachedTop())
            return
        self._highlight(shown[min(index, len(shown) - 1)])

    def action_move_to(self, index: int) -> None:
        shown = self.shown_messages
        if shown:
            self._highlight(shown[index])

    def action_leave(self) -> None:
        from tui.widgets.prompt import Prompt

        # The prompt follows the list in its pane.
        self.screen.focus_next(Prompt)

    def _current(self) -> _Labelled | None:
        """The highlighted message, if it is still shown (a session switch removes it)."""
        shown = self.highlighted
        return shown if shown is not None and shown.parent is self else None

    def action_copy(self) -> None:
        if (message := self._current()) is not None:
            copy_text(self, message.raw_text, "")

    def action_actions(self) -> None:
        message = self._current()
        if message is None:
            return
        from tui.screens.message_actions import ActionMenu

        self.app.push_screen(
            ActionMenu(message.label, has_code=bool(code_blocks(message.raw_text))),
            lambda choice: self._act(message, choice),
        )

    def _act(self, message: _Labelled, choice: str | None) -> None:
        from tui.screens.message_actions import CodeBlockPicker, RawMarkdownScreen

        match choice:
            case "copy":
                copy_text(self, message.raw_text, "")
            case "code":
                blocks = code_blocks(message.raw_text)
                if len(blocks) == 1:
                    copy_text(self, blocks[0], " (code block)")
                elif blocks:
                    self.app.push_screen(
                        CodeBlockPicker(blocks),
                        lambda n: (
                            None if n is None else copy_text(self, blocks[n], " (code block)")
                        ),
                    )
                else:
                    self.app.notify("No code block in this message.")
            case "raw":
                self.app.push_screen(RawMarkdownScreen(message.raw_text, message.label))
            case "export":
                self.post_message(self.ExportRequested())


def copy_text(widget: Widget, text: str, what: str) -> None:
    """To the clipboard (OSC 52: works over ssh and in tmux with set-clipboard)."""
    widget.app.copy_to_clipboard(text)
    count = len(text)
    widget.app.notify(f"Copied {count:,} character{'' if count == 1 else 's'}{what}")
