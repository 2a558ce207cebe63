"""The isolation inspector: every user's data side by side, and the audit's verdict.

Read-only. Everything comes from ``engine.admin.AdminReader`` (the admin path);
this screen runs no SQL. It is shown in demos to prove isolation by eye, so it
shows no ids or clock times (session titles and counts instead), orders by
stable keys, and renders all text from users and models literally: escaped by
``terminal_safe`` and wrapped in ``rich.text.Text``, never parsed as markup.
"""

from __future__ import annotations

import asyncio
import logging

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, LoadingIndicator, Static

from engine.admin import (
    AdminReader,
    AuditCheck,
    AuditResult,
    JobCounts,
    MemoryOverview,
    SessionOverview,
    UserOverview,
)
from engine.terminal import terminal_safe

log = logging.getLogger(__name__)

FINDINGS_SHOWN = 3
"""Per failed check; the panel must leave room for the users below it."""

OK_MARK = "✓"
FAIL_MARK = "✗"


def literal(text: str | None, style: str = "") -> Text:
    """User or model text as shown: control characters escaped, markup not parsed."""
    return Text(terminal_safe(text or ""), style=style)


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _jobs_text(jobs: JobCounts) -> Text:
    text = Text("jobs: ")
    parts = [
        (jobs.pending, "pending", "yellow"),
        (jobs.running, "running", "cyan"),
        (jobs.done, "done", ""),
        (jobs.failed, "failed", "bold red"),
    ]
    shown = [(n, label, style) for n, label, style in parts if n]
    if not shown:
        text.append("none", style="dim")
    for i, (count, label, style) in enumerate(shown):
        if i:
            text.append(", ")
        text.append(f"{count} {label}", style=style)
    return text


def user_summary(user: UserOverview) -> Text:
    """``user_1@example.com · 2 sessions · 8 messages · 4 memories · jobs: 4 done``."""
    dot = (" · ", "dim")
    text = Text()
    text.append_text(literal(user.user_id, "bold"))
    if user.display_name and user.display_name != user.user_id:
        text.append(" (")
        text.append_text(literal(user.display_name))
        text.append(")")
    memories = _plural(len(user.memories), "memory", "memories")
    if user.forgotten:
        memories += f" ({user.forgotten} forgotten)"
    for part in (
        _plural(len(user.sessions), "session"),
        _plural(user.messages, "message"),
        memories,
    ):
        text.append(*dot)
        text.append(part)
    text.append(*dot)
    text.append_text(_jobs_text(user.jobs))
    return text


def _session_label(title: str | None, number: int | None) -> Text:
    if number is None:
        return Text("—", style="dim")
    if title:
        return literal(title)
    return Text(f"session {number} (untitled)", style="italic")


def _history_text(memory: MemoryOverview) -> Text:
    text = Text()
    for i, change in enumerate(memory.history):
        if i:
            text.append(" → ", style="dim")
        text.append(change.op, style="red" if change.op == "delete" else "")
        # Model-made changes are the norm; people's edits are worth pointing out.
        if change.actor != "job":
            text.append(" (", style="dim")
            text.append_text(literal(change.actor, "dim"))
            text.append(")", style="dim")
    if not memory.history:
        text.append("—", style="dim")
    return text


def _memory_text(memory: MemoryOverview) -> Text:
    text = literal(memory.content)
    updates = [c for c in memory.history if c.op == "update" and c.before]
    if updates:
        text.append("\n")
        text.append("was: ", style="dim italic")
        text.append_text(literal(updates[-1].before, "dim italic"))
    return text


def _table(title: str) -> Table:
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="dim",
        expand=True,
        padding=(0, 1),
    )


def sessions_table(sessions: tuple[SessionOverview, ...]) -> Table:
    table = _table("Sessions")
    table.add_column("#", justify="right", width=3, no_wrap=True)
    table.add_column("Session", ratio=1, overflow="fold")
    table.add_column("Messages", justify="right", no_wrap=True)
    for session in sessions:
        table.add_row(
            Text(str(session.number), style="dim"),
            _session_label(session.title, session.number),
            Text(str(session.messages)),
        )
    return table


