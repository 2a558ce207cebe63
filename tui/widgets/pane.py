"""One user's column: title, conversation, input and memory sidebar.

A thin widget over ``engine.conversation.Conversations``: every read and change
is one call there (one scoped transaction). Each pane streams its replies in
its own worker, so every pane can stream at once and typing in one is never
blocked by another. It follows its user's events from the engine's event hub
(LISTEN/NOTIFY): memories, jobs and messages written by the background job,
the CLI or another memchat show up by themselves.

Errors: a ``MemchatError`` in any of this pane's workers is shown as a toast by
the app (``UserPane.WorkerFailed``), so the methods here do not catch it.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Markdown, Static
from textual.worker import Worker, WorkerState

from engine.agent import (
    TurnCancelled,
    TurnCompleted,
    TurnDelta,
    TurnEvent,
    TurnFailed,
    TurnRetrying,
    TurnStarted,
)
from engine.conversation import PAGE_SIZE, Conversations, ConversationView
from engine.errors import MemchatError, NotFound
from engine.events import JobChanged, MemoryChanged, MessageChanged, Resync
from engine.records import Memory, Message, Session
from engine.runtime import Runtime
from engine.terminal import terminal_safe
from tui.export import export_to_file
from tui.screens.dialogs import ConfirmDialog, PromptDialog, SessionPicker
from tui.widgets.messages import (
    AssistantMessage,
    EmptyHint,
    MessageList,
    OlderMessages,
    TurnError,
    UserMessage,
)
from tui.widgets.prompt import Prompt
from tui.widgets.sidebar import MemorySidebar
from tui.widgets.stream_batch import BatchedStream, TypingClock

__all__ = ["PAGE_SIZE", "PaneOptions", "UserPane"]

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
        Binding("ctrl+r", "retry", "Regenerate", show=False),
        Binding("ctrl+o", "pick_session", "Sessions"),
        Binding("ctrl+t", "new_session", "New session", show=False),
        Binding("f6", "rename_session", "Rename", show=False),
        Binding("f7", "delete_session", "Delete session", show=False),
    ]

    session: reactive[Session | None] = reactive(None)
    busy: reactive[bool] = reactive(False)
    retrying: reactive[str] = reactive("")
    """"2/3" while the model request is retried; empty otherwise."""

    class TurnFinished(TextualMessage):
        """A turn of this pane ended (completed, failed or cancelled)."""

        def __init__(self, pane: UserPane, status: str) -> None:
            super().__init__()
            self.pane = pane
            self.status = status

    class WorkerFailed(TextualMessage):
        """A worker of this pane raised: the app shows a MemchatError as a toast."""

        def __init__(self, pane: UserPane, error: BaseException) -> None:
            super().__init__()
            self.pane = pane
            self.error = error

    class BusyChanged(TextualMessage):
        """A reply started or ended streaming (the user list marks it)."""

    def __init__(self, runtime: Runtime, user_id: str, options: PaneOptions) -> None:
        super().__init__(classes="pane")
        self.runtime = runtime
        self.chats = Conversations.of(runtime)
        self.user_id = user_id
        self.options = options
        self.unsent_text: str | None = None
        """A message the engine never stored (it failed before): ctrl+r sends it."""
        # Messages sent while a reply streams go out, in order, after it.
        self.queued: list[str] = []
        self._oldest_id: int | None = None
        self._synced_id = 0
        """Every message of the open session up to this id is shown (or was replaced)."""
        self._view = asyncio.Lock()
        """Held while the message list changes: a load, a live sync."""
        self._sync_wanted = False
        self._maybe_gone: set[int] = set()
        self._loading_older = False
        self._reads_started = 0
        self._read_shown = 0
        self.ready = asyncio.Event()

    def _hint(self) -> str:
        who = terminal_safe(self.user_id)
        if getattr(self.app, "single_user", None) is not None:
            return f"Say hi as {who} · F1 keys"  # a serve tab has no demo
        return f"Say hi as {who} · F4 plays the demo · F1 keys"

    def compose(self) -> ComposeResult:
        yield Static(classes="pane-title")
        with Horizontal(classes="pane-body"):
            with Vertical(classes="chat"):
                yield MessageList(OlderMessages(0), EmptyHint(self._hint()), classes="messages")
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

    def watch_busy(self) -> None:
        self._render_title()
        self.post_message(self.BusyChanged())

    def watch_retrying(self) -> None:
        self._render_title()

    def _render_title(self) -> None:
        if not self.is_mounted:
            return
        title = Text(terminal_safe(self.user_id), style="bold")
        session = self.session.title if self.session else None
        title.append(f" · {terminal_safe(session or 'New session')}", style="")
        if self.busy and self.retrying:
            title.append(f"  ● retrying {self.retrying}… (Esc cancels)", style="italic")
        elif self.busy:
            title.append("  ● replying (Esc cancels)", style="italic")
        if self.queued:
            title.append(f"  {len(self.queued)} queued", style="italic")
        # query, not query_one: during shutdown the children may already be gone.
        for widget in self.query(".pane-title").results(Static):
            widget.update(title)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "turn" and event.state in (
            WorkerState.CANCELLED,
            WorkerState.ERROR,
        ):
            self.busy = False
            self.retrying = ""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            # Worker state changes do not bubble: hand the error to the app's one handler.
            self.post_message(self.WorkerFailed(self, event.worker.error))

    # -- loading -----------------------------------------------------------

    @work(group="load", exclusive=True, exit_on_error=False)
    async def load_session(self, session_id: uuid.UUID | None = None) -> None:
        """Open a session (None: the latest, or a new one) with its memories and job state."""
        read = self._begin_memory_read()
        try:
            async with self._view:
                view = await self.chats.open_view(self.user_id, session_id)
                await self._show_view(view)
            self._show_memories(read, view.memories)
            if view.job.state == "failed":
                self.sidebar.job_error = view.job.error or ""
            self.sidebar.job_state = view.job.state
        finally:
            # Loaded as far as it goes: whoever waits for the pane (the app's
            # start, the demo) must not wait forever.
            self.ready.set()
        self._send_queued()

    async def _show_view(self, view: ConversationView) -> None:
        """Replace the message list with ``view``'s last page (holding ``_view``)."""
        history = view.messages
        self.session = view.session
        self._oldest_id = history[0].message_id if history else None
        self._synced_id = history[-1].message_id if history else 0
        self._maybe_gone.clear()
        messages = self.messages
        await messages.remove_children(
            [c for c in messages.children if not isinstance(c, OlderMessages | EmptyHint)]
        )
        marker = messages.query_one(OlderMessages)
        marker.set_count(view.total - len(history))
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

    async def load_older(self) -> None:
        """Mount the page of messages before the oldest one shown."""
        if self._loading_older or self._oldest_id is None or self.session is None:
            return
        self._loading_older = True
        try:
            page = await self.chats.older(self.user_id, self.session.session_id, self._oldest_id)
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
                next(
                    (c for c in messages.children if not isinstance(c, OlderMessages | EmptyHint)),
                    None,
                )
                if messages.scroll_y <= 1
                else None
            )
            await messages.mount_all(messages.message_widgets(page), after=marker)
            if reading is not None:
                # After the layout that gives the new page its height.
                messages.call_after_refresh(
                    messages.scroll_to_widget, reading, top=True, animate=False
                )
        finally:
            self._loading_older = False

    @work(group="older", exit_on_error=False)
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
        self._show_memories(read, await self.chats.memories(self.user_id))

    async def reload_job_state(self) -> None:
        # NOTIFY payloads are database-wide and anyone connected may send
        # one: an event only says "look again". What the sidebar shows is
        # what this user's scope reads, never the payload's state.
        job = await self.chats.job_state(self.user_id)
        if job.state == "failed":
            self.sidebar.job_error = job.error or ""
        self.sidebar.job_state = job.state

    # -- live updates ------------------------------------------------------

    @work(group="events", exit_on_error=False)
    async def follow_events(self) -> None:
        async with self.runtime.events.subscribe(self.user_id) as subscription:
            async for first in subscription:
                # Whatever else is queued is taken with it: a burst (a script
                # writing 2,000 messages) costs one read, not one per event.
                batch: list[object] = [first]
                while (more := subscription.get_nowait()) is not None:
                    batch.append(more)
                try:
                    await self._on_engine_events(batch)
                except MemchatError as exc:
                    # This loop must outlive one failed read: report it and go on.
                    self.post_message(self.WorkerFailed(self, exc))
                except NoMatches:
                    # The app is closing and the pane's widgets are already
                    # gone: a late event has nothing left to update.
                    return

    async def _on_engine_events(self, batch: list[object]) -> None:
        resync = any(isinstance(e, Resync) for e in batch)
        current = self.session.session_id if self.session is not None else None
        ours = [e for e in batch if isinstance(e, MessageChanged) and e.session_id == current]
        self._maybe_gone.update(e.message_id for e in ours if e.op == "delete")
        if resync or any(isinstance(e, MemoryChanged) for e in batch):
            await self.reload_memories()
        if resync or any(isinstance(e, JobChanged) for e in batch):
            await self.reload_job_state()
        if resync or ours:
            await self.sync_messages()

    def _shown_ids(self) -> set[int]:
        return {
            message_id
            for child in self.messages.children
            if (message_id := getattr(child, "message_id", None)) is not None
        }

    async def sync_messages(self) -> None:
        """Show what was written to the open session elsewhere; drop replaced replies.

        Read back through the user's scope: an event only says "look again".
        While this pane's own reply streams it waits, then catches up.
        """
        if self.busy or self.session is None:
            self._sync_wanted = True
            return
        self._sync_wanted = False
        async with self._view:
            session = self.session
            if session is None:
                return
            shown = self._shown_ids()
            gone = self._maybe_gone & shown
            self._maybe_gone.clear()
            if gone:
                still = await self.chats.existing(self.user_id, sorted(gone))
                await self._remove_replies(gone - still)
            new = await self.chats.messages_after(
                self.user_id, session.session_id, self._synced_id, limit=PAGE_SIZE + 1
            )
            if self.session is not session:
                return  # another session was opened meanwhile
            if len(new) > PAGE_SIZE:
                # More than a page came at once (a script, an import): open it afresh.
                await self._show_view(await self.chats.open_view(self.user_id, session.session_id))
                return
            fresh = [m for m in new if m.message_id not in shown]
            if new:
                self._synced_id = new[-1].message_id
            if fresh:
                await self.messages.mount_all(self.messages.message_widgets(fresh))
                self.messages.anchor()
                await self._refresh_session()

    async def _remove_replies(self, message_ids: set[int]) -> None:
        """Remove these replies' widgets, with the error line under each."""
        doomed: list[Widget] = []
        children = list(self.messages.children)
        for index, child in enumerate(children):
            if isinstance(child, AssistantMessage) and child.message_id in message_ids:
                doomed.append(child)
                following = children[index + 1] if index + 1 < len(children) else None
                if isinstance(following, TurnError):
                    doomed.append(following)
        if doomed:
            await self.messages.remove_children(doomed)

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

    def _refuse_turn(self) -> bool:
        if self.busy:
            self.app.notify("A reply is still streaming: wait, or Esc to cancel it.")
            return True
        if self.session is None:
            self.app.notify("This pane is still loading.")
            return True
        return False

    def send(self, text: str) -> Worker[None] | None:
        """Start a turn; returns its worker (None when refused)."""
        if self._refuse_turn():
            return None
        try:
            text = self.chats.check_text(text)
        except MemchatError as exc:
            self.post_message(self.WorkerFailed(self, exc))
            return None
        self.input.remember(text)
        self.busy = True
        return self.run_worker(self._turn(text), group="turn", exclusive=True, exit_on_error=False)

    def regenerate(self) -> Worker[None] | None:
        """A new reply to the session's last message, in place of its reply."""
        if self._refuse_turn():
            return None
        self.busy = True
        return self.run_worker(self._turn(None), group="turn", exclusive=True, exit_on_error=False)

    def _send_queued(self) -> None:
        # Not while loading: the message waits for the session to be there.
        while self.queued and not self.busy and self.session is not None:
            text = self.queued.pop(0)
            if self.send(text) is not None:
                break
        self._render_title()

    async def _turn(self, text: str | None) -> None:
        """One turn: ``text`` sent, or (None) the last reply regenerated."""
        assert self.session is not None
        session_id = self.session.session_id
        messages = self.messages
        user_widget: UserMessage | None = None
        reply: AssistantMessage | None = None
        if text is not None:
            user_widget = UserMessage(text)
            reply = AssistantMessage()
            await messages.mount_all([user_widget, reply])
            messages.anchor()
            turn = self.chats.send(self.user_id, session_id, text)
        else:
            turn = self.chats.regenerate(self.user_id, session_id)
        stream: BatchedStream | None = None
        parts: list[str] = []
        status = "failed"
        self.unsent_text = text
        try:
            async for event in turn:
                if isinstance(event, TurnStarted):
                    self.unsent_text = None
                    if user_widget is not None:
                        user_widget.message_id = event.user_message.message_id
                    else:
                        reply = await self._replace_reply_of(event.user_message)
                    assert reply is not None
                    stream = BatchedStream(Markdown.get_stream(reply), typing=self.options.typing)
                else:
                    assert reply is not None and stream is not None
                    status = await self._show_event(event, reply, stream, parts)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except NotFound as exc:
            if text is None:
                raise
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
            self.unsent_text = None
            self.queued.insert(0, text)
            self.session = None
            self.load_session()
        except MemchatError as exc:
            if reply is None:
                raise  # nothing regenerated (no message yet, ...): the app's toast says why
            if self.unsent_text is not None and user_widget is not None:
                # The message was never stored: it leaves the transcript and
                # ctrl+r sends it, so it is never shown twice.
                await messages.remove_children([user_widget, reply])
                reply = None
            await messages.mount(TurnError(exc.message))
        finally:
            self.retrying = ""
            if stream is not None:
                await stream.stop()
            if reply is not None:
                # One full render at the end: streamed fragments can leave code
                # fences half-drawn.
                await reply.update(terminal_safe("".join(parts)))
                reply.mark_outcome(status)
            self.busy = False
            self.post_message(self.TurnFinished(self, status))
        await self._refresh_session()
        if self._sync_wanted:
            await self.sync_messages()
        self._send_queued()

    async def _show_event(
        self, event: TurnEvent, reply: AssistantMessage, stream: BatchedStream, parts: list[str]
    ) -> str:
        """Show one event of a streaming turn; returns the turn's status so far."""
        match event:
            case TurnRetrying(attempt=attempt, of=of):
                self.retrying = f"{attempt}/{of}"
            case TurnDelta(text=delta):
                self.retrying = ""
                parts.append(delta)
                await stream.write(terminal_safe(delta))
            case TurnCompleted(reply=message) | TurnCancelled(reply=message):
                reply.message_id = message.message_id
                parts[:] = [message.content]
                return message.status
            case TurnFailed(reply=message, error=error):
                reply.message_id = message.message_id
                parts[:] = [message.content]
                await self.messages.mount(TurnError(error))
        return "failed"

    async def _replace_reply_of(self, user_message: Message) -> AssistantMessage:
        """Regenerating: the old reply (and its error line) goes, a new one takes its place."""
        messages = self.messages
        children = list(messages.children)
        start = next(
            (
                i
                for i, child in enumerate(children)
                if isinstance(child, UserMessage) and child.message_id == user_message.message_id
            ),
            None,
        )
        if start is None:
            # Not shown (a session switched under it): show the message being answered.
            await messages.mount(
                UserMessage(user_message.content, message_id=user_message.message_id)
            )
        else:
            doomed = [
                c for c in children[start + 1 :] if isinstance(c, AssistantMessage | TurnError)
            ]
            await messages.remove_children(doomed)
        reply = AssistantMessage()
        await messages.mount(reply)
        messages.anchor()
        return reply

    async def _refresh_session(self) -> None:
        """Re-read the session: its first message gave it a title."""
        if self.session is None or self.session.title is not None:
            return
        session_id = self.session.session_id
        try:
            session = await self.chats.session(self.user_id, session_id)
        except MemchatError:
            return  # gone or unreachable: the next turn says so
        if self.session is not None and self.session.session_id == session_id:
            self.session = session

    def action_cancel(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, "turn")

    def action_retry(self) -> None:
        """ctrl+r: send a message that never got stored, else regenerate the last reply."""
        if self.unsent_text is not None:
            self.send(self.unsent_text)
        else:
            self.regenerate()

    # -- sessions ----------------------------------------------------------

    @work(group="sessions", exit_on_error=False)
    async def action_pick_session(self) -> None:
        sessions = await self.chats.list_sessions(self.user_id)
        chosen = await self.app.push_screen_wait(
            SessionPicker(self.user_id, sessions, self.session)
        )
        if chosen is not None:
            self.load_session(chosen.session_id)

    @work(group="sessions", exit_on_error=False)
    async def action_new_session(self, title: str | None = None) -> None:
        if self.busy:
            self.app.notify("Wait for the reply (or Esc) before switching sessions.")
            return
        session = await self.chats.create_session(self.user_id, title)
        self.load_session(session.session_id)

    async def switch_to_titled(self, title: str) -> None:
        """Show the session with this title, creating it if needed (demo mode)."""
        session = await self.chats.switch_to_titled(self.user_id, title, self.session)
        self.ready.clear()
        self.load_session(session.session_id)
        await self.ready.wait()

    @work(group="sessions", exit_on_error=False)
    async def action_rename_session(self) -> None:
        if self.session is None:
            return
        title = await self.app.push_screen_wait(
            PromptDialog(
                "Rename this session to:", value=self.session.title or "", who=self.user_id
            )
        )
        if title is None or self.session is None:
            return
        self.session = await self.chats.rename_session(self.user_id, self.session.session_id, title)

    @work(group="sessions", exit_on_error=False)
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
        await self.chats.delete_session(self.user_id, self.session.session_id)
        self.load_session()

    # -- memories ----------------------------------------------------------

    @work(group="memories", exit_on_error=False)
    async def on_memory_sidebar_retry_job_requested(
        self, event: MemorySidebar.RetryJobRequested
    ) -> None:
        event.stop()
        await self.retry_memory_job()

    @work(group="jobs", exit_on_error=False)
    async def action_retry_memory_job(self) -> None:
        await self.retry_memory_job()

    async def retry_memory_job(self) -> None:
        """Queue this user's newest failed memory job again (attempts start over)."""
        job = await self.chats.retry_failed_job(self.user_id)
        if job is None:
            self.app.notify("No failed memory job to retry.", title=self.user_id, markup=False)
            return
        self.app.notify(f"Memory job {job.job_id} queued again.", title=self.user_id, markup=False)
        await self.reload_job_state()

    @work(group="memories", exit_on_error=False)
    async def on_memory_sidebar_edit_requested(self, event: MemorySidebar.EditRequested) -> None:
        text = await self.app.push_screen_wait(
            PromptDialog("Edit this memory:", value=event.memory.content, who=self.user_id)
        )
        if text is None or text == event.memory.content:
            return
        await self.chats.edit_memory(self.user_id, event.memory.memory_id, text)

    @work(group="memories", exit_on_error=False)
    async def on_memory_sidebar_delete_requested(
        self, event: MemorySidebar.DeleteRequested
    ) -> None:
        if not await self.app.push_screen_wait(
            ConfirmDialog(f"Forget “{event.memory.content}”?", yes="Forget", who=self.user_id)
        ):
            return
        await self.chats.forget_memory(self.user_id, event.memory.memory_id)

    # -- export (asked by the message list: Enter on a message, then e) ------

    @work(group="export", exit_on_error=False)
    async def on_message_list_export_requested(self, event: MessageList.ExportRequested) -> None:
        event.stop()
        if self.session is None:
            self.app.notify("This pane is still loading.")
            return
        await export_to_file(
            self.app,
            self.runtime.store,
            self.user_id,
            self.session.session_id,
            getattr(self.app, "export_directory", None),
        )
