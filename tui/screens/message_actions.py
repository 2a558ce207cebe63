"""What can be done with one message: the action menu, a code-block chooser, the raw view.

The message list opens these (Enter on a highlighted message). They are
modal, so their letter keys (c, b, r, e) act here and never reach a prompt.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from engine.terminal import terminal_safe
from tui.widgets.messages import copy_text, literal

ACTIONS = (
    ("c", "copy", "Copy the message"),
    ("b", "code", "Copy a code block"),
    ("r", "raw", "View the raw Markdown"),
    ("e", "export", "Export the session to Markdown"),
)


class ActionMenu(ModalScreen[str | None]):
    """Copy, copy code, raw view, export: by letter, or ↑/↓ and Enter."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        *(Binding(key, f"choose('{action}')", label, show=False) for key, action, label in ACTIONS),
    ]

    def __init__(self, label: str, *, has_code: bool) -> None:
        super().__init__(classes="dialog-screen")
        self.label = label
        self.actions = [a for a in ACTIONS if has_code or a[1] != "code"]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog message-actions") as dialog:
            dialog.border_title = terminal_safe(self.label)
            yield OptionList(
                *(
                    Option(Text.assemble((key, "bold"), "  ", label), id=action)
                    for key, action, label in self.actions
                )
            )
            yield Label("Enter or the letter · Esc closes", classes="dialog-hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)

    def action_choose(self, action: str) -> None:
        if any(a[1] == action for a in self.actions):
            self.dismiss(action)


class CodeBlockPicker(ModalScreen[int | None]):
    """Which code block to copy, when a message has several (first line of each)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, blocks: list[str]) -> None:
        super().__init__(classes="dialog-screen")
        self.blocks = blocks

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog message-actions") as dialog:
            dialog.border_title = "Copy which code block?"
            options = []
            for number, block in enumerate(self.blocks, start=1):
                first = block.strip().splitlines()[0] if block.strip() else ""
                lines = block.count("\n") or 1
                text = Text(f"{number}. ", style="bold")
                text.append(terminal_safe(first[:60]))
                text.append(f"  ({lines} line{'' if lines == 1 else 's'})", style="dim")
                options.append(Option(text, id=str(number - 1)))
            yield OptionList(*options)
            yield Label("Enter copies · Esc closes", classes="dialog-hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(int(event.option.id or 0))


class RawMarkdownScreen(ModalScreen[None]):
    """The message exactly as written: no Markdown rendering, no markup, no escapes obeyed."""

    BINDINGS = [
        Binding("escape,q", "dismiss", "Close"),
        Binding("ctrl+c", "copy", "Copy"),
    ]

    def __init__(self, text: str, label: str) -> None:
        super().__init__(classes="dialog-screen")
        self.text = text
        self.label = label

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="raw-view") as view:
            view.border_title = f"Raw Markdown · {terminal_safe(self.label)}"
            view.border_subtitle = "Esc closes · ctrl+c copies"
            yield Static(literal(self.text), classes="raw-text")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()

    def action_copy(self) -> None:
        copy_text(self, self.text, "")
