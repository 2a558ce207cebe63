"""Every key, on one screen (F1 or ?)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# memchat keys

| key | what it does |
|---|---|
| **Enter** | send the message in the focused pane (queued while a reply streams) |
| **ctrl+j** | new line (also shift+enter / alt+enter where the terminal reports them) |
| **↑** | in an empty prompt: recall earlier messages of this user |
| **ctrl+w / ctrl+left / ctrl+right** | delete word / move by word |
| **Esc** | cancel the reply being streamed |
| **ctrl+r** | regenerate the last reply (replaces it) |
| **F8 / F9** | focus the previous / next user |
| **alt+1 … alt+9** | focus user 1 … 9 |
| **ctrl+n** | add a user (a new pane); close one from the palette |
| **ctrl+o** | pick a session of this user |
| **ctrl+t** | start a new session |
| **f6** | rename the session |
| **f7** | delete the session (asks first) |
| **shift+tab** | from the prompt: into the messages (the last one highlighted) |
| **↑ / ↓ / Home / End** | messages: highlight previous / next / first / last |
| **ctrl+c** | messages: copy the highlighted message |
| **Enter, then c / b / r / e** | messages: copy / copy code / raw Markdown / export session |
| **Esc or a letter** | messages: back to the prompt |
| **tab** | move between input and memory list |
| **Enter / Delete** | memory list: edit / forget (asks; only the button confirms) |
| **f5 / shift+f5** | memory list, while a memory job failed: retry it / dismiss the line |
| **f2** | switch layout: grid (all users) / focus (one user) |
| **f3** | isolation inspector (what the database holds per user) |
| **f4** | play the seed demo (once per run); again to pause / resume |
| **shift+f4** | stop the demo |
| **ctrl+p** | command palette: every action by name |
| **f1 / ?** | this help |
| **ctrl+q** | quit (running memory jobs get a moment to finish) |

Text from users and the model is shown literally: markup and terminal
escape sequences in it are displayed, never obeyed.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="help"):
            yield Markdown(HELP)
