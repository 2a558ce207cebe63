"""TUI responsiveness: typing while other panes stream, opening a long session, memory.

Three points, each the real app (``MemchatApp`` on the real engine and
PostgreSQL) run headless with ``App.run_test`` at 200x50, built as the Pilot
tests build it (no animation):

``keystrokes``
    Four panes on fresh sessions. Three stream a reply of ``reply_tokens``
    tokens at ``tokens_per_s`` through the whole pipeline (agent, OpenAI
    client, SSE) from the fake OpenAI-compatible server
    (``bench.fake_openai``), run as a separate process so that its work does
    not share this process's GIL, as a real model endpoint would not.
    Meanwhile single keys are typed into the fourth pane's input, one every
    ``KEY_INTERVAL_S`` (a fast typist) on a fixed beat, for most of the time
    the streams last. A key is sent the way the terminal driver sends one
    (``Driver.process_message``), not with ``Pilot.press``: that waits for
    the whole process to go idle after every key, which never happens while
    three replies stream, so it would time the wait, not the app.

    Keystroke-to-screen is measured to the frame. ``App._display``, which the
    screen calls with every frame the compositor renders, is wrapped on the
    app instance; a key counts as on screen at the first frame that repainted
    the input's text row *and* shows there the typed text up to and
    including the new character. Headless Textual skips turning a frame into
    terminal bytes; a real terminal does not, so the wrapper does that too
    and the clock stops after it. The same keys are first typed with nothing
    streaming, for a baseline (``idle_keystroke_*``). Proof that the load was
    there: ``tokens_streamed`` (tokens the three replies showed on screen
    during the typing, i.e. words of their Markdown source, which is about
    ``tokens_per_s_shown`` x typing time), ``streaming_panes_busy_min`` (the
    fewest panes still streaming when any key was sent) and ``cpu_percent``
    (this process's CPU time over the typing, 100 = one core saturated).

``open_session``
    Three panes; the first user has a session of ``messages`` messages
    (seeded in one INSERT, not timed) and a newer empty one, which the pane
    opens with. The clock runs from asking the pane to show the long session
    (``UserPane.load_session``, what the session picker does) to the first
    frame that paints the text of the session's last message (a Markdown
    reply, so its blocks are parsed and mounted by then). The first open is
    ``first_paint_ms``; more opens, back to the empty session in between,
    give ``first_paint_warm_median_ms``. The first open splits into
    ``before_mount_ms`` (the pane's database reads, clearing the old view)
    and ``mount_to_paint_ms`` (mounting the first screenful of messages
    until the frame); ``page_mounted_ms`` is when the whole page of
    messages is mounted (the rest is mounted after the first paint).

``rss``
    A fresh process (``--rss-child``), so that nothing this process or the
    harness allocated before counts, opens the app with ``users`` panes, each
    user's session of ``messages_per_user`` messages loaded the way the app
    loads one (the last page mounted, older pages when scrolled up).
    ``rss_mb`` is that process's RSS then (psutil), ``rss_before_mb`` its RSS
    after importing everything, before the app started. The app allows at
    most ``tui.app.MAX_PANES`` (9) panes; the child raises that limit so that
    ten users fit. Then the first pane is scrolled back ``SCROLL_BACK_PAGES``
    pages (``UserPane.load_older``, what reaching the top does):
    ``scroll_back_page_ms`` per page, ``kb_per_mounted_message`` from the
    RSS growth, and ``rss_all_mounted_estimate_mb`` = RSS if every message of
    every pane were scrolled into view (an extrapolation; loading them all
    takes minutes). ``layout_frame_ms`` (before and after the scroll-back)
    is the median time to the frame after a message changes height, which
    each streamed line of a reply causes.

Timings are printed, never asserted. Users are ``tui_bench_*@example.com``,
deleted before and after each point.

Standalone: ``python -m bench.tui_responsiveness DSN [--quick]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from pydantic import SecretStr
from rich.console import RenderableType
from textual import events
from textual._compositor import ChopsUpdate, CompositorUpdate, LayoutUpdate
from textual.pilot import Pilot
from textual.screen import Screen

import tui.app as tui_app
from bench.harness import REPO, FakeModelProcess, ModelTiming, bench_settings, ms, percentile
from engine import scenarios
from engine.config import Settings
from engine.db import Database
from engine.store import Store
from tui.app import MemchatApp
from tui.widgets.messages import AssistantMessage, OlderMessages
from tui.widgets.pane import UserPane

SCREEN_SIZE = (200, 50)
KEY_INTERVAL_S = 0.04
TYPED_TEXT = "the quick brown fox jumps over the lazy dog "
KEY_PAINT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0
RSS_CHILD_TIMEOUT_S = 600.0
# Pages of older messages loaded into one pane for the scroll-back figures;
# every page makes each later one slower, so all 450 would take minutes.
SCROLL_BACK_PAGES = 4
LAYOUT_FRAMES = 5
MB = 1024 * 1024

Result = dict[str, object]


@dataclass(frozen=True, slots=True)
class Sizes:
    reply_tokens: int
    tokens_per_s: float
    keystrokes: int
    session_messages: int
    session_opens: int
    rss_users: int
    rss_messages_per_user: int


# The typing lasts keystrokes * KEY_INTERVAL_S, which must fit inside the
# streams (reply_tokens / tokens_per_s): 3.0 s of 4 s full size, 0.4 of 0.6 quick.
FULL = Sizes(
    reply_tokens=400,
    tokens_per_s=100,
    keystrokes=75,
    session_messages=2000,
    session_opens=5,
    rss_users=10,
    rss_messages_per_user=500,
)
QUICK = Sizes(
    reply_tokens=60,
    tokens_per_s=100,
    keystrokes=10,
    session_messages=100,
    session_opens=2,
    rss_users=2,
    rss_messages_per_user=120,
)


async def run(settings: Settings, *, quick: bool) -> list[dict[str, object]]:
    sizes = QUICK if quick else FULL
    return [
        await measure_keystrokes(settings, sizes),
        await measure_open_session(settings, sizes),
        await measure_rss(settings, sizes),
    ]


# -- frames ------------------------------------------------------------------


FrameCheck = Callable[[CompositorUpdate], bool]


class FrameClock:
    """Timestamps the frames the app paints, and tells waiters which frame showed what.

    It replaces ``App._display`` on the instance: every frame the compositor
    renders for the current screen goes through it.
    """

    def __init__(self, app: MemchatApp) -> None:
        self.app = app
        self.frames = 0
        self._waiters: list[tuple[FrameCheck, asyncio.Future[float]]] = []

    def install(self) -> None:
        self.app._display = self._display  # type: ignore[method-assign]

    def uninstall(self) -> None:
        # Removing the instance attribute brings back the class's method.
        with contextlib.suppress(AttributeError):
            del self.app._display

    def when(self, check: FrameCheck) -> asyncio.Future[float]:
        """The time of the first frame, from now on, for which ``check`` is true."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append((check, future))
        return future

    def _display(self, screen: Screen[Any], renderable: RenderableType | None) -> None:
        app = self.app
        type(app)._display(app, screen, renderable)
        # As in App._display: during a batch update nothing reaches the terminal.
        if app._batch_count or not isinstance(renderable, CompositorUpdate):
            return
        # What a real terminal costs on top of the headless driver: the bytes.
        renderable.render_segments(app.console)
        now = time.perf_counter()
        self.frames += 1
        waiting = []
        for check, future in self._waiters:
            if future.done():
                continue
            try:
                shown = check(renderable)
            except Exception as exc:  # a broken check must not break the app's painting
                future.set_exception(exc)
                continue
            if shown:
                future.set_result(now)
            else:
                waiting.append((check, future))
        self._waiters = waiting


