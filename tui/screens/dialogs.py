"""Small modal dialogs: confirm, ask for one line, pick a session."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

from engine.records import Session
from engine.terminal import terminal_safe


class ConfirmDialog(ModalScreen[bool]):
    """Yes only by pressing the button: no letter confirms, so a word typed
    into the wrong place ("today": d, then y) can never delete anything."""

    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel")]

    def __init__(self, question: str, *, yes: str = "Yes", who: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes = yes
        self.who = who

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            if self.who:
                dialog.border_title = terminal_safe(self.who)
            yield Label(Text(terminal_safe(self.question)), classes="dialog-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel (Esc)", id="no")
            yield Label("Tab to the button, then Enter", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PromptDialog(ModalScreen[str | None]):
    """One line of text; Enter accepts, Esc cancels (None)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(
        self, question: str, *, value: str = "", placeholder: str = "", who: str = ""
    ) -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.value = value
        self.placeholder = placeholder
        self.who = who

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            if self.who:
                dialog.border_title = terminal_safe(self.who)
            yield Label(Text(self.question), classes="dialog-question")
            yield Input(self.value, placeholder=self.placeholder, classes="dialog-input")
            yield Label("Enter to accept · Esc to cancel", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)


class SessionPicker(ModalScreen[Session | None]):
    """A user's sessions, newest first; Enter switches."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, user_id: str, sessions: list[Session], current: Session | None) -> None:
        super().__init__(classes="dialog-screen")
        self.user_id = user_id
        self.sessions = sessions
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog session-picker"):
            yield Label(Text(f"Sessions of {self.user_id}"), classes="dialog-question")
            options = []
            for session in self.sessions:
                title = Text(terminal_safe(session.title or "New session"))
                if self.current and session.session_id == self.current.session_id:
                    title.append("  (current)", style="dim")
                options.append(Option(title, id=str(session.session_id)))
            yield OptionList(*options)
            yield Label("Enter to switch · Esc to cancel", classes="dialog-hint")

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        option_list.highlighted = 0 if self.sessions else None
        option_list.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        chosen = next(s for s in self.sessions if str(s.session_id) == event.option.id)
        self.dismiss(chosen)
