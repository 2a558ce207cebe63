"""One user's column: title, conversation, input and memory sidebar.

Each pane streams its replies in its own worker, so every pane can stream at
once and typing in one is never blocked by another. It follows its user's
memory and job events from the engine's event hub (LISTEN/NOTIFY), so changes
made by the background job, the CLI or another memchat show up by themselves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.widgets import Markdown, Static
from textual.worker import Worker, WorkerState

from engine.agent import TurnCancelled, TurnCompleted, TurnDelta, TurnFailed, TurnStarted
from engine.errors import MemchatError, NotFound
from engine.events import JobChanged, MemoryChanged, Resync
from engine.queue import JobQueue
from engine.records import Memory, Session
from engine.runtime import Runtime
from engine.store import UserScope
from engine.terminal import terminal_safe
from tui.screens.dialogs import ConfirmDialog, PromptDialog, SessionPicker
from tui.widgets.messages import (
    AssistantMessage,
    MessageList,
    OlderMessages,
    TurnError,
    UserMessage,
)
from tui.widgets.prompt import Prompt
from tui.widgets.sidebar import MemorySidebar
from tui.widgets.stream_batch import BatchedStream, TypingClock

PAGE_SIZE = 50
# Messages mounted before the first paint of a session: more than a tall pane shows.
FIRST_PAINT = 12


@dataclass(frozen=True, slots=True)
class PaneOptions:
    highlight_seconds: float = 5.0
    animate: bool = True
    typing: TypingClock = field(default_factory=TypingClock)
    """Shared by every pane: typing anywhere defers replies' screen updates."""