def painted_row(update: CompositorUpdate, y: int, x0: int, x1: int) -> str | None:
    """Text this frame painted on screen row ``y`` around columns x0..x1; None if not repainted."""
    if isinstance(update, LayoutUpdate):
        index = y - update.region.y
        if not 0 <= index < len(update.strips):
            return None
        text = "".join(strip.text for strip in update.strips[index] if strip is not None)
        return text[x0 - update.region.x : x1 - update.region.x]
    if isinstance(update, ChopsUpdate):
        if not 0 <= y < len(update.chops):
            return None
        # A chop is a piece of the row between widget edges; unpainted ones are None.
        parts = [
            strip.text
            for x, strip in update.chops[y].items()
            if strip is not None and x < x1 and x + strip.cell_length > x0
        ]
        return "".join(parts) if parts else None
    return None


# -- keystrokes --------------------------------------------------------------


async def measure_keystrokes(settings: Settings, sizes: Sizes) -> Result:
    users = [f"tui_bench_key_{n}@example.com" for n in range(1, 5)]
    streaming = users[:3]
    await reset_users(settings, users)
    try:
        timing = ModelTiming(
            latency_ms=0, token_delay_ms=1000 / sizes.tokens_per_s, reply_tokens=sizes.reply_tokens
        )
        with FakeModelProcess(timing) as fake:
            base_url = fake.base_url
            model_settings = with_model(
                settings,
                provider="openai",
                base_url=base_url,
                api_key=SecretStr("x"),
                max_retries=0,
            )
            app = new_app(model_settings, users)
            async with app.run_test(size=SCREEN_SIZE) as pilot:
                figures = await _keystrokes_in(app, pilot, streaming, users[3], sizes)
    finally:
        await reset_users(settings, users)
    return {
        "scenario": "tui",
        "point": "keystrokes",
        "params": {
            "streaming_panes": len(streaming),
            "reply_tokens": sizes.reply_tokens,
            "tokens_per_s": sizes.tokens_per_s,
            "keystrokes": sizes.keystrokes,
            "key_interval_ms": KEY_INTERVAL_S * 1000,
        },
        "figures": figures,
        "targets": {"keystroke_p95_ms": ["<=", 50]},
    }