def memories_table(memories: tuple[MemoryOverview, ...]) -> Table:
    table = _table("Memories")
    table.add_column("Memory", ratio=5, overflow="fold")
    table.add_column("Topics", ratio=2, overflow="fold")
    table.add_column("From session", ratio=3, overflow="fold")
    table.add_column("History", ratio=2, overflow="fold")
    for memory in memories:
        table.add_row(
            _memory_text(memory),
            literal(", ".join(memory.topics), "dim"),
            _session_label(memory.source_session_title, memory.source_session_number),
            _history_text(memory),
        )
    return table


def user_renderable(user: UserOverview) -> RenderableType:
    parts: list[RenderableType] = [user_summary(user)]
    if user.sessions:
        parts.append(sessions_table(user.sessions))
    else:
        parts.append(Text("No sessions.", style="dim italic"))
    if user.memories:
        parts.append(memories_table(user.memories))
    else:
        parts.append(Text("No memories.", style="dim italic"))
    if user.jobs.last_error:
        error = Text("Last failed job: ", style="bold red")
        error.append_text(literal(user.jobs.last_error))
        parts.append(error)
    return Group(*parts)


def verdict_text(result: AuditResult) -> Text:
    total = len(result.checks)
    if result.ok:
        return Text(
            f"{OK_MARK} Isolation audit: all {_plural(total, 'check')} passed",
            style="bold green",
        )
    failed = len(result.failed)
    return Text(
        f"{FAIL_MARK} Isolation audit: {failed} of {_plural(total, 'check')} FAILED",
        style="bold red",
    )


def _check_rows(check: AuditCheck) -> list[tuple[Text, Text, Text]]:
    mark = Text(OK_MARK, style="bold green") if check.ok else Text(FAIL_MARK, style="bold red")
    name = Text(check.name[:1].upper() + check.name[1:], style="bold")
    rows = [(mark, name, literal(check.detail, "" if check.ok else "red"))]
    for finding in check.findings[:FINDINGS_SHOWN]:
        rows.append((Text(""), Text(""), literal(f"• {finding}", "red")))
    hidden = len(check.findings) - FINDINGS_SHOWN
    if hidden > 0:
        rows.append((Text(""), Text(""), Text(f"… and {hidden} more", style="dim red")))
    return rows


def audit_renderable(result: AuditResult) -> RenderableType:
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    for check in result.checks:
        for row in _check_rows(check):
            grid.add_row(*row)
    return Group(verdict_text(result), grid)


class UserSection(Static):
    """One user's sessions, memories and jobs. Nothing of any other user is in here."""

    def __init__(self, user: UserOverview) -> None:
        super().__init__(user_renderable(user), classes="user-section")
        self.user = user


