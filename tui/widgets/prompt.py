"""The prompt: several lines, Enter sends, ctrl+j (or shift+enter) breaks a line.

A TextArea, not an Input: Input keeps only the first line of a paste. Enter
takes the text and empties the prompt in the same key handler, so keys that
arrive in one burst after it (tmux send-keys, a fast typist) start the next
message instead of joining the one being sent.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

# Keys that break a line. ctrl+j (byte 0x0a) reaches every terminal;
# shift+enter only where the terminal reports it (kitty protocol), alt+enter
# arrives as ESC CR almost everywhere.
NEWLINE_KEYS = frozenset({"ctrl+j", "shift+enter", "alt+enter"})

# TextArea binds F6/F7 to select line / all: in memchat they rename and
# delete the session, so the prompt leaves them to the pane.
_PROMPT_BINDINGS = [b for b in TextArea.BINDINGS if isinstance(b, Binding)]
_PROMPT_BINDINGS = [b for b in _PROMPT_BINDINGS if b.key not in {"f6", "f7"}]


class Prompt(TextArea, inherit_bindings=False):
    """Where a user types; the border names who is typing."""

    BINDINGS = _PROMPT_BINDINGS  # type: ignore[assignment]  # a list of Binding is one of its forms
    OWN_KEYS = frozenset({"enter", "up", "down", *NEWLINE_KEYS})
    """Handled in the prompt's key handler, before any binding."""

    class Submitted(Message):
        """Enter was pressed: ``text`` is what the prompt held (it is now empty)."""

        def __init__(self, prompt: Prompt, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

        @property
        def control(self) -> Prompt:
            return self.prompt

    def __init__(self, user_id: str, *, placeholder: str = "", max_chars: int = 0) -> None:
        super().__init__(
            placeholder=placeholder,
            classes="chat-input",
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
        )
        self.user_id = user_id
        self.max_chars = max_chars
        self.sent: list[str] = []
        self._recall: int | None = None

    @property
    def value(self) -> str:
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def take(self) -> str:
        """The text, and an empty prompt."""
        text = self.text
        self.load_text("")
        self._recall = None
        return text

    def restore(self, text: str) -> None:
        """Put back a message that could not be sent, unless something new was typed."""
        if not self.text:
            self.value = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.take()))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key in ("up", "down") and self._recalling(event.key == "up"):
            event.stop()
            event.prevent_default()
            return
        await super()._on_key(event)

    def _recalling(self, older: bool) -> bool:
        """↑ in an empty prompt (or one showing a recalled message) walks history."""
        if not self.sent:
            return False
        showing = self._recall is not None and self.text == self.sent[self._recall]
        if not showing and (self.text or not older):
            return False
        if self._recall is None or not showing:
            index = len(self.sent) - 1
        else:
            index = self._recall + (-1 if older else 1)
        if index >= len(self.sent):
            self.load_text("")
            self._recall = None
            return True
        index = max(index, 0)
        self._recall = index
        self.value = self.sent[index]
        return True

    def remember(self, text: str) -> None:
        if text.strip() and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