async def _keystrokes_in(
    app: MemchatApp, pilot: Pilot[None], streaming: list[str], typist: str, sizes: Sizes
) -> dict[str, object]:
    await wait_ready(app)
    panes = [pane_of(app, user) for user in streaming]
    typing_pane = pane_of(app, typist)
    typing_pane.focus_input()
    await pilot.pause()
    clock = FrameClock(app)
    clock.install()
    try:
        idle, _ = await type_keys(app, clock, typing_pane, sizes.keystrokes, [])
        typing_pane.input.value = ""
        await pilot.pause()

        for pane in panes:
            if pane.send(f"Please write a long answer, {pane.user_id}.") is None:
                raise RuntimeError(f"the pane of {pane.user_id} refused to send")
        # Type only once every stream is showing tokens: the load is on.
        await wait_until(lambda: all(reply_words(p) > 0 for p in panes), within=30)
        words_before = sum(reply_words(p) for p in panes)
        started, cpu_started = time.perf_counter(), time.process_time()
        loaded, busy_min = await type_keys(app, clock, typing_pane, sizes.keystrokes, panes)
        typed_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        tokens_streamed = sum(reply_words(p) for p in panes) - words_before

        turns = [w for w in app.workers if w.group == "turn"]
        if turns:  # an empty list would wait for every worker, the endless ones too
            await app.workers.wait_for_complete(turns)
        complete = sum(reply_words(p) == sizes.reply_tokens for p in panes)
        # Each reply queued a memory job. A pane that hears of its job while
        # the app is closing fails (it looks up its removed sidebar), so the
        # jobs settle, and their NOTIFYs arrive, while the app is still up.
        assert app.runtime is not None
        await app.runtime.dispatcher.wait_idle(streaming, within=60)
        await settle(pilot)
        await asyncio.sleep(0.3)
    finally:
        clock.uninstall()
    return {
        "keystroke_p50_ms": ms(percentile(loaded, 50)),
        "keystroke_p95_ms": ms(percentile(loaded, 95)),
        "keystroke_max_ms": ms(max(loaded)),
        "keystrokes": len(loaded),
        "tokens_streamed": tokens_streamed,
        "tokens_per_s_shown": round(tokens_streamed / typed_s, 1),
        "streaming_panes_busy_min": busy_min,
        "cpu_percent": round(100 * cpu_s / typed_s),
        "replies_complete": complete,
        "idle_keystroke_p50_ms": ms(percentile(idle, 50)),
        "idle_keystroke_p95_ms": ms(percentile(idle, 95)),
        "frames": clock.frames,
    }


