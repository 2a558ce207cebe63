"""The isolation inspector: every user's data side by side, and the audit's verdict.

Per user also what the model spent (tokens, where the endpoint reported them)
and what went wrong with memory jobs (failed jobs' errors, jobs' notes).

Read-only. Everything comes from ``engine.admin.AdminReader`` (the admin path);
this screen runs no SQL. Given the event hub it refreshes itself when anything
changes (any user's messages, memories, jobs), at most once per
``REFRESH_DELAY``; ``r`` still refreshes at once. It is shown in demos to
prove isolation by eye, so it shows no UUIDs or clock times (session titles
and counts instead), orders by stable keys, and renders all text from users
and models literally: escaped by ``terminal_safe`` and wrapped in
``rich.text.Text``, never parsed as markup.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from typing import cast

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.styles import RulesMap
from textual.geometry import Size
from textual.screen import Screen
from textual.timer import Timer
from textual.visual import visualize
from textual.widget import Widget
from textual.widgets import Footer, LoadingIndicator, Static

from engine.admin import (
    CHECK_NAMES,
    CHECK_SOURCES,
    AdminReader,
    AuditCheck,
    AuditResult,
    MemoryOverview,
    SessionOverview,
    TokenUsage,
    UserOverview,
)
from engine.events import EventHub
from engine.records import JobCounts, JobProblem
from engine.text import plural
from tui.widgets.messages import literal

log = logging.getLogger(__name__)

PAGE_SIZE = 25
"""Users mounted at a time: laying out a section costs milliseconds (wrapped tables),
so hundreds at once would freeze the screen; more are mounted as the reader scrolls."""

WIDE_SECTION = 130
"""Content width from which a user's sessions sit beside their memories."""

FINDINGS_SHOWN = 3
"""Per failed check; the panel must leave room for the users below it."""

USER_CHECKS = (CHECK_SOURCES, CHECK_NAMES)
"""Checks whose findings are about a user (the others are about tables and roles)."""

REFRESH_DELAY = 0.5
"""Seconds between an event and the refresh it causes: a burst of changes (a demo
turn writes messages, a job, memories) costs one read of the overview."""

OK_MARK = "✓"
FAIL_MARK = "✗"


def _jobs_text(jobs: JobCounts) -> Text:
    text = Text("jobs: ")
    parts = [
        (jobs.pending, "pending", "yellow"),
        (jobs.running, "running", "cyan"),
        (jobs.done, "done", ""),
        (jobs.failed, "failed", "bold red"),
        (jobs.noted, "with a note", "yellow"),
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
    """``2 sessions · 8 messages · 4 memories · jobs: 4 done`` (the user id is the title)."""
    dot = (" · ", "dim")
    text = Text()
    memories = plural(len(user.memories), "memory")
    if user.forgotten:
        memories += f" ({user.forgotten} forgotten)"
    for part in (
        plural(len(user.sessions), "session"),
        plural(user.messages, "message"),
        memories,
    ):
        text.append(part)
        text.append(*dot)
    text.append_text(_jobs_text(user.jobs))
    return text


def _tokens(usage: TokenUsage) -> str:
    return f"{usage.prompt:,} in / {usage.completion:,} out"


def tokens_text(user: UserOverview) -> Text | None:
    """``tokens: chat 1,204 in / 96 out · memory 2,410 in / 120 out``; None if none reported."""
    parts = [
        (label, usage)
        for label, usage in (("chat", user.chat_tokens), ("memory", user.memory_tokens))
        if usage is not None
    ]
    if not parts:
        return None  # unknown is not zero: say nothing
    text = Text()
    text.append("tokens: ", style="dim")
    for i, (label, usage) in enumerate(parts):
        if i:
            text.append(" · ", style="dim")
        text.append(f"{label} ", style="dim")
        text.append(_tokens(usage))
    return text


def _problem_text(problem: JobProblem) -> Text:
    text = Text()
    if problem.status == "failed":
        tries = plural(problem.attempts, "attempt")
        text.append(f"{FAIL_MARK} Failed job ({tries}): ", style="bold red")
        text.append_text(literal(problem.error or "(no error recorded)", "red"))
    if problem.note:
        if text:
            text.append("\n  ")
        text.append("Job note: ", style="bold yellow")
        text.append_text(literal(problem.note, "yellow"))
    return text


def jobs_renderable(user: UserOverview) -> RenderableType | None:
    """The newest failed jobs' errors and jobs' notes; None when there are none."""
    jobs = user.jobs
    if not jobs.problems:
        return None
    lines = [_problem_text(problem) for problem in jobs.problems]
    hidden = jobs.problem_total - len(jobs.problems)
    if hidden > 0:
        more = Text(f"… and {hidden} more; all of them: memchat jobs --user ", style="dim")
        more.append_text(literal(user.user_id, "dim"))
        lines.append(more)
    return Group(*lines)


def user_title(user: UserOverview) -> Text:
    title = literal(user.user_id, "bold")
    if user.display_name and user.display_name != user.user_id:
        title.append(" (")
        title.append_text(literal(user.display_name))
        title.append(")")
    if user.look_alikes:
        # Ids that read alike (aIice / alice) are told apart here, not by eye.
        title.append("  ⚠ looks like ", style="bold")
        title.append_text(literal(", ".join(user.look_alikes), "bold"))
    return title


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
    if memory.topics:
        text.append("  ")
        text.append_text(literal(" ".join(f"#{t}" for t in memory.topics), "dim"))
    updates = [c for c in memory.history if c.op == "update" and c.before]
    if updates:
        text.append("\n")
        text.append("was: ", style="dim italic")
        text.append_text(literal(updates[-1].before, "dim italic"))
    return text


def _table(title: str, *, expand: bool) -> Table:
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        border_style="dim",
        show_edge=False,
        pad_edge=False,
        header_style="dim",
        expand=expand,
        padding=(0, 1),
    )


