"""A user's memories, newest first, live: new and changed ones are marked for a while."""

from __future__ import annotations

import uuid

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.widgets import ListItem, ListView, Static

from engine.records import Memory
from engine.terminal import terminal_safe

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class MemoryItem(ListItem):
    def __init__(self, memory: Memory, mark: str | None) -> None:
        self.memory = memory
        text = Text("• ")
        text.append(terminal_safe(memory.content))
        if mark:
            text.append(f"  {mark}", style="bold")
        super().__init__(Static(text), classes=f"memory -{mark}" if mark else "memory")


class MemorySidebar(Vertical):
    """Shows memories handed to it; the pane loads them and tells it about jobs."""

    # No letters: typing a word with the list focused ("today") pressed d
    # (forget) and then y (confirm). Printable keys go to the prompt (the
    # pane forwards them); only Enter and Delete act on the list.
    BINDINGS = [
        Binding("delete", "delete", "Forget memory"),
        # Shown only while a failed job is shown (check_action).
        Binding("f5", "retry_job", "Retry memory job"),
        Binding("shift+f5", "dismiss_job", "Dismiss failure"),
    ]

    job_state: reactive[str] = reactive("idle")
    """idle | running | failed"""
    job_error: reactive[str] = reactive("")

    class EditRequested(TextualMessage):
        def __init__(self, memory: Memory) -> None:
            super().__init__()
            self.memory = memory

    class RetryJobRequested(TextualMessage):
        """Queue the user's newest failed memory job again (the pane does it)."""

    class DeleteRequested(TextualMessage):
        def __init__(self, memory: Memory) -> None:
            super().__init__()
            self.memory = memory

    def __init__(self, *, highlight_seconds: float = 5.0, animate: bool = True) -> None:
        super().__init__(classes="sidebar")
        self.highlight_seconds = highlight_seconds
        # Not `animate`: that name is Widget.animate(), Textual's animator.
        self.spins = animate
        self._known: dict[uuid.UUID, str] = {}
        self._marks: dict[uuid.UUID, str] = {}
        self._memories: list[Memory] = []
        self._frame = 0
        self._loaded = False
        # The failure the user dismissed: hidden until a job runs again or
        # another failure (another error) is shown. For this app run only.
        self._dismissed: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("Memories", classes="sidebar-title")
        status = Static("", classes="job-status")
        status.display = False  # until there is a job to tell about
        yield status
        yield ListView(classes="memory-list")
        yield Static("No memories yet.", classes="no-memories")

    def on_mount(self) -> None:
        if self.spins:
            self.set_interval(0.1, self._spin)
        # Now that the status line exists: before, an idle job status left a
        # blank row under the title until the first job event.
        self._render_job_status()

    def show(self, memories: list[Memory]) -> None:
        """Replace the list; anything new or changed since last time gets a mark."""
        for memory in memories:
            before = self._known.get(memory.memory_id)
            if self._loaded and self.highlight_seconds > 0 and before != memory.content:
                mark = "new" if before is None else "changed"
                self._marks[memory.memory_id] = mark
                self.set_timer(
                    self.highlight_seconds, lambda mid=memory.memory_id: self._unmark(mid)
                )
        self._known = {m.memory_id: m.content for m in memories}
        self._memories = memories
        self._loaded = True
        self._rebuild()

    def _unmark(self, memory_id: uuid.UUID) -> None:
        if self._marks.pop(memory_id, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        view = self.query_one(ListView)
        index = view.index
        view.clear()
        view.extend(MemoryItem(m, self._marks.get(m.memory_id)) for m in self._memories)
        if self._memories:
            view.index = min(index or 0, len(self._memories) - 1)
        self.query_one(".sidebar-title", Static).update(f"Memories ({len(self._memories)})")
        self.query_one(".no-memories", Static).display = not self._memories

    @property
    def selected(self) -> Memory | None:
        view = self.query_one(ListView)
        item = view.highlighted_child
        return item.memory if isinstance(item, MemoryItem) else None

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        # Enter on a memory edits it (the list's own Enter binding selects).
        event.stop()
        self.action_edit()

    def action_edit(self) -> None:
        if (memory := self.selected) is not None:
            self.post_message(self.EditRequested(memory))

    def action_delete(self) -> None:
        if (memory := self.selected) is not None:
            self.post_message(self.DeleteRequested(memory))

    @property
    def shows_failure(self) -> bool:
        return self.job_state == "failed" and self._dismissed != self.job_error

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("retry_job", "dismiss_job"):
            return self.shows_failure
        return True

    def action_retry_job(self) -> None:
        self.post_message(self.RetryJobRequested())

    def action_dismiss_job(self) -> None:
        if self.job_state == "failed":
            self._dismissed = self.job_error
            self._render_job_status()

    def watch_job_state(self) -> None:
        if self.job_state != "failed":
            self._dismissed = None
        self._render_job_status()

    def watch_job_error(self) -> None:
        self._render_job_status()

    def _spin(self) -> None:
        if self.job_state == "running":
            self._frame = (self._frame + 1) % len(SPINNER)
            self._render_job_status()

    def _render_job_status(self) -> None:
        status = next(iter(self.query(".job-status").results(Static)), None)
        if status is None:
            return
        if self.job_state == "running":
            spinner = SPINNER[self._frame] if self.spins else "…"
            status.update(Text(f"{spinner} learning from the last turn", style="italic"))
        elif self.job_state == "failed":
            text = Text("⚠ memory job failed: ", style="bold")
            text.append(terminal_safe(self.job_error or "unknown error"))
            status.update(text)
        status.display = self.job_state == "running" or self.shows_failure
        status.set_class(self.job_state == "failed", "-failed")
        self.refresh_bindings()