async def type_keys(
    app: MemchatApp, clock: FrameClock, pane: UserPane, count: int, streaming: list[UserPane]
) -> tuple[list[float], int]:
    """Type ``count`` keys on a fixed beat; each key's send-to-frame latency in seconds.

    Keys go out on schedule whether or not the previous one is on screen yet,
    as a typist's do, so a slow frame delays the next key's paint too and
    shows up in both. Also returns the fewest ``streaming`` panes busy at a send.
    """
    driver = app._driver
    assert driver is not None
    content = pane.input.content_region
    row, x0, x1 = content.y, content.x, content.right
    start = time.perf_counter()
    pending: list[tuple[float, asyncio.Future[float]]] = []
    busy_min = len(streaming)
    expected = pane.input.value
    for index in range(count):
        due = start + index * KEY_INTERVAL_S
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        char = TYPED_TEXT[index % len(TYPED_TEXT)]
        expected += char
        # The row shows the end of the text (the cursor is there). The
        # characters before the new one are part of the check so that a typed
        # space cannot match the blank after the old text.
        tail = expected[-12:]
        busy_min = min(busy_min, sum(p.busy for p in streaming))

        def tail_shown(update: CompositorUpdate, tail: str = tail) -> bool:
            return tail in (painted_row(update, row, x0, x1) or "")

        shown = clock.when(tail_shown)
        sent = time.perf_counter()
        driver.process_message(key_event(char))
        pending.append((sent, shown))
    latencies = []
    for sent, shown in pending:
        try:
            painted = await asyncio.wait_for(shown, KEY_PAINT_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"a keystroke was not painted within {KEY_PAINT_TIMEOUT_S:g}s "
                f"(input holds {pane.input.value!r})"
            ) from None
        latencies.append(painted - sent)
    if pane.input.value != expected:
        raise RuntimeError(f"typed {expected!r} but the input holds {pane.input.value!r}")
    return latencies, busy_min


def key_event(char: str) -> events.Key:
    # What the terminal driver produces for a printable key.
    return events.Key("space" if char == " " else char, char)


def reply_words(pane: UserPane) -> int:
    replies = list(pane.query(AssistantMessage))
    return len(replies[-1].source.split()) if replies else 0


# -- opening a long session --------------------------------------------------


async def measure_open_session(settings: Settings, sizes: Sizes) -> Result:
    users = [f"tui_bench_open_{n}@example.com" for n in range(1, 4)]
    owner = users[0]
    await reset_users(settings, users)
    try:
        async with open_store(settings) as store:
            long_id, last_id = await seed_session(store, owner, sizes.session_messages)
            async with store.scope(owner) as s:
                # Newer, so the pane opens on it and the long one is a switch away.
                empty_id = (await s.create_session("empty")).session_id
        app = new_app(with_model(settings, provider="offline"), users)
        async with app.run_test(size=SCREEN_SIZE) as pilot:
            figures = await _open_in(app, pilot, owner, long_id, empty_id, last_id, sizes)
    finally:
        await reset_users(settings, users)
    return {
        "scenario": "tui",
        "point": "open_session",
        "params": {"messages": sizes.session_messages, "panes": len(users)},
        "figures": figures,
        "targets": {"first_paint_ms": ["<=", 300]},
    }