def sessions_table(sessions: tuple[SessionOverview, ...]) -> Table:
    table = _table("Sessions", expand=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("Session", overflow="fold", min_width=18, max_width=48)
    table.add_column("Messages", justify="right", no_wrap=True)
    for session in sessions:
        table.add_row(
            Text(str(session.number), style="dim"),
            _session_label(session.title, session.number),
            Text(str(session.messages)),
        )
    return table


def memories_table(
    memories: tuple[MemoryOverview, ...], flagged: Collection[uuid.UUID] = ()
) -> Table:
    table = _table("Memories", expand=False)
    # Minimum widths keep the columns of consecutive users roughly aligned.
    table.add_column("Memory", overflow="fold", min_width=40)
    table.add_column("From session", overflow="fold", min_width=18, max_width=24)
    table.add_column("History", overflow="fold", min_width=10, max_width=32)
    for memory in memories:
        text = _memory_text(memory)
        if memory.memory_id in flagged:
            # The audit's finding, pointed at where it lives.
            text = Text.assemble((f"{FAIL_MARK} ", "bold red"), text)
            text.stylize("red")
        table.add_row(
            text,
            _session_label(memory.source_session_title, memory.source_session_number),
            _history_text(memory),
        )
    return table


def user_renderable(
    user: UserOverview, flagged: Collection[uuid.UUID] = (), *, wide: bool = False
) -> RenderableType:
    """The section body; ``wide`` puts sessions beside memories instead of above them."""
    sessions: RenderableType = (
        sessions_table(user.sessions) if user.sessions else Text("No sessions.", "dim italic")
    )
    memories: RenderableType = (
        memories_table(user.memories, flagged)
        if user.memories
        else Text("No memories.", "dim italic")
    )
    parts: list[RenderableType] = [user_summary(user)]
    tokens = tokens_text(user)
    if tokens is not None:
        parts.append(tokens)
    if wide:
        side_by_side = Table.grid(padding=(0, 4))
        # Wide enough for a sessions table, so memories line up across users.
        side_by_side.add_column(vertical="top", min_width=34)
        side_by_side.add_column(vertical="top")
        side_by_side.add_row(sessions, memories)
        parts.append(side_by_side)
    else:
        parts += [sessions, memories]
    jobs = jobs_renderable(user)
    if jobs is not None:
        parts.append(jobs)
    return Group(*parts)


def verdict_text(result: AuditResult) -> Text:
    total = len(result.checks)
    if result.ok:
        return Text(
            f"{OK_MARK} Isolation audit: all {plural(total, 'check')} passed",
            style="bold green",
        )
    failed = len(result.failed)
    return Text(
        f"{FAIL_MARK} Isolation audit: {failed} of {plural(total, 'check')} FAILED",
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


class UserSection(Widget):
    """One user's sessions, memories and jobs. Nothing of any other user is in here."""

    DEFAULT_CSS = """
    UserSection {
        height: auto;
    }
    """

    def __init__(self, user: UserOverview, *, flagged: Collection[uuid.UUID] = ()) -> None:
        super().__init__(classes="user-section")
        self.user = user
        self._flagged = flagged
        self.border_title = user_title(user)
        self.set_class(bool(user.jobs.failed), "-failed-jobs")
        self._bodies: dict[bool, RenderableType] = {}
        self._heights: dict[int, int] = {}

    def body(self, width: int) -> RenderableType:
        wide = width >= WIDE_SECTION
        if wide not in self._bodies:
            self._bodies[wide] = user_renderable(self.user, self._flagged, wide=wide)
        return self._bodies[wide]

    def render(self) -> RenderableType:
        return self.body(self.size.width)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        # The content never changes (a reload builds new sections), and measuring
        # means rendering the tables: remember it per width across layouts.
        height = self._heights.get(width)
        if height is None:
            visual = visualize(self, self.body(width), markup=False)
            # Textual's own widgets pass their RenderStyles here too: it reads
            # the rules a RulesMap has (textual 8.2.8 types it narrower).
            styles = cast(RulesMap, self.styles)
            height = self._heights[width] = visual.get_height(styles, width)
        return height


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
        width: 100%;
        height: 1fr;
        padding: 0 0 0 1;
        scrollbar-size-vertical: 1;
        scrollbar-gutter: stable;
    }
    InspectorScreen #users LoadingIndicator {
        height: 3;
    }
    InspectorScreen .user-section {
        height: auto;
        padding: 0 1;
        border: round $primary 60%;
        border-title-color: $foreground;
        border-title-style: bold;
    }
    InspectorScreen .user-section.-failed-jobs {
        border: round $warning 70%;
    }
    InspectorScreen .user-section.-flagged {
        border: heavy $error;
    }
    InspectorScreen #users .more-users {
        padding: 0 2;
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
        # The app opens the inspector with F3; the same key should close it, not stack another.
        Binding("f3", "close", "Close", show=False),
        Binding("up", "scroll('up')", "Scroll", show=False),
        Binding("down", "scroll('down')", "Scroll", show=False),
        Binding("pageup", "scroll('page_up')", "Page up", show=False),
        Binding("pagedown", "scroll('page_down')", "Page down", show=False),
        Binding("home", "scroll('home')", "Top", show=False),
        Binding("end", "scroll('end')", "Bottom", show=False),
    ]

    def __init__(
        self,
        reader: AdminReader,
        *,
        title: str = "Isolation inspector",
        events: EventHub | None = None,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.events = events
        self._refresh_timer: Timer | None = None
        self._loading = False
        self._stale = False
        self.inspector_title = title
        self.title = title
        self.overview: list[UserOverview] | None = None
        self.audit: AuditResult | None = None
        self._unmounted: list[UserOverview] = []
        self._flagged: set[uuid.UUID] = set()
        self._suspects: set[str] = set()
        self._mounting = False

    def compose(self) -> ComposeResult:
        yield Static(self._title_text("loading…"), id="inspector-title")
        with VerticalScroll(id="audit", can_focus=False):
            yield Static(Text("Running the isolation audit…", style="dim italic"), id="audit-body")
        with VerticalScroll(id="users", can_focus=False):
            yield LoadingIndicator()
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.query_one("#users"), "scroll_y", self._on_users_scrolled, init=False)
        self.load()
        if self.events is not None:
            self.follow_changes(self.events)

    @work(group="inspector-events", exit_on_error=False)
    async def follow_changes(self, events: EventHub) -> None:
        """Any user's change (events carry ids only) makes a refresh due."""
        async with events.subscribe(None) as subscription:
            async for _event in subscription:
                self.refresh_soon()

    def refresh_soon(self) -> None:
        """Refresh after REFRESH_DELAY, once for every change in between; a refresh
        under way is never cancelled by a new change (it runs again after it)."""
        if self._loading:
            self._stale = True
        elif self._refresh_timer is None:
            self._refresh_timer = self.set_timer(REFRESH_DELAY, self._refresh_due)

    def _refresh_due(self) -> None:
        self._refresh_timer = None
        self.load()

    def _title_text(self, status: str) -> Text:
        return Text.assemble((self.inspector_title, "bold"), ("  ·  ", "dim"), (status, "dim"))

    def _set_status(self, status: str) -> None:
        self.query_one("#inspector-title", Static).update(self._title_text(status))

    @work(exclusive=True, group="inspector-load")
    async def load(self) -> None:
        """Read the overview and the audit off the UI's critical path, then show them."""
        if self.overview is not None:
            self._set_status("refreshing…")
        self._loading = True
        self._stale = False
        try:
            # One after the other: the screen need not hold two pool connections.
            overview = await self.reader.overview()
            audit = await self.reader.audit()
        except Exception as exc:
            # The screen stays up to say so (and to retry with r) rather than
            # taking the whole app down over a read.
            log.exception("inspector: loading failed")
            self._show_error(exc)
            return
        finally:
            self._loading = False
        self.overview, self.audit = overview, audit
        await self._show(overview, audit)
        if self._stale:
            self.refresh_soon()

    def _show_error(self, exc: Exception) -> None:
        self._set_status("could not load")
        audit = self.query_one("#audit", VerticalScroll)
        audit.set_class(False, "-passed")
        audit.set_class(True, "-failed")
        message = Text.assemble(
            (f"{FAIL_MARK} Could not read the database: ", "bold red"),
            literal(str(exc) or type(exc).__name__, "red"),
            ("\nPress r to try again.", "dim"),
        )
        self.query_one("#audit-body", Static).update(message)
        self.query(LoadingIndicator).remove()

    async def _show(self, overview: list[UserOverview], audit: AuditResult) -> None:
        self._set_status(f"{plural(len(overview), 'user')} · read-only admin view")
        panel = self.query_one("#audit", VerticalScroll)
        panel.set_class(audit.ok, "-passed")
        panel.set_class(not audit.ok, "-failed")
        self.query_one("#audit-body", Static).update(audit_renderable(audit))

        self._flagged = {f.memory_id for f in audit.findings if f.memory_id is not None}
        self._suspects = {
            f.subject for check in audit.checks if check.name in USER_CHECKS for f in check.findings
        }
        # Users the audit points at come first, so a leak is on screen at once.
        self._unmounted = sorted(overview, key=lambda u: u.user_id not in self._suspects)
        users = self.query_one("#users", VerticalScroll)
        # A refresh should not throw the reader back to the top.
        keep_y = users.scroll_y
        keep_mounted = max(PAGE_SIZE, len(self.query(UserSection)))
        with self.app.batch_update():
            await users.remove_children()
            if overview:
                await self._mount_more(keep_mounted)
            else:
                await users.mount(Static(Text("No users yet."), classes="empty"))
        users.call_after_refresh(users.scroll_to, y=keep_y, animate=False)

    async def _mount_more(self, count: int = PAGE_SIZE) -> None:
        users = self.query_one("#users", VerticalScroll)
        batch, self._unmounted = self._unmounted[:count], self._unmounted[count:]
        sections = [UserSection(user, flagged=self._flagged) for user in batch]
        for section in sections:
            section.set_class(section.user.user_id in self._suspects, "-flagged")
        await self.query(".more-users").remove()
        await users.mount_all(sections)
        if self._unmounted:
            more = Text(f"{plural(len(self._unmounted), 'more user')} below…", style="dim italic")
            await users.mount(Static(more, classes="more-users"))

    async def _on_users_scrolled(self) -> None:
        users = self.query_one("#users", VerticalScroll)
        near_end = users.scroll_y >= users.max_scroll_y - users.size.height
        if self._unmounted and near_end and not self._mounting:
            # Until the new sections are laid out, max_scroll_y is stale and
            # every scroll step would look "near the end" again.
            self._mounting = True
            await self._mount_more()
            self.call_after_refresh(self._mounted)

    def _mounted(self) -> None:
        self._mounting = False

    def action_reload(self) -> None:
        self.load()

    def action_close(self) -> None:
        self.dismiss()

    def action_scroll(self, where: str) -> None:
        users = self.query_one("#users", VerticalScroll)
        # No animation: keys should move the view at once, also over a slow link.
        match where:
            case "up":
                users.scroll_up(animate=False)
            case "down":
                users.scroll_down(animate=False)
            case "page_up":
                users.scroll_page_up(animate=False)
            case "page_down":
                users.scroll_page_down(animate=False)
            case "home":
                users.scroll_home(animate=False)
            case "end":
                users.scroll_end(animate=False)
