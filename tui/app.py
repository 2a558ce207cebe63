"""The memchat Textual app: one pane per user, side by side, on one engine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult, RenderResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from engine.admin import AdminReader
from engine.config import Settings, save_theme, theme_file
from engine.errors import MemchatError
from engine.events import JobChanged, Resync
from engine.jobs import job_counts
from engine.runtime import Runtime, open_runtime
from engine.terminal import terminal_safe
from engine.validation import look_alikes, validate_user_id
from tui.demo import SCRIPTS, DemoPlayer
from tui.keys import install_terminal_keys
from tui.screens.dialogs import PromptDialog
from tui.screens.help import HelpScreen
from tui.widgets.messages import DEFAULT_CLOCK, MessageClock, MessageList
from tui.widgets.pane import PaneOptions, UserPane
from tui.widgets.prompt import Prompt

MAX_PANES = 9


def tune_garbage_collection() -> None:
    """Fewer, cheaper collections once everything is loaded.

    While panes stream, full collections of the app's many long-lived
    objects took 100-200 ms each and stalled typing; freezing what exists at
    start (Textual, the engine, the first screens) and raising the
    thresholds keeps them rare and short. Off in the test suite, where many
    apps share one process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


class StatusBar(Static):
    """Model, database and memory jobs, in one line at the top.

    The job count is the tail: a narrow terminal cuts the model and database
    names (with …), never the count.
    """

    def __init__(self, content: Text, *, classes: str = "") -> None:
        super().__init__(content, classes=classes)
        self._main = Text()
        self._tail: Text | None = None

    def show(self, main: Text, tail: Text) -> None:
        self._main, self._tail = main, tail
        self.refresh()

    def update(self, content: object = "", *, layout: bool = True) -> None:
        self._tail = None  # a whole-line message (starting, cannot start, quitting)
        super().update(content, layout=layout)  # type: ignore[arg-type]

    def render(self) -> RenderResult:
        if self._tail is None:
            return super().render()
        room = max(self.size.width - self._tail.cell_len, 0)
        main = self._main.copy()
        main.truncate(room, overflow="ellipsis", pad=True)
        return Text.assemble(main, self._tail, no_wrap=True)


class UserTabs(Static):
    """Below the minimum width one pane shows: this line lists every user."""


# Actions on the panes behind: off while a dialog or the inspector is on top,
# so they neither act invisibly nor show in that screen's footer.
PANE_ACTIONS = frozenset(
    {"toggle_layout", "demo", "stop_demo", "add_user", "focus_user", "focus_user_number"}
)


# What a single-user app (a `memchat serve` user tab) does not offer.
MULTI_USER_ACTIONS = frozenset(
    {
        "inspector",
        "add_user",
        "close_pane",
        "focus_user",
        "focus_user_number",
        "demo",
        "toggle_layout",
    }
)


class MemchatApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "memchat"
    # Screen classes for app.tcss: below 100 columns one pane at a time;
    # the memory panel shrinks below 30 rows and goes below 18.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-tiny"), (18, "-short"), (30, "-tall")]
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        # The footer lists keys in this order and a narrow one cuts the end:
        # quit, help and the next user come first.
        # Switching users: F8/F9 arrive as themselves in every common
        # terminal (ESC[19~ / ESC[20~), alt+1…9 as ESC digit (tui/keys.py
        # keeps those out of the text). ctrl+left/right and ctrl+w stay
        # the prompt's: word left/right and delete word, as in readline.
        Binding("f9", "focus_user(1)", "Next user", priority=True),
        Binding("f8", "focus_user(-1)", "Prev user", priority=True, show=False),
        *(
            Binding(f"alt+{n}", f"focus_user_number({n})", f"User {n}", show=False, priority=True)
            for n in range(1, 10)
        ),
        Binding("f2", "toggle_layout", "Layout"),
        Binding("f3", "inspector", "Inspector"),
        Binding("f4", "demo", "Demo"),
        Binding("shift+f4", "stop_demo", "Stop demo", show=False),
        Binding("ctrl+n", "add_user", "Add user"),
    ]

    layout_mode: reactive[str] = reactive("grid")
    running_jobs: reactive[int] = reactive(0)
    database_ok: reactive[bool] = reactive(True)

    def __init__(
        self,
        settings: Settings,
        users: Iterable[str] | None = None,
        *,
        play: str | None = None,
        animate: bool = True,
        highlight_seconds: float = 5.0,
        demo_char_delay: float = 0.04,
        tune_gc: bool = True,
        single_user: str | None = None,
        run_workers: bool = True,
        clock: MessageClock = DEFAULT_CLOCK,
    ) -> None:
        install_terminal_keys()
        super().__init__()
        self.tune_gc = tune_gc
        # The time on each message (a fixed one makes pictures repeatable).
        self.message_clock = clock
        # Where the session export writes (None: Downloads, else the current directory).
        self.export_directory: Path | None = None
        self.settings = settings
        # Playing a demo without --users opens the demo's own users only.
        script = SCRIPTS.get(play) if play is not None else None
        default_users = list(script) if script is not None else settings.ui.users
        self.initial_users = [validate_user_id(u) for u in (users or default_users)]
        # `memchat serve`'s user tabs: one pane, that user's data only (the
        # engine enforces it: open_runtime(only_user=...)); no workers here.
        self.single_user = validate_user_id(single_user) if single_user else None
        if self.single_user is not None:
            self.initial_users = [self.single_user]
        self.run_workers = run_workers and self.single_user is None
        self.play = play if self.single_user is None else None
        self.pane_options = PaneOptions(highlight_seconds=highlight_seconds, animate=animate)
        self.demo = DemoPlayer(self, char_delay=demo_char_delay)
        self.runtime: Runtime | None = None
        self._stack = AsyncExitStack()
        self.ready = asyncio.Event()
        self._quitting = False

    # -- keys --------------------------------------------------------------

    async def on_event(self, event: events.Event) -> None:
        # Textual runs non-priority bindings only once the key has bubbled
        # back up from the focused widget, by which time the keys after it in
        # a burst (tmux send-keys, a paste of keystrokes, a fast typist) were
        # already handled: ctrl+left then "X" inserted X before moving, Tab
        # then "today" typed into the prompt. Keys that are bindings (never
        # text) run their binding here, in arrival order.
        if (
            isinstance(event, events.Key)
            and not event.is_forwarded
            and event.is_printable
            and (pane := self._focused_pane()) is not None
            and self.focused is not pane.input
        ):
            # Typing with the memory list (or a message) focused: the text
            # belongs in the prompt, and the keys after it too. Letters
            # never act on a list ("today" was forget-and-confirm).
            self.screen.set_focus(pane.input)
            pane.input._forward_event(event)
            return
        if (
            isinstance(event, events.Key)
            and not event.is_forwarded
            and self._binding_first(event)
            and (
                await self._check_bindings(event.key, priority=True)
                or await self._check_bindings(event.key)
            )
        ):
            return
        await super().on_event(event)

    def _binding_first(self, event: events.Key) -> bool:
        if event.is_printable or self.focused is None:
            return False
        # The prompt's own keys: Enter sends, ctrl+j breaks, ↑/↓ recall.
        return not (isinstance(self.focused, Prompt) and event.key in Prompt.OWN_KEYS)

    # -- building ----------------------------------------------------------

    def compose(self) -> ComposeResult:
        # The start line names the settings file in use (docs/security.md).
        yield StatusBar(
            Text(
                f"Starting: opening the database…  ({terminal_safe(self.settings.source_line())})"
            ),
            classes="status",
        )
        if self.single_user is None:
            yield UserTabs(classes="user-tabs")
        yield Horizontal(classes="panes -grid")
        yield Footer()

    def on_mount(self) -> None:
        self._apply_saved_theme()
        self.open_engine()

    def on_resize(self, event: events.Resize) -> None:
        # Narrow: keys closer together, so the important ones (listed first)
        # still fit in 80 columns.
        for footer in self.query(Footer).results(Footer):
            footer.compact = event.size.width < 100

    # -- theme -------------------------------------------------------------

    def _apply_saved_theme(self) -> None:
        theme = self.settings.ui.theme
        if theme is not None:
            if theme in self.available_themes:
                self.theme = theme
            else:
                self.notify(
                    f"No theme called {theme!r} (ui.theme); using {self.theme}.",
                    severity="warning",
                    markup=False,
                )
        self._saved_theme = self.theme
        if self.single_user is not None:
            return  # a web visitor's theme is theirs, not the server's settings file
        # From here on a change is the user's (ctrl+p: Change theme).
        self.theme_changed_signal.subscribe(self, self._theme_picked)

    def _theme_picked(self, _theme: object) -> None:
        theme = self.theme
        if theme == self._saved_theme:
            return
        self._saved_theme = theme
        path = theme_file(self.settings)
        if path is None:
            self.notify(
                f"Theme “{theme}” is for this run only: it is saved only in your user "
                f"settings file, and this run's {self.settings.source_line()}. To keep it, "
                f'add theme = "{theme}" under [ui] there.',
                markup=False,
            )
            return
        try:
            save_theme(path, theme)
        except (OSError, ValueError) as exc:
            self.notify(
                f"Theme “{theme}” not saved: {terminal_safe(str(exc))}",
                severity="warning",
                markup=False,
            )
            return
        self.settings.ui.theme = theme
        self.notify(f"Theme “{theme}” saved in {path}.", markup=False)

    @work(group="engine", exclusive=True)
    async def open_engine(self) -> None:
        try:
            self.runtime = await self._stack.enter_async_context(
                open_runtime(
                    self.settings, run_workers=self.run_workers, only_user=self.single_user
                )
            )
        except MemchatError as exc:
            self.query_one(StatusBar).update(
                Text(
                    f"Cannot start: {terminal_safe(exc.message)}  "
                    f"({terminal_safe(self.settings.source_line())}; ctrl+q quits)",
                    style="bold",
                )
            )
            return
        for user_id in self.initial_users:
            await self.add_pane(user_id)
        panes = self.panes
        if panes:
            panes[0].focus_input()
        await asyncio.gather(*(pane.ready.wait() for pane in panes))
        self._render_status()
        if self.single_user is None:
            self.watch_jobs()
        self.watch_database()
        if self.tune_gc:
            tune_garbage_collection()
        self.ready.set()
        if self.play:
            self.demo.start(self.play)

    @property
    def panes(self) -> list[UserPane]:
        return list(self.query(UserPane))

    def pane_of(self, user_id: str) -> UserPane | None:
        return next((p for p in self.panes if p.user_id == user_id), None)

    async def add_pane(self, user_id: str) -> UserPane | None:
        assert self.runtime is not None
        user_id = validate_user_id(user_id)  # the canonical (lower-cased) id
        if (existing := self.pane_of(user_id)) is not None:
            return existing
        if len(self.panes) >= MAX_PANES:
            self.notify(f"At most {MAX_PANES} panes; close one first (ctrl+p: Close pane).")
            return None
        pane = UserPane(self.runtime, user_id, self.pane_options)
        await self.query_one(".panes").mount(pane)
        self._apply_layout()
        self.flag_look_alikes(user_id)
        return pane

    @work(group="look-alikes")
    async def flag_look_alikes(self, user_id: str) -> None:
        """Warn when this id reads like another (aIice / alice): likely the wrong person."""
        assert self.runtime is not None
        if self.single_user is not None:
            return  # other users' ids are not this process's to read
        try:
            others = await AdminReader(self.runtime.db).look_alikes(user_id)
        except MemchatError:
            return  # the database status line reports an unreachable database
        others += [p.user_id for p in self.panes if p.user_id not in others]
        similar = look_alikes(user_id, others)
        if similar:
            self.notify(
                f"{terminal_safe(user_id)} looks like {terminal_safe(', '.join(similar))}: "
                "a different user. Check it is the one you mean.",
                title="Look-alike user id",
                severity="warning",
                markup=False,
                timeout=10,
            )

    # -- status ------------------------------------------------------------

    def _render_status(self) -> None:
        if self.runtime is None:
            return
        model = self.runtime.model
        text = Text()
        text.append(" memchat ", style="bold reverse")
        text.append("  model: ")
        text.append(
            "offline model (deterministic, no network)" if model.is_offline else model.label,
            style="bold",
        )
        if not model.is_offline:
            text.append("  ·  memory: ")
            text.append(self.runtime.dispatcher.manager.mode_label(), style="bold")
        text.append("  ·  database: ")
        db_label = self.runtime.db.info.label
        text.append(db_label if self.database_ok else f"{db_label} UNREACHABLE, retrying…")
        tail = Text()
        if self.single_user is None:  # the count is across users
            tail.append("  ·  memory jobs running: ")
            tail.append(str(self.running_jobs), style="bold")
            tail.append(" ")
        # query, not query_one: during shutdown the bar may already be gone.
        for bar in self.query(StatusBar).results(StatusBar):
            bar.show(text, tail)
            bar.set_class(not self.database_ok, "-error")

    def watch_running_jobs(self) -> None:
        self._render_status()

    def watch_database_ok(self) -> None:
        self._render_status()

    @work(group="jobs")
    async def watch_jobs(self) -> None:
        assert self.runtime is not None
        runtime = self.runtime
        async with runtime.events.subscribe(None) as subscription:
            await self._count_jobs(runtime)
            async for event in subscription:
                if isinstance(event, JobChanged | Resync):
                    await self._count_jobs(runtime)

    async def _count_jobs(self, runtime: Runtime) -> None:
        with contextlib.suppress(MemchatError):
            self.running_jobs = (await job_counts(runtime.db)).running

    @work(group="health")
    async def watch_database(self) -> None:
        assert self.runtime is not None
        while True:
            await asyncio.sleep(2.0)
            self.database_ok = self.runtime.events.connected

    # -- layout and focus --------------------------------------------------

    def action_toggle_layout(self) -> None:
        self.layout_mode = "focus" if self.layout_mode == "grid" else "grid"

    def watch_layout_mode(self) -> None:
        self._apply_layout()

    def _apply_layout(self) -> None:
        container = self.query_one(".panes")
        container.set_class(self.layout_mode == "grid", "-grid")
        container.set_class(self.layout_mode == "focus", "-focus")
        current = self._focused_pane() or next(
            (p for p in self.panes if p.has_class("-current")), None
        )
        current = current or (self.panes[0] if self.panes else None)
        for pane in self.panes:
            pane.set_class(pane is current, "-current")
        self._render_user_tabs()

    def _render_user_tabs(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        for number, pane in enumerate(self.panes, start=1):
            label = f" {number} {terminal_safe(pane.user_id)}{' ●' if pane.busy else ''} "
            text.append(label, style="bold reverse" if pane.has_class("-current") else "")
        text.append("  F8/F9 switch", style="dim")
        for tabs in self.query(UserTabs).results(UserTabs):
            tabs.update(text)

    def on_user_pane_busy_changed(self) -> None:
        self._render_user_tabs()

    def on_user_pane_worker_failed(self, event: UserPane.WorkerFailed) -> None:
        """The one place a pane's failed read or change is told: a toast for its user."""
        if not isinstance(event.error, MemchatError):
            raise event.error  # a bug: stop the app with its traceback, as Textual would
        # markup=False: error messages quote user and model text.
        self.notify(
            terminal_safe(event.error.message),
            title=event.pane.user_id,
            severity="error",
            markup=False,
        )

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.single_user is not None and action in MULTI_USER_ACTIONS:
            return False
        return not (action in PANE_ACTIONS and len(self.screen_stack) > 1)

    def _focused_pane(self, screen: Screen[object] | None = None) -> UserPane | None:
        node = self.focused if screen is None else screen.focused
        while node is not None and not isinstance(node, UserPane):
            node = node.parent  # type: ignore[assignment]
        return node

    def on_descendant_focus(self) -> None:
        # Only a pane taking focus changes which one is current; dialogs do not.
        if self._focused_pane() is not None:
            self._apply_layout()

    def action_focus_user(self, step: int) -> None:
        panes = self.panes
        if not panes:
            return
        current = self._focused_pane()
        index = panes.index(current) if current in panes else 0
        self._focus_pane(panes[(index + step) % len(panes)])

    def action_focus_user_number(self, number: int) -> None:
        panes = self.panes
        if 1 <= number <= len(panes):
            self._focus_pane(panes[number - 1])

    def _focus_pane(self, pane: UserPane) -> None:
        pane.focus_input()
        self._apply_layout()

    @work(group="dialogs")
    async def action_add_user(self) -> None:
        if self.runtime is None:
            return
        user_id = await self.push_screen_wait(
            PromptDialog("Add a user (id, e.g. dave@example.com):", placeholder="user id")
        )
        if not user_id:
            return
        try:
            user_id = validate_user_id(user_id)
        except MemchatError as exc:
            # markup=False: the message quotes what the user typed.
            self.notify(terminal_safe(exc.message), severity="error", markup=False)
            return
        pane = await self.add_pane(user_id)
        if pane is not None:
            self._focus_pane(pane)

    async def action_close_pane(self) -> None:
        pane = self._focused_pane() or next(
            (p for p in self.panes if p.has_class("-current")), None
        )
        if pane is None:
            return
        if pane.busy:
            pane.action_cancel()
        panes = self.panes
        index = panes.index(pane)
        await pane.remove()
        rest = self.panes
        if rest:
            self._focus_pane(rest[min(index, len(rest) - 1)])

    # -- screens -----------------------------------------------------------

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Save an SVG screenshot: to Downloads when it exists, else here, and say where.

        Textual's own saved into ~/Downloads and failed without a word when
        that directory did not exist.
        """
        from platformdirs import user_downloads_dir

        target = Path(path) if path else Path(user_downloads_dir())
        if not target.is_dir():
            target = Path.cwd()
        try:
            saved = self.save_screenshot(filename, str(target))
        except OSError as exc:
            self.notify(
                f"Screenshot not saved: {exc.strerror or exc} ({target})",
                severity="error",
                markup=False,
            )
            return
        self.notify(f"Screenshot saved: {saved}", markup=False)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_inspector(self) -> None:
        if self.runtime is None or self.single_user is not None:
            return
        from tui.screens.inspector import InspectorScreen

        self.push_screen(InspectorScreen(AdminReader(self.runtime.db), events=self.runtime.events))

    def action_demo(self) -> None:
        if not self.ready.is_set():
            return
        if self.demo.running:
            self.demo.toggle_pause()
        else:
            self.demo.start("seed")

    def action_stop_demo(self) -> None:
        self.demo.stop()

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        commands = self._system_commands(screen)
        if self.single_user is not None:
            # The palette calls methods directly, past check_action.
            blocked = (
                self.action_inspector,
                self.action_add_user,
                self.action_close_pane,
                self.action_toggle_layout,
            )
            commands = (
                c
                for c in commands
                if c.callback not in blocked and not c.title.startswith(("Demo", "Focus user"))
            )
        yield from commands

    def _system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: every key", "Show all keys (F1)", self.action_help)
        yield SystemCommand(
            "Layout: grid / focus", "All users, or one full width (F2)", self.action_toggle_layout
        )
        yield SystemCommand(
            "Isolation inspector", "What the database holds per user (F3)", self.action_inspector
        )
        yield SystemCommand(
            "Add user", "Open a pane for another user (ctrl+n)", self.action_add_user
        )
        yield SystemCommand("Close pane", "Close the focused user's pane", self.action_close_pane)
        yield SystemCommand(
            "Demo: play seed scenario",
            "Type the seed script into the panes (F4)",
            lambda: self.demo.start("seed"),
        )
        yield SystemCommand("Demo: pause / resume", "(F4 while playing)", self.demo.toggle_pause)
        yield SystemCommand("Demo: stop", "(shift+F4)", self.demo.stop)
        for number, each in enumerate(self.panes, start=1):
            yield SystemCommand(
                f"Focus user {each.user_id}",
                f"alt+{number} · F8/F9",
                lambda p=each: self._focus_pane(p),
            )
        # The screen the palette was opened over: the palette has the focus now.
        if (pane := self._focused_pane(screen)) is not None:
            who = pane.user_id
            yield SystemCommand(
                f"Sessions of {who}", "Pick a session (ctrl+o)", pane.action_pick_session
            )
            yield SystemCommand(f"New session for {who}", "(ctrl+t)", pane.action_new_session)
            yield SystemCommand(f"Rename session of {who}", "(f6)", pane.action_rename_session)
            yield SystemCommand(
                f"Delete session of {who}", "Asks first (f7)", pane.action_delete_session
            )
            yield SystemCommand(
                f"Export session of {who}",
                "To a Markdown file (also Enter on a message, then e)",
                lambda p=pane: p.messages.post_message(MessageList.ExportRequested()),
            )
            yield SystemCommand(f"Cancel reply of {who}", "(Esc)", pane.action_cancel)
            yield SystemCommand(f"Retry failed reply of {who}", "(ctrl+r)", pane.action_retry)
            yield SystemCommand(
                f"Retry failed memory job of {who}",
                "Queue the newest failed job again (F5 in the memory list)",
                pane.action_retry_memory_job,
            )
            yield SystemCommand(
                f"Dismiss memory job failure of {who}",
                "Hide the failure line until the next failure (shift+F5 in the memory list)",
                pane.sidebar.action_dismiss_job,
            )

    # -- quitting ----------------------------------------------------------

    async def action_quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self.demo.stop()
        running = self.runtime.dispatcher.running_jobs if self.runtime else 0
        if running:
            self.query_one(StatusBar).update(
                Text(
                    f"Quitting: letting {running} memory job(s) finish "
                    f"(up to {self.settings.memory.drain_timeout:g}s)…",
                    style="bold",
                )
            )
        await self.close_engine()
        self.exit()

    async def close_engine(self) -> None:
        """Cancel replies (stored as cancelled), drain memory jobs, close the engine."""
        turns = [w for w in self.workers if w.group == "turn" and not w.is_finished]
        for pane in self.panes:
            pane.action_cancel()
        for worker in turns:
            with contextlib.suppress(Exception):
                await worker.wait()
        self.workers.cancel_group(self, "jobs")
        self.workers.cancel_group(self, "health")
        await self._stack.aclose()

    async def on_unmount(self) -> None:
        await self.close_engine()
