"""Live change events: PostgreSQL LISTEN/NOTIFY relayed to in-process subscribers.

The store and the job queue ``pg_notify`` on every memory change and job state
change, and a trigger on every message written or replaced (migration 0008),
so any process sharing the database (another TUI, the CLI, a headless
worker) can react within a fraction of a second. ``EventHub`` holds one
dedicated LISTEN connection per process and fans each notification out to
subscribers, each with its own bounded queue::

    hub = EventHub(db)
    await hub.start()
    async with hub.subscribe("alice") as events:
        async for event in events:
            match event:
                case MemoryChanged() | Resync():
                    ...  # re-read alice's memories through the scoped store

Events carry ids only; the hub never reads rows. A subscriber that needs the
data re-reads it through ``Store.scope(user_id)``, where row-level security
applies. ``Resync`` means changes may have been missed (the connection was
lost, or the subscriber fell behind): re-read everything it shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeGuard, get_args

import asyncpg

from engine.db import Database
from engine.db.database import SingleUserRefusal
from engine.errors import DatabaseError
from engine.queue import JOB_CHANNEL
from engine.records import JOB_STATUSES, MEMORY_OPS, JobStatus, MemoryOp
from engine.store import MEMORY_CHANNEL, MESSAGE_CHANNEL
from engine.text import reason_of
from engine.validation import validate_user_id

log = logging.getLogger(__name__)

__all__ = [
    "EngineEvent",
    "EventHub",
    "JobChanged",
    "MemoryChanged",
    "MessageChanged",
    "Resync",
    "Subscription",
]


@dataclass(frozen=True, slots=True)
class MemoryChanged:
    user_id: str
    memory_id: uuid.UUID | None
    op: MemoryOp
    """"add", "update" or "delete"."""
    event_id: int | None
    """The ``memory_events`` row that records the change, when the sender gave one."""


@dataclass(frozen=True, slots=True)
class JobChanged:
    user_id: str
    job_id: int
    state: JobStatus
    """"pending", "running", "done" or "failed"."""


MessageOp = Literal["insert", "update", "delete"]
MESSAGE_OPS: tuple[MessageOp, ...] = get_args(MessageOp)


@dataclass(frozen=True, slots=True)
class MessageChanged:
    """A message of this session was written, or a reply replaced (deleted)."""

    user_id: str
    session_id: uuid.UUID
    message_id: int
    op: MessageOp


@dataclass(frozen=True, slots=True)
class Resync:
    """The listener reconnected (or a subscriber's queue overflowed): changes may
    have been missed; re-read state."""


EngineEvent = MemoryChanged | JobChanged | MessageChanged | Resync

_RESYNC = Resync()
# Longest payload excerpt put in a debug line: payloads are small, but a
# foreign sender on our channel could send up to 8000 bytes.
_LOGGED_PAYLOAD_CHARS = 200


class Subscription:
    """One subscriber's stream of events: an async iterator and a context manager.

    Registered with the hub as soon as it is created, so nothing committed after
    ``subscribe()`` returns is missed even before ``async with`` is entered.
    One consumer per subscription; iteration ends on ``close()`` (or leaving the
    ``async with``) and when the hub closes.
    """

    __slots__ = ("_closed", "_hub", "_queue", "user_id")

    def __init__(self, hub: EventHub, user_id: str | None, queue_size: int) -> None:
        self._hub = hub
        self.user_id = user_id
        """The user whose events this receives; None for every user's."""
        # None is the end-of-stream marker, so a consumer blocked in get() wakes up.
        self._queue: asyncio.Queue[EngineEvent | None] = asyncio.Queue(queue_size)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unsubscribe; a consumer waiting for the next event stops iterating."""
        if self._closed:
            return
        self._hub._unsubscribe(self)
        self._end()

    def get_nowait(self) -> EngineEvent | None:
        """The next queued event, or None when there is none (for polling UIs)."""
        if self._closed:
            return None
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EngineEvent:
        if self._closed:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            # Leave the marker for anyone else waiting on this subscription.
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return event

    def _deliver(self, event: EngineEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Waiting for room would stall the listener and every other
            # subscriber; silently dropping would leave this one showing stale
            # state. Replacing the backlog with one Resync makes it re-read.
            dropped = self._drain()
            self._queue.put_nowait(_RESYNC)
            log.debug(
                "subscriber for %s fell behind: dropped %d events, sent Resync",
                self.user_id or "all users",
                dropped,
            )

    def _end(self) -> None:
        self._closed = True
        if self._queue.full():
            self._drain()
        self._queue.put_nowait(None)

    def _drain(self) -> int:
        dropped = 0
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return dropped
            dropped += 1


class EventHub:
    """One LISTEN connection per process, fanned out to any number of subscribers.

    ``start()`` connects (and fails with ``DatabaseError`` if it cannot); from
    then on a lost connection is detected (termination callback, plus a
    periodic ``SELECT 1`` for connections that die silently) and re-opened
    with exponential backoff until ``close()``. Notifications sent while
    disconnected are lost, so every subscriber gets ``Resync`` on reconnect.
    """

    def __init__(
        self,
        db: Database,
        *,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
        queue_size: int = 1000,
        health_check_interval: float = 5.0,
        health_check_timeout: float = 3.0,
    ) -> None:
        if reconnect_delay <= 0 or max_reconnect_delay < reconnect_delay:
            raise ValueError("need 0 < reconnect_delay <= max_reconnect_delay")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if health_check_interval <= 0 or health_check_timeout <= 0:
            raise ValueError("health check interval and timeout must be positive")
        self._db = db
        # A single-user process's hub delivers that user's events only.
        self._only_user: str | None = getattr(db, "only_user", None)
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._queue_size = queue_size
        self._health_interval = health_check_interval
        self._health_timeout = health_check_timeout
        self._by_user: dict[str, set[Subscription]] = {}
        self._everyone: set[Subscription] = set()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._closed = False
        self._parsers: dict[str, Callable[[dict[str, Any]], EngineEvent | None]] = {
            MEMORY_CHANNEL: _memory_changed,
            JOB_CHANNEL: _job_changed,
            MESSAGE_CHANNEL: _message_changed,
        }

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up (False while reconnecting)."""
        return self._connected

    async def start(self) -> None:
        """Open the LISTEN connection; raises DatabaseError if it cannot."""
        if self._closed:
            raise RuntimeError("this EventHub is closed")
        if self._task is not None:
            return
        try:
            conn, lost = await self._open()
        except DatabaseError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise DatabaseError(f"cannot listen for changes: {reason_of(exc)}") from None
        if self._closed or self._task is not None:
            # close() (or another start()) ran while this one was connecting.
            conn.terminate()
            return
        self._conn = conn
        self._connected = True
        self._task = asyncio.create_task(self._supervise(conn, lost), name="memchat-events")
        self._task.add_done_callback(self._supervisor_ended)

    async def close(self) -> None:
        """Stop listening and end every subscription. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._connected = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than awaiting the task: its CancelledError is not ours.
            await asyncio.wait({task})
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self._health_timeout)
            except Exception:
                conn.terminate()
        for sub in self._subscribers():
            sub._end()
        self._by_user.clear()
        self._everyone.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def subscribe(
        self, user_id: str | None = None, *, queue_size: int | None = None
    ) -> Subscription:
        """Events of ``user_id`` (None: of every user), from now on.

        ``queue_size`` overrides the hub's default bound for this subscriber.
        Raises InvalidInput for a malformed user id. Works before ``start()``;
        after ``close()`` the subscription is already ended.
        """
        if user_id is not None:
            # The same normalisation the store applies, so " alice" finds "alice".
            user_id = validate_user_id(user_id)
        only_user = self._only_user
        if only_user is not None and user_id not in (None, only_user):
            raise SingleUserRefusal("this process serves one user only: another user's events")
        size = self._queue_size if queue_size is None else queue_size
        if size < 1:
            raise ValueError("queue_size must be at least 1")
        sub = Subscription(self, user_id, size)
        if self._closed:
            sub._end()
        elif user_id is None:
            self._everyone.add(sub)
        else:
            self._by_user.setdefault(user_id, set()).add(sub)
        return sub

    def publish(self, event: EngineEvent) -> None:
        """Deliver an event to this process's subscribers, without the database.

        A ``Resync`` goes to everyone; other events to their user's subscribers
        and the all-users ones. Other processes do not see it.
        """
        if not self._closed:
            self._route(event)

    # -- internals ---------------------------------------------------------

    def _subscribers(self) -> Iterator[Subscription]:
        yield from self._everyone
        for subs in self._by_user.values():
            yield from subs

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub.user_id is None:
            self._everyone.discard(sub)
            return
        subs = self._by_user.get(sub.user_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_user[sub.user_id]

    def _route(self, event: EngineEvent) -> None:
        if isinstance(event, Resync):
            for sub in list(self._subscribers()):
                sub._deliver(event)
            return
        if self._only_user is not None and event.user_id != self._only_user:
            return  # a single-user process hears of its own user only
        subs = self._by_user.get(event.user_id)
        if subs:
            for sub in subs:
                sub._deliver(event)
        for sub in self._everyone:
            sub._deliver(event)

    def _on_notification(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        # asyncpg hands the payload over as str; its listener type says object.
        parse = self._parsers.get(channel)
        if parse is None or not isinstance(payload, str):
            return
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            # RecursionError: a payload of nothing but deeply nested brackets.
            data = None
        event = parse(data) if isinstance(data, dict) else None
        if event is None:
            log.debug(
                "ignored a malformed notification on %s: %r",
                channel,
                payload[:_LOGGED_PAYLOAD_CHARS],
            )
            return
        self._route(event)

    async def _open(self) -> tuple[asyncpg.Connection, asyncio.Event]:
        conn = await self._db.connect_dedicated()
        lost = asyncio.Event()
        try:
            # Registered before LISTEN, so a drop during LISTEN is noticed too.
            conn.add_termination_listener(lambda _conn: lost.set())
            async with asyncio.timeout(self._health_timeout):
                await conn.add_listener(MEMORY_CHANNEL, self._on_notification)
                await conn.add_listener(JOB_CHANNEL, self._on_notification)
                await conn.add_listener(MESSAGE_CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn, lost

    async def _supervise(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        while True:
            reason = await self._watch(conn, lost)
            self._connected = False
            self._conn = None
            conn.terminate()
            log.warning("lost the LISTEN connection (%s); reconnecting", reason)
            attempts = 0
            for delay in backoff(self._reconnect_delay, self._max_reconnect_delay):
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    conn, lost = await self._open()
                except Exception as exc:
                    log.debug("LISTEN reconnect attempt %d failed: %s", attempts, reason_of(exc))
                    continue
                break
            self._conn = conn
            self._connected = True
            log.info(
                "LISTEN connection is back (after %d attempt%s); subscribers resync",
                attempts,
                "" if attempts == 1 else "s",
            )
            self._route(_RESYNC)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> str:
        """Return (with the reason) once the connection is gone."""
        while True:
            try:
                async with asyncio.timeout(self._health_interval):
                    await lost.wait()
                return "the connection was closed"
            except TimeoutError:
                pass
            # A connection whose peer vanished (network cut, host gone) can sit
            # idle for a long time without the termination callback firing.
            try:
                async with asyncio.timeout(self._health_timeout):
                    await conn.fetchval("SELECT 1")
            except TimeoutError:
                return f"no answer to a health check within {self._health_timeout:g}s"
            except Exception as exc:
                return f"health check failed: {reason_of(exc)}"

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._connected = False
            log.error("the LISTEN supervisor stopped", exc_info=exc)


def backoff(first: float, limit: float) -> Iterator[float]:
    """Delays before successive reconnect attempts: doubling from first, capped at limit."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, limit)


def _memory_changed(data: dict[str, Any]) -> MemoryChanged | None:
    user_id = data.get("user_id")
    op = data.get("op")
    if not isinstance(user_id, str) or not user_id or op not in MEMORY_OPS:
        return None
    raw_id = data.get("memory_id")
    if raw_id is None:
        memory_id = None
    elif isinstance(raw_id, str):
        try:
            memory_id = uuid.UUID(raw_id)
        except ValueError:
            return None
    else:
        return None
    event_id = data.get("event_id")
    if event_id is not None and not _is_int(event_id):
        return None
    return MemoryChanged(user_id, memory_id, op, event_id)


def _job_changed(data: dict[str, Any]) -> JobChanged | None:
    user_id = data.get("user_id")
    job_id = data.get("job_id")
    state = data.get("state")
    if (
        not isinstance(user_id, str)
        or not user_id
        or not _is_int(job_id)
        or state not in JOB_STATUSES
    ):
        return None
    return JobChanged(user_id, job_id, state)


def _message_changed(data: dict[str, Any]) -> MessageChanged | None:
    user_id = data.get("user_id")
    message_id = data.get("message_id")
    op = data.get("op")
    raw_session = data.get("session_id")
    if (
        not isinstance(user_id, str)
        or not user_id
        or not _is_int(message_id)
        or op not in MESSAGE_OPS
        or not isinstance(raw_session, str)
    ):
        return None
    try:
        session_id = uuid.UUID(raw_session)
    except ValueError:
        return None
    return MessageChanged(user_id, session_id, message_id, op)


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as bool, which is an int subclass.
    return isinstance(value, int) and not isinstance(value, bool)