class InspectorScreen(Screen[None]):
    """Per user: sessions, message counts, memories with source and history, jobs; the audit."""

    DEFAULT_CSS = """
    InspectorScreen {
        background: $background;
    }
    InspectorScreen #inspector-title {
        height: 1;
        padding: 0 1;
        background: $panel;
        color: $foreground;
    }
    InspectorScreen #audit {
        height: auto;
        max-height: 40%;
        margin: 0 1;
        padding: 0 1;
        border: round $foreground 30%;
        border-title-color: $foreground;
        scrollbar-size-vertical: 1;
    }
    InspectorScreen #audit.-passed {
        border: round $success;
    }
    InspectorScreen #audit.-failed {
        border: round $error;
    }
    InspectorScreen #audit-body {
        height: auto;
    }
    InspectorScreen #users {
        height: 1fr;
        padding: 0 1;
        scrollbar-size-vertical: 1;
    }
    InspectorScreen #users LoadingIndicator {
        height: 3;
    }
    InspectorScreen .user-section {
        height: auto;
        padding: 0 1;
        border: round $primary 60%;
    }
    InspectorScreen .user-section.-failed-jobs {
        border: round $warning 70%;
    }
    InspectorScreen #users .empty {
        padding: 1 2;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("r", "reload", "Refresh"),
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("up", "scroll('up')", "Scroll", show=False),
        Binding("down", "scroll('down')", "Scroll", show=False),
        Binding("pageup", "scroll('page_up')", "Page up", show=False),
        Binding("pagedown", "scroll('page_down')", "Page down", show=False),
        Binding("home", "scroll('home')", "Top", show=False),
        Binding("end", "scroll('end')", "Bottom", show=False),
    ]

    def __init__(self, reader: AdminReader, *, title: str = "Isolation inspector") -> None:
        super().__init__()
        self.reader = reader
        self.inspector_title = title
        self.title = title
        self.overview: list[UserOverview] | None = None
        self.audit: AuditResult | None = None

    def compose(self) -> ComposeResult:
        yield Static(self._title_text("loading…"), id="inspector-title")
        with VerticalScroll(id="audit", can_focus=False):
            yield Static(Text("Running the isolation audit…", style="dim italic"), id="audit-body")
        with VerticalScroll(id="users", can_focus=False):
            yield LoadingIndicator()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#audit", VerticalScroll).border_title = "Isolation audit"
        self.load()

    def _title_text(self, status: str) -> Text:
        text = Text(self.inspector_title, style="bold")
        text.append("  ·  ", style="dim")
        text.append(status, style="dim")
        return text

    def _set_status(self, status: str) -> None:
        self.query_one("#inspector-title", Static).update(self._title_text(status))

    @work(exclusive=True, group="inspector-load", exit_on_error=False)
    async def load(self) -> None:
        """Read the overview and the audit off the UI's critical path, then show them."""
        if self.overview is not None:
            self._set_status("refreshing…")
        try:
            overview, audit = await asyncio.gather(self.reader.overview(), self.reader.audit())
        except Exception as exc:
            # The screen stays up to say so (and to retry with r) rather than
            # taking the whole app down over a read.
            log.exception("inspector: loading failed")
            self._show_error(exc)
            return
        self.overview, self.audit = overview, audit
        await self._show(overview, audit)

    def _show_error(self, exc: Exception) -> None:
        self._set_status("could not load")
        audit = self.query_one("#audit", VerticalScroll)
        audit.set_class(False, "-passed")
        audit.set_class(True, "-failed")
        message = Text(f"{FAIL_MARK} Could not read the database: ", style="bold red")
        message.append_text(literal(str(exc) or type(exc).__name__, "red"))
        message.append("\nPress r to try again.", style="dim")
        self.query_one("#audit-body", Static).update(message)
        self.query(LoadingIndicator).remove()

    async def _show(self, overview: list[UserOverview], audit: AuditResult) -> None:
        self._set_status(f"{_plural(len(overview), 'user')} · read-only admin view")
        panel = self.query_one("#audit", VerticalScroll)
        panel.set_class(audit.ok, "-passed")
        panel.set_class(not audit.ok, "-failed")
        self.query_one("#audit-body", Static).update(audit_renderable(audit))

        users = self.query_one("#users", VerticalScroll)
        # A refresh should not throw the reader back to the top.
        keep_y = users.scroll_y
        with self.app.batch_update():
            await users.remove_children()
            if overview:
                sections = [UserSection(user) for user in overview]
                for section, user in zip(sections, overview, strict=True):
                    section.set_class(bool(user.jobs.failed), "-failed-jobs")
                await users.mount_all(sections)
            else:
                await users.mount(Static(Text("No users yet."), classes="empty"))
        users.call_after_refresh(users.scroll_to, y=keep_y, animate=False)

    def action_reload(self) -> None:
        self.load()

    def action_close(self) -> None:
        self.dismiss()

    def action_scroll(self, where: str) -> None:
        users = self.query_one("#users", VerticalScroll)
        match where:
            case "up":
                users.scroll_up()
            case "down":
                users.scroll_down()
            case "page_up":
                users.scroll_page_up()
            case "page_down":
                users.scroll_page_down()
            case "home":
                users.scroll_home()
            case "end":
                users.scroll_end()