class UserPane(Vertical):
    BINDINGS = [
        # Hidden from the footer so that F1–F3 fit in 80 columns: the title
        # says "Esc cancels" while replying, a failed reply says "ctrl+r".
        Binding("escape", "cancel", "Cancel reply", show=False),
        Binding("ctrl+r", "retry", "Retry", show=False),
        Binding("ctrl+o", "pick_session", "Sessions"),
        Binding("ctrl+t", "new_session", "New session", show=False),
        Binding("f6", "rename_session", "Rename", show=False),
        Binding("f7", "delete_session", "Delete session", show=False),
    ]

    session: reactive[Session | None] = reactive(None)
    busy: reactive[bool] = reactive(False)

    class TurnFinished(TextualMessage):
        """A turn of this pane ended (completed, failed or cancelled)."""

        def __init__(self, pane: UserPane, status: str) -> None:
            super().__init__()
            self.pane = pane
            self.status = status

    def __init__(self, runtime: Runtime, user_id: str, options: PaneOptions) -> None:
        super().__init__(classes="pane")
        self.runtime = runtime
        self.user_id = user_id
        self.options = options
        self.last_failed_text: str | None = None
        # Messages sent while a reply streams go out, in order, after it.
        self.queued: list[str] = []
        self._oldest_id: int | None = None
        self._loading_older = False
        self._reads_started = 0
        self._read_shown = 0
        self.ready = asyncio.Event()

    def compose(self) -> ComposeResult:
        yield Static(classes="pane-title")
        with Horizontal(classes="pane-body"):
            with Vertical(classes="chat"):
                yield MessageList(OlderMessages(0), classes="messages")
                prompt = Prompt(
                    self.user_id,
                    placeholder=f"Say hi as {self.user_id} · Enter sends · ctrl+j new line",
                )
                # The prompt names who is typing: in a multi-user app a
                # message must never go out as the wrong user unnoticed.
                prompt.border_title = f"{self.user_id} ›"
                yield prompt
            yield MemorySidebar(
                highlight_seconds=self.options.highlight_seconds, animate=self.options.animate
            )

    def on_mount(self) -> None:
        self.input.cursor_blink = self.options.animate
        self._render_title()
        self.load_session()
        self.follow_events()

    # -- helpers -----------------------------------------------------------

    @property
    def input(self) -> Prompt:
        return self.query_one(Prompt)

    @property
    def messages(self) -> MessageList:
        return self.query_one(MessageList)

    @property
    def sidebar(self) -> MemorySidebar:
        return self.query_one(MemorySidebar)

    def focus_input(self) -> None:
        # Now, not after the queued events (Widget.focus defers): in a burst
        # (alt+3 then text, as tmux send-keys writes it) the keys after the
        # switch belong to the new user.
        self.screen.set_focus(self.input)

    def watch_session(self) -> None:
        self._render_title()

    class BusyChanged(TextualMessage):
        """A reply started or ended streaming (the user list marks it)."""

    def watch_busy(self) -> None:
        self._render_title()
        self.post_message(self.BusyChanged())

    def _render_title(self) -> None:
        if not self.is_mounted:
            return
        title = Text(terminal_safe(self.user_id), style="bold")
        session = self.session.title if self.session else None
        title.append(f" · {terminal_safe(session or 'New session')}", style="")
        if self.busy:
            title.append("  ● replying (Esc cancels)", style="italic")
        if self.queued:
            title.append(f"  {len(self.queued)} queued", style="italic")
        # query, not query_one: during shutdown the children may already be gone.
        for widget in self.query(".pane-title").results(Static):
            widget.update(title)

    async def _in_scope(self, action: Callable[[UserScope], Awaitable[object]]) -> bool:
        """Run one change in this user's scope; report a failure instead of raising."""
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                await action(s)
        except MemchatError as exc:
            self._report(exc)
            return False
        return True

    def _report(self, exc: MemchatError) -> None:
        # markup=False: error messages quote user and model text.
        self.app.notify(
            terminal_safe(exc.message), title=self.user_id, severity="error", markup=False
        )

    # -- loading -----------------------------------------------------------

    @work(group="load", exclusive=True)
    async def load_session(self, session_id: uuid.UUID | None = None) -> None:
        read = self._begin_memory_read()
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                await s.ensure_user()
                if session_id is not None:
                    session = await s.get_session(session_id)
                else:
                    sessions = await s.list_sessions()
                    session = sessions[0] if sessions else await s.create_session()
                history = await s.last_messages(session.session_id, PAGE_SIZE)
                total = await s.count_messages(session.session_id)
                memories = await s.list_memories()
                jobs = await JobQueue.list_jobs(s, limit=1)
        except MemchatError as exc:
            self._report(exc)
            # Loaded as far as it goes: whoever waits for the pane (the app's
            # start, the demo) must not wait forever.
            self.ready.set()
            return
        self.session = session
        self._oldest_id = history[0].message_id if history else None
        messages = self.messages
        await messages.remove_children(
            [child for child in messages.children if not isinstance(child, OlderMessages)]
        )
        marker = messages.query_one(OlderMessages)
        marker.set_count(total - len(history))
        widgets = messages.message_widgets(history)
        # A screenful first, painted, then the rest of the page above it:
        # mounting a whole page of Markdown replies before the first paint
        # took 600 ms (docs/benchmarks.md).
        await messages.mount_all(widgets[-FIRST_PAINT:])
        messages.anchor()
        if widgets[:-FIRST_PAINT]:
            painted = asyncio.Event()
            self.call_after_refresh(painted.set)
            await painted.wait()
            await messages.mount_all(widgets[:-FIRST_PAINT], after=marker)
        self._show_memories(read, memories)
        if jobs and jobs[0].status == "failed":
            self.sidebar.job_error = jobs[0].last_error or ""
            self.sidebar.job_state = "failed"
        elif jobs and jobs[0].status == "running":
            self.sidebar.job_state = "running"
        self.ready.set()
        self._send_queued()

    async def load_older(self) -> None:
        """Mount the page of messages before the oldest one shown."""
        if self._loading_older or self._oldest_id is None or self.session is None:
            return
        self._loading_older = True
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                page = await s.messages_before(self.session.session_id, self._oldest_id, PAGE_SIZE)
            if not page:
                return
            self._oldest_id = page[0].message_id
            messages = self.messages
            marker = messages.query_one(OlderMessages)
            marker.set_count(max(marker.count - len(page), 0))
            # The reader stays on the message they were reading: without
            # this the view sat at the top of the new page, scroll_y stayed 0
            # and the next page never loaded (ReachedTop needs a change).
            # Only when reading at the top (what loads a page): a reader at
            # the bottom stays at the bottom.
            reading = (
                next((c for c in messages.children if not isinstance(c, OlderMessages)), None)
                if messages.scroll_y <= 1
                else None
            )
            await messages.mount_all(messages.message_widgets(page), after=marker)
            if reading is not None:
                # After the layout that gives the new page its height.
                messages.call_after_refresh(
                    messages.scroll_to_widget, reading, top=True, animate=False
                )
        except MemchatError as exc:
            self._report(exc)
        finally:
            self._loading_older = False

    async def on_message_list_reached_top(self, event: MessageList.ReachedTop) -> None:
        event.stop()
        await self.load_older()

    def _begin_memory_read(self) -> int:
        self._reads_started += 1
        return self._reads_started

    def _show_memories(self, read: int, memories: list[Memory]) -> None:
        # Reads overlap (a session switch and a change notification): a read
        # started later sees a state at least as new, so only those may replace
        # what is shown, never an older read that happens to finish last.
        if read > self._read_shown:
            self._read_shown = read
            self.sidebar.show(memories)

    async def reload_memories(self) -> None:
        read = self._begin_memory_read()
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                memories = await s.list_memories()
        except MemchatError as exc:
            self._report(exc)
            return
        self._show_memories(read, memories)

    @work(group="events")
    async def follow_events(self) -> None:
        async with self.runtime.events.subscribe(self.user_id) as subscription:
            async for event in subscription:
                try:
                    await self._on_engine_event(event)
                except MemchatError as exc:
                    self._report(exc)
                except NoMatches:
                    # The app is closing and the pane's widgets are already
                    # gone: a late event has nothing left to update.
                    return

    async def _on_engine_event(self, event: object) -> None:
        match event:
            case MemoryChanged():
                await self.reload_memories()
            case JobChanged():
                await self.reload_job_state()
            case Resync():
                await self.reload_memories()
                await self.reload_job_state()

    async def reload_job_state(self) -> None:
        # NOTIFY payloads are database-wide and anyone connected may send
        # one: an event only says "look again". What the sidebar shows is
        # what this user's scope reads, never the payload's state.
        async with self.runtime.store.scope(self.user_id) as s:
            state, error = await JobQueue.job_state(s)
        if state == "failed":
            self.sidebar.job_error = error or ""
        self.sidebar.job_state = state

    def on_resize(self) -> None:
        # A smaller terminal must still show the end of the conversation:
        # the reader was at the bottom unless older messages are loading.
        if not self._loading_older:
            self.messages.scroll_end(animate=False, immediate=False)

    # -- keys --------------------------------------------------------------

    def on_key(self, event: events.Key) -> None:
        # Printable keys that reach the pane (the memory list, a message)
        # belong in the prompt: typing never acts on a list.
        if event.is_printable and event.character and self.app.focused is not self.input:
            event.stop()
            event.prevent_default()
            self.screen.set_focus(self.input)
            self.input.insert(event.character)

    # -- turns -------------------------------------------------------------

    def on_text_area_changed(self, event: Prompt.Changed) -> None:
        self.options.typing.mark()

    def on_prompt_submitted(self, event: Prompt.Submitted) -> None:
        event.stop()
        if self.busy or self.session is None:
            # A burst of keys (or a fast typist) sends the next message
            # before the reply ends: it waits its turn instead of being lost.
            if event.text.strip():
                self.queued.append(event.text)
                self.input.remember(event.text)
                self._render_title()
            return
        if self.send(event.text) is None:
            event.prompt.restore(event.text)

    def send(self, text: str) -> Worker[None] | None:
        """Start a turn; returns its worker (None when refused)."""
        if self.busy:
            self.app.notify("A reply is still streaming: wait, or Esc to cancel it.")
            return None
        if self.session is None:
            self.app.notify("This pane is still loading.")
            return None
        try:
            text = self.runtime.agent.check_text(text)
        except MemchatError as exc:
            self._report(exc)
            return None
        self.input.remember(text)
        self.busy = True
        return self.run_worker(self._turn(text), group="turn", exclusive=True)

    def _send_queued(self) -> None:
        # Not while loading: the message waits for the session to be there.
        while self.queued and not self.busy and self.session is not None:
            text = self.queued.pop(0)
            if self.send(text) is not None:
                break
        self._render_title()

    async def _turn(self, text: str) -> None:
        assert self.session is not None
        messages = self.messages
        await messages.mount(UserMessage(text))
        reply = AssistantMessage()
        await messages.mount(reply)
        messages.anchor()
        stream = BatchedStream(Markdown.get_stream(reply), typing=self.options.typing)
        parts: list[str] = []
        status = "failed"
        try:
            async for event in self.runtime.agent.stream(
                self.user_id, self.session.session_id, text
            ):
                match event:
                    case TurnStarted():
                        self.last_failed_text = None
                    case TurnDelta(text=delta):
                        parts.append(delta)
                        await stream.write(terminal_safe(delta))
                    case TurnCompleted(reply=message) | TurnCancelled(reply=message):
                        status = message.status
                        parts = [message.content]
                    case TurnFailed(reply=message, error=error):
                        status = "failed"
                        parts = [message.content]
                        self.last_failed_text = text
                        await messages.mount(TurnError(error))
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except NotFound as exc:
            # The session was deleted elsewhere (another memchat, the CLI):
            # open a fresh one and send the message there instead of failing
            # the same way on every retry.
            self.app.notify(
                f"{terminal_safe(exc.message)}: it was deleted elsewhere; "
                "your message is sent again in your latest session.",
                title=self.user_id,
                severity="warning",
                markup=False,
            )
            self.queued.insert(0, text)
            self.session = None
            self.load_session()
        except MemchatError as exc:
            self.last_failed_text = text
            await messages.mount(TurnError(exc.message))
        finally:
            await stream.stop()
            # One full render at the end: streamed fragments can leave code
            # fences half-drawn.
            await reply.update(terminal_safe("".join(parts)))
            reply.mark_outcome(status)
            self.busy = False
            self.post_message(self.TurnFinished(self, status))
        await self._refresh_session()
        self._send_queued()

    async def _refresh_session(self) -> None:
        """Re-read the session: its first message gave it a title."""
        if self.session is None or self.session.title is not None:
            return
        session_id = self.session.session_id
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                session = await s.get_session(session_id)
        except MemchatError:
            return  # gone or unreachable: the next turn says so
        if self.session is not None and self.session.session_id == session_id:
            self.session = session

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "turn" and event.state in (
            WorkerState.CANCELLED,
            WorkerState.ERROR,
        ):
            self.busy = False

    def action_cancel(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, "turn")

    def action_retry(self) -> None:
        if self.last_failed_text is None:
            self.app.notify("Nothing to retry in this pane.")
            return
        self.send(self.last_failed_text)

    # -- sessions ----------------------------------------------------------

    @work(group="sessions")
    async def action_pick_session(self) -> None:
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                sessions = await s.list_sessions()
        except MemchatError as exc:
            self._report(exc)
            return
        chosen = await self.app.push_screen_wait(
            SessionPicker(self.user_id, sessions, self.session)
        )
        if chosen is not None:
            self.load_session(chosen.session_id)

    @work(group="sessions")
    async def action_new_session(self, title: str | None = None) -> None:
        if self.busy:
            self.app.notify("Wait for the reply (or Esc) before switching sessions.")
            return
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                session = await s.create_session(title)
        except MemchatError as exc:
            self._report(exc)
            return
        self.load_session(session.session_id)

    async def switch_to_titled(self, title: str) -> None:
        """Show the session with this title, creating it if needed (demo mode)."""
        async with self.runtime.store.scope(self.user_id) as s:
            found = [x for x in await s.list_sessions() if x.title == title]
            if found:
                session = found[0]
            elif (
                self.session is not None
                and self.session.title is None
                and await s.count_messages(self.session.session_id) == 0
            ):
                # The empty session the pane opened with becomes the named one.
                session = await s.rename_session(self.session.session_id, title)
            else:
                session = await s.create_session(title)
        self.ready.clear()
        self.load_session(session.session_id)
        await self.ready.wait()

    @work(group="sessions")
    async def action_rename_session(self) -> None:
        if self.session is None:
            return
        title = await self.app.push_screen_wait(
            PromptDialog(
                "Rename this session to:", value=self.session.title or "", who=self.user_id
            )
        )
        if title is None:
            return
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                self.session = await s.rename_session(self.session.session_id, title)
        except MemchatError as exc:
            self._report(exc)

    @work(group="sessions")
    async def action_delete_session(self) -> None:
        if self.busy:
            self.app.notify("Wait for the reply (or Esc) before deleting the session.")
            return
        if self.session is None:
            return
        if self.session.title is None:
            await self._refresh_session()  # its first message may have named it
        name = self.session.title or "this empty session"
        if not await self.app.push_screen_wait(
            ConfirmDialog(f"Delete “{name}” and all its messages?", yes="Delete", who=self.user_id)
        ):
            return
        session_id = self.session.session_id
        if await self._in_scope(lambda s: s.delete_session(session_id)):
            self.load_session()

    # -- memories ----------------------------------------------------------

    @work(group="memories")
    async def on_memory_sidebar_retry_job_requested(
        self, event: MemorySidebar.RetryJobRequested
    ) -> None:
        event.stop()
        await self.retry_memory_job()

    @work(group="jobs")
    async def action_retry_memory_job(self) -> None:
        await self.retry_memory_job()

    async def retry_memory_job(self) -> None:
        """Queue this user's newest failed memory job again (attempts start over)."""
        try:
            async with self.runtime.store.scope(self.user_id) as s:
                job = await JobQueue.retry_failed_job(s)
        except MemchatError as exc:
            self._report(exc)
            return
        if job is None:
            self.app.notify("No failed memory job to retry.", title=self.user_id, markup=False)
            return
        self.runtime.dispatcher.wake()
        self.app.notify(f"Memory job {job.job_id} queued again.", title=self.user_id, markup=False)
        await self.reload_job_state()

    async def on_memory_sidebar_edit_requested(self, event: MemorySidebar.EditRequested) -> None:
        text = await self.app.push_screen_wait(
            PromptDialog("Edit this memory:", value=event.memory.content, who=self.user_id)
        )
        if text is None or text == event.memory.content:
            return
        await self._in_scope(lambda s: s.update_memory(event.memory.memory_id, text))

    @work(group="memories")
    async def on_memory_sidebar_delete_requested(
        self, event: MemorySidebar.DeleteRequested
    ) -> None:
        if not await self.app.push_screen_wait(
            ConfirmDialog(f"Forget “{event.memory.content}”?", yes="Forget", who=self.user_id)
        ):
            return
        await self._in_scope(lambda s: s.delete_memory(event.memory.memory_id))

    # -- export (asked by the message list: Enter on a message, then e) ------

    @work(group="export")
    async def on_message_list_export_requested(self, event: MessageList.ExportRequested) -> None:
        event.stop()
        if self.session is None:
            self.app.notify("This pane is still loading.")
            return
        from tui.export import export_to_file

        await export_to_file(
            self.app,
            self.runtime.store,
            self.user_id,
            self.session.session_id,
            getattr(self.app, "export_directory", None),
        )