async def _open_in(
    app: MemchatApp,
    pilot: Pilot[None],
    owner: str,
    long_id: uuid.UUID,
    empty_id: uuid.UUID,
    last_id: int,
    sizes: Sizes,
) -> dict[str, object]:
    await wait_ready(app)
    pane = pane_of(app, owner)
    if pane.session is None or pane.session.session_id != empty_id:
        raise RuntimeError("the pane did not open on the newest (empty) session")
    messages = pane.messages
    marks: dict[str, float] = {}
    original_mount_all = messages.mount_all

    def timed_mount_all(*args: Any, **kwargs: Any) -> Any:
        # The pane mounts a screenful, paints, then the rest of the page:
        # from the first mount's start to the last mount's end.
        marks.setdefault("mount_start", time.perf_counter())
        mounting = original_mount_all(*args, **kwargs)

        async def finished() -> None:
            await mounting
            marks["mount_end"] = time.perf_counter()

        return finished()

    marker = message_marker(sizes.session_messages)

    def last_message_painted(update: CompositorUpdate) -> bool:
        children = messages.children
        last = children[-1] if children else None
        if last is None or getattr(last, "message_id", None) != last_id:
            return False
        placement = app.screen._compositor.visible_widgets.get(last)
        if placement is None:
            return False
        region, clip = placement
        shown = region.intersection(clip)
        return any(
            marker in (painted_row(update, y, shown.x, shown.right) or "")
            for y in range(shown.y, shown.bottom)
        )

    clock = FrameClock(app)
    clock.install()
    messages.mount_all = timed_mount_all  # type: ignore[method-assign]
    opens: list[float] = []
    split: dict[str, float] = {}
    try:
        for number in range(sizes.session_opens):
            await settle(pilot)
            marks.clear()
            painted = clock.when(last_message_painted)
            pane.ready.clear()
            started = time.perf_counter()
            pane.load_session(long_id)
            try:
                opens.append(await asyncio.wait_for(painted, 30) - started)
            except TimeoutError:
                raise RuntimeError("the long session's last message never appeared") from None
            await pane.ready.wait()
            if number == 0:
                split = {
                    "before_mount_ms": ms(marks["mount_start"] - started),
                    "mount_to_paint_ms": ms(opens[0] + started - marks["mount_start"]),
                    "page_mounted_ms": ms(marks["mount_end"] - started),
                }
            mounted = len(messages.query(".message"))
            pane.ready.clear()
            pane.load_session(empty_id)
            await pane.ready.wait()
    finally:
        del messages.mount_all
        clock.uninstall()
    return {
        "first_paint_ms": ms(opens[0]),
        "first_paint_warm_median_ms": ms(statistics.median(opens[1:] or opens)),
        "first_paint_max_ms": ms(max(opens)),
        "opens": len(opens),
        "messages_mounted": mounted,
        **split,
    }


async def settle(pilot: Pilot[None]) -> None:
    """Let the app finish what it was doing, so a timing starts from quiet."""
    await pilot.pause()
    await asyncio.sleep(0.1)


def message_marker(number: int) -> str:
    # Zero-padded, so that no message's marker is a prefix of another's.
    return f"msg-{number:05d}"


def seeded_messages(count: int) -> list[tuple[str, str]]:
    """A plausible conversation: short questions, Markdown replies of a paragraph or few.

    Messages alternate user/assistant; each ends with its ``message_marker``
    so that a frame can be checked for it.
    """
    rows: list[tuple[str, str]] = []
    for number in range(1, count + 1):
        marker = message_marker(number)
        if number % 2:
            rows.append(
                ("user", f"Question {number}: what do you think about item {number}? {marker}")
            )
            continue
        parts = [
            f"Here is what I think about item {number - 1}. It depends on what you want "
            "from it: the short answer is that it works well for most everyday cases, "
            "and the longer answer has a few details worth knowing before you decide."
        ]
        if number % 4 == 0:
            parts.append(
                "- it is simple to set up\n- it keeps working when you are offline\n"
                "- it costs **nothing** to try"
            )
        if number % 10 == 0:
            parts.append(f"```python\nitems = load({number})\nprint(len(items))\n```")
        parts.append(f"Tell me if you want me to go deeper into any of that. {marker}")
        rows.append(("assistant", "\n\n".join(parts)))
    return rows


async def seed_session(store: Store, user_id: str, count: int) -> tuple[uuid.UUID, int]:
    """One session with ``count`` messages, in one INSERT; its id and its last message's id."""
    rows = seeded_messages(count)
    async with store.scope(user_id) as s:
        session = await s.create_session(f"{count} messages")
        last_id = await s.conn.fetchval(
            """
            WITH added AS (
                INSERT INTO messages (session_id, user_id, role, content)
                SELECT $1, $2, t.role, t.content
                  FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS t(role, content, n)
                 ORDER BY t.n
                RETURNING message_id
            )
            SELECT max(message_id) FROM added
            """,
            session.session_id,
            user_id,
            [role for role, _ in rows],
            [content for _, content in rows],
        )
    return session.session_id, last_id


# -- memory ------------------------------------------------------------------


async def measure_rss(settings: Settings, sizes: Sizes) -> Result:
    users = [f"tui_bench_rss_{n}@example.com" for n in range(1, sizes.rss_users + 1)]
    await reset_users(settings, users)
    try:
        async with open_store(settings) as store:
            for user in users:
                await seed_session(store, user, sizes.rss_messages_per_user)
        figures = await run_rss_child(with_model(settings, provider="offline"), users)
    finally:
        await reset_users(settings, users)
    return {
        "scenario": "tui",
        "point": "rss",
        "params": {"users": len(users), "messages_per_user": sizes.rss_messages_per_user},
        "figures": figures,
        "targets": {"rss_mb": ["<=", 300]},
    }


async def run_rss_child(settings: Settings, users: list[str]) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.tui_responsiveness",
        "--rss-child",
        ",".join(users),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(pickle.dumps(settings)), RSS_CHILD_TIMEOUT_S
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the RSS child took over {RSS_CHILD_TIMEOUT_S:g}s") from None
    for line in reversed(out.decode().splitlines()):
        if line.startswith("RSS "):
            figures: dict[str, object] = json.loads(line.removeprefix("RSS "))
            return figures
    raise RuntimeError(f"the RSS child failed (exit {process.returncode}): {err.decode()[-2000:]}")


async def rss_child(settings: Settings, users: list[str]) -> dict[str, object]:
    """In the child process: open every pane, then scroll the first one back a few pages."""
    before = rss_mb()
    # The app refuses a tenth pane; the issue asks for ten users side by side.
    tui_app.MAX_PANES = max(tui_app.MAX_PANES, len(users))
    app = new_app(settings, users)
    async with app.run_test(size=SCREEN_SIZE) as pilot:
        await wait_ready(app)
        await replies_rendered(app, pilot)
        opened = rss_mb()
        mounted_opened = len(app.query(".message"))
        clock = FrameClock(app)
        clock.install()
        try:
            layout_opened = await layout_frame(app, pilot, clock)
            pane = app.panes[0]
            marker = pane.messages.query_one(OlderMessages)
            pages = 0
            started = time.perf_counter()
            while pages < SCROLL_BACK_PAGES and marker.count > 0:
                await pane.load_older()
                pages += 1
            await replies_rendered(app, pilot)
            scrolled_s = time.perf_counter() - started
            scrolled = rss_mb()
            layout_scrolled = await layout_frame(app, pilot, clock)
        finally:
            clock.uninstall()
        mounted = len(app.query(".message"))
        unmounted = sum(p.messages.query_one(OlderMessages).count for p in app.panes)
        panes = len(app.panes)
    added = mounted - mounted_opened
    per_message_mb = (scrolled - opened) / added if added else 0.0
    return {
        "rss_mb": round(opened, 1),
        "rss_before_mb": round(before, 1),
        "panes": panes,
        "messages_mounted": mounted_opened,
        "layout_frame_ms": ms(layout_opened),
        "scrolled_back_messages_mounted": mounted,
        "rss_scrolled_back_mb": round(scrolled, 1),
        "scroll_back_pages": pages,
        "scroll_back_page_ms": ms(scrolled_s / pages) if pages else None,
        "kb_per_mounted_message": round(per_message_mb * 1024, 1),
        "rss_all_mounted_estimate_mb": round(scrolled + unmounted * per_message_mb, 1),
        "scrolled_back_layout_frame_ms": ms(layout_scrolled),
        "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def replies_rendered(app: MemchatApp, pilot: Pilot[None]) -> None:
    """Every reply's Markdown blocks are mounted and the screen has caught up."""
    await wait_until(
        lambda: all(reply.children or not reply.source for reply in app.query(AssistantMessage)),
        within=300,
    )
    await pilot.pause()


async def layout_frame(app: MemchatApp, pilot: Pilot[None], clock: FrameClock) -> float:
    """Seconds to the frame after the first pane's last message changes height (median).

    That is what each streamed line of a reply causes: a reflow, which
    places every mounted widget of every pane, visible or not.
    """
    frames = []
    for _ in range(LAYOUT_FRAMES):
        await pilot.pause()
        last = app.panes[0].messages.children[-1]
        painted = clock.when(lambda _update: True)
        started = time.perf_counter()
        last.refresh(layout=True)
        frames.append(await asyncio.wait_for(painted, 60) - started)
    return statistics.median(frames)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


# -- shared ------------------------------------------------------------------


def new_app(settings: Settings, users: list[str]) -> MemchatApp:
    # As the Pilot tests build it: no animation, no highlight timers.
    return MemchatApp(settings, users, animate=False, highlight_seconds=0, demo_char_delay=0)


def with_model(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"model": settings.model.model_copy(update=changes)})


async def wait_ready(app: MemchatApp) -> None:
    try:
        await asyncio.wait_for(app.ready.wait(), STARTUP_TIMEOUT_S)
    except TimeoutError:
        status = app.query_one(tui_app.StatusBar).render()
        raise RuntimeError(f"the app did not start: {status}") from None


def pane_of(app: MemchatApp, user_id: str) -> UserPane:
    pane = app.pane_of(user_id)
    if pane is None:
        raise RuntimeError(f"no pane for {user_id}")
    return pane


async def wait_until(condition: Callable[[], bool], *, within: float) -> None:
    deadline = time.perf_counter() + within
    while not condition():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"condition not met within {within:g}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    db = await Database.open(settings)
    try:
        yield Store(db, settings.limits)
    finally:
        await db.close()


async def reset_users(settings: Settings, user_ids: Sequence[str]) -> None:
    async with open_store(settings) as store:
        await scenarios.reset_users(store, user_ids)


# -- standalone --------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--rss-child"]:
        settings = pickle.loads(sys.stdin.buffer.read())
        figures = asyncio.run(rss_child(settings, argv[1].split(",")))
        print("RSS " + json.dumps(figures), flush=True)
        return 0
    if not argv or argv[0].startswith("-"):
        print("usage: python -m bench.tui_responsiveness DSN [--quick]", file=sys.stderr)
        return 2
    settings = bench_settings(argv[0], model={"provider": "offline"})
    for result in asyncio.run(run(settings, quick="--quick" in argv[1:])):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
