"""The connection pools and the three ways into the data: per user, admin, queue.

``scoped(user_id)`` is a transaction in which PostgreSQL's row-level security
shows and accepts that user's rows only (``unscoped()`` is the same app login
in no user's scope: it sees no rows, which audits check). ``admin()`` is a
read-only transaction across users. ``queue()`` is the job dispatcher's way
to the queue functions. Each of the three is a pool of its own that logs in
as a role of its own (engine/db/roles.py): the app pool as a role that cannot
bypass row-level security and has nothing to ``RESET ROLE`` back to, the
admin pool as a SELECT-only role, the queue pool as a role that may only call
the queue functions. The owner is used for migrations only.

Outside engine/db, only engine/queue.py (the job queue) and engine/admin.py
(every cross-user read) call ``unscoped()``, ``admin()`` or ``queue()``;
tests/engine/test_architecture.py holds them to that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import asyncpg
from asyncpg.connection import LoggedQuery

from engine.config import DatabaseSettings, Settings
from engine.db.credentials import (
    CREDENTIALS_FILE,
    external_credentials_path,
    load_credentials,
)
from engine.db.dsn import check_dsn, redact_dsn, with_database, with_login
from engine.db.embedded import DATABASE_NAME, EmbeddedServer, start_embedded
from engine.db.migrate import migrate
from engine.db.roles import KINDS, RoleNames, role_names
from engine.db.vector_index import index_vectors
from engine.errors import DatabaseError, MemchatError
from engine.text import reason_of
from engine.validation import validate_user_id

log = logging.getLogger(__name__)

QueryLogger = Callable[[LoggedQuery], None]

# Errors that mean "the server or the connection is gone", as opposed to a
# statement the server refused.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A backend killed between commit and the pool's reset on release.
    asyncpg.exceptions.InternalClientError,
)


class SingleUserRefusal(MemchatError):
    """What a single-user process (a `memchat serve` user tab) may not do."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    embedded: bool
    location: str
    """The data dir for the embedded server, the redacted DSN otherwise."""
    server_version: str
    roles: RoleNames
    """The login roles of the app, admin and queue pools."""
    socket_dir: str | None = None
    """The embedded server's socket directory."""

    @property
    def label(self) -> str:
        if self.embedded:
            return f"embedded PostgreSQL {self.server_version}"
        host = urlsplit(self.location).hostname or "local socket"
        return f"PostgreSQL {self.server_version} at {host}"


class Database:
    def __init__(
        self,
        pools: dict[str, asyncpg.Pool],
        info: DatabaseInfo,
        embedded: EmbeddedServer | None,
        dsns: dict[str, str],
        settings: Settings,
        query_loggers: list[QueryLogger] | None = None,
        only_user: str | None = None,
    ) -> None:
        self.pool = pools["app"]
        # A single-user process opens the app pool only: no login here can
        # read across users or touch the queue (engine/web, docs/security.md).
        self._admin_pool = pools.get("admin")
        self._queue_pool = pools.get("worker")
        self.only_user = only_user
        """Set: the one user this process may scope to (`memchat serve`'s user tabs)."""
        self._query_loggers = query_loggers if query_loggers is not None else []
        self.info = info
        self._embedded = embedded
        self._dsn = dsns["app"]
        self._settings = settings.database

    @property
    def roles(self) -> RoleNames:
        return self.info.roles

    async def add_query_logger(self, callback: QueryLogger) -> None:
        """Call ``callback`` with every statement the pool runs from now on (counts, tracing).

        Connections open now are replaced as they are next released, so the
        callback sees all of their statements from then on.
        """
        self._query_loggers.append(callback)
        for pool in self._pools():
            await pool.expire_connections()

    def _pools(self) -> list[asyncpg.Pool]:
        return [p for p in (self.pool, self._admin_pool, self._queue_pool) if p is not None]

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A connection outside the pool (for LISTEN), as the app login.

        The caller owns it and must close it. It is not scoped to any user:
        use it for LISTEN only, never to read rows.
        """
        try:
            return await asyncpg.connect(
                self._dsn,
                timeout=self._settings.connect_timeout,
                server_settings={"application_name": "memchat-listen"},
            )
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(
                f"cannot connect to {self.info.location}: {reason_of(exc)}"
            ) from None

    @classmethod
    async def open(cls, settings: Settings, *, only_user: str | None = None) -> Database:
        """Start the embedded server if needed, migrate, and open the pools.

        ``only_user``: a single-user process. Only the app pool is opened,
        ``scoped()`` accepts that user alone, and ``admin()``, ``queue()`` and
        ``unscoped()`` raise :class:`SingleUserRefusal`.
        """
        if only_user is not None:
            only_user = validate_user_id(only_user)
        db_settings = settings.database
        if db_settings.url is not None:
            url = db_settings.url.get_secret_value()
            check_dsn(url)  # one line for a DSN the driver would misread, not its traceback
            return await cls._open_at(url, settings, None, only_user)
        embedded = await asyncio.to_thread(start_embedded, settings.data_dir())
        try:
            await _ensure_database(embedded, db_settings.connect_timeout)
            dsn = with_database(embedded.dsn, DATABASE_NAME)
            return await cls._open_at(dsn, settings, embedded, only_user)
        except BaseException:
            await asyncio.to_thread(embedded.release)
            raise

    @classmethod
    async def _open_at(
        cls,
        dsn: str,
        settings: Settings,
        embedded: EmbeddedServer | None,
        only_user: str | None = None,
    ) -> Database:
        db_settings = settings.database
        shown = redact_dsn(dsn)
        given_urls = {
            kind: url.get_secret_value()
            for kind in KINDS
            if (url := getattr(db_settings, f"{kind}_url")) is not None
        }
        given = {kind: _login_name(url, kind) for kind, url in given_urls.items()}
        if embedded is not None:
            credentials_path = embedded.data_dir / CREDENTIALS_FILE
        else:
            credentials_path = external_credentials_path(settings.user_data_dir(), dsn)
        credentials = load_credentials(credentials_path)
        try:
            owner = await asyncpg.connect(dsn, timeout=db_settings.connect_timeout)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"cannot connect to {shown}: {reason_of(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"cannot connect to {shown}: {exc}") from None
        try:
            if str(await owner.fetchval("SELECT current_user")) in given.values():
                raise DatabaseError(
                    "database.url must be the owner (for migrations), not one of "
                    "database.app_url / admin_url / worker_url"
                )
            applied = await migrate(owner, given=given, credentials=credentials)
            if applied:
                log.info("applied migrations %s", applied)
            await index_vectors(owner, settings.memory.embeddings_model)
            version = str(await owner.fetchval("SHOW server_version")).split()[0]
            database = str(await owner.fetchval("SELECT current_database()"))
        finally:
            await owner.close()
        names = role_names(database, given)
        dsns = {
            kind: given_urls.get(kind)
            or with_login(dsn, names.of(kind), credentials.password(names.of(kind)) or "")
            for kind in KINDS
        }
        query_loggers: list[QueryLogger] = []

        async def init(conn: asyncpg.Connection) -> None:
            for callback in query_loggers:
                conn.add_query_logger(callback)

        # The three logins in parallel: each is a SCRAM exchange and a round trip or two.
        openers = {
            "app": cls._pool(
                dsns["app"],
                db_settings,
                min_size=min(db_settings.pool_min_size, db_settings.pool_max_size),
                max_size=db_settings.pool_max_size,
                name="memchat",
                init=init,
            ),
        }
        if only_user is None:
            # The admin and queue paths are used a few times a second at most.
            openers["admin"] = cls._pool(
                dsns["admin"],
                db_settings,
                min_size=0,
                max_size=2,
                name="memchat-admin",
                init=init,
                # Two connections run the same few statements all the time (e.g. the
                # open-job count wait_idle polls), so PostgreSQL would soon switch them
                # to generic plans; for `user_id = ANY($1)` that plan reads every job.
                settings={"plan_cache_mode": "force_custom_plan"},
            )
            openers["worker"] = cls._pool(
                dsns["worker"], db_settings, min_size=0, max_size=4, name="memchat-queue", init=init
            )
        kinds = list(openers)
        created = await asyncio.gather(*openers.values(), return_exceptions=True)
        failed = [result for result in created if isinstance(result, BaseException)]
        pools = {
            kind: result
            for kind, result in zip(kinds, created, strict=True)
            if isinstance(result, asyncpg.Pool)
        }
        if failed:
            for pool in pools.values():
                await pool.close()
            raise failed[0]
        info = DatabaseInfo(
            embedded=embedded is not None,
            location=str(embedded.data_dir) if embedded else shown,
            server_version=version,
            roles=names,
            socket_dir=str(embedded.socket_dir) if embedded else None,
        )
        return cls(pools, info, embedded, dsns, settings, query_loggers, only_user)

    @staticmethod
    async def _pool(
        dsn: str,
        db_settings: DatabaseSettings,
        *,
        min_size: int,
        max_size: int,
        name: str,
        init: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]] | None = None,
        settings: dict[str, str] | None = None,
    ) -> asyncpg.Pool:
        shown = redact_dsn(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=db_settings.command_timeout,
                timeout=db_settings.connect_timeout,
                server_settings={"application_name": name, **(settings or {})},
                reset=_keep_session,
                init=init,
            )
            # Log in once now, so a wrong password is one line at start, not later.
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"cannot open a pool to {shown}: {reason_of(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"cannot log in to {shown}: {exc}") from None
        return pool

    async def close(self) -> None:
        for pool in self._pools():
            await pool.close()
        if self._embedded is not None:
            # Stopping takes a moment and must not block the event loop.
            await asyncio.to_thread(self._embedded.release)
            self._embedded = None

    @asynccontextmanager
    async def _connection(
        self, pool: asyncpg.Pool | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        finished = False
        try:
            async with (pool or self.pool).acquire() as conn:
                # The pool's proxy forwards every Connection method to the
                # connection it holds; callers see it as the Connection it is.
                yield cast(asyncpg.Connection, conn)
                finished = True
        except CONNECTION_ERRORS as exc:
            if finished:
                # The work is done (committed); only handing the connection
                # back failed, and the pool has discarded it. Not the caller's
                # problem: telling it otherwise would report stored work as lost.
                log.info("dropped a broken connection on release: %s", reason_of(exc))
                return
            raise DatabaseError(f"lost the database connection: {reason_of(exc)}") from None

    def _refuse_if_single_user(
        self, what: str, pool: asyncpg.Pool | None = None
    ) -> asyncpg.Pool | None:
        if self.only_user is not None:
            raise SingleUserRefusal(f"{what} is not available in a single-user process")
        return pool

    @asynccontextmanager
    async def scoped(self, user_id: str) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that can see and write ``user_id``'s rows only.

        BEGIN and the scope go in one round trip (a simple-protocol query with
        the id as a quoted literal; ids are validated to a quote-free alphabet
        anyway), which is why this is not asyncpg's ``transaction()``: nested
        blocks use :func:`savepoint`.
        """
        user_id = validate_user_id(user_id)
        if self.only_user is not None and user_id != self.only_user:
            # No id in the message: it may reach that user's screen.
            raise SingleUserRefusal("this process serves one user only: another user's scope")
        begin = f"BEGIN; SELECT set_config('memchat.user_id', {_literal(user_id)}, true)"
        async with self._connection() as conn, _block(conn, begin, "COMMIT", "ROLLBACK"):
            yield conn

    @asynccontextmanager
    async def unscoped(self) -> AsyncIterator[asyncpg.Connection]:
        """An app connection in no user's scope: row-level security shows it no rows.

        For audits that check exactly that (engine/admin.py); the job queue
        has :meth:`queue`.
        """
        self._refuse_if_single_user("the unscoped path")
        async with self._connection() as conn:
            yield conn

    @asynccontextmanager
    async def queue(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the worker login, which may only call the queue functions.

        Those are SECURITY DEFINER (they look across users), return ids and
        counts only, and refuse to run inside a user scope.
        """
        pool = self._refuse_if_single_user("the job queue", self._queue_pool)
        async with self._connection(pool) as conn:
            yield conn

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction across all users, as the SELECT-only admin login."""
        pool = self._refuse_if_single_user("the admin reader", self._admin_pool)
        async with (
            self._connection(pool) as conn,
            conn.transaction(readonly=True),
        ):
            yield conn


@asynccontextmanager
async def savepoint(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A block inside a scoped transaction whose failure leaves the transaction usable."""
    async with _block(
        conn,
        "SAVEPOINT memchat_block",
        "RELEASE SAVEPOINT memchat_block",
        "ROLLBACK TO SAVEPOINT memchat_block",
    ):
        yield


@asynccontextmanager
async def _block(
    conn: asyncpg.Connection, begin: str, end: str, roll_back: str
) -> AsyncIterator[None]:
    """``begin``, the block, then ``end``; ``roll_back`` if the block raised."""
    await conn.execute(begin)
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            # A broken connection is discarded by the pool, which also rolls
            # back whatever this could not.
            with contextlib.suppress(Exception):
                await conn.execute(roll_back)
        raise
    await conn.execute(end)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to reset.

    asyncpg's default sends RESET ALL, UNLISTEN and friends on every release,
    one round trip per transaction. Pool connections carry no session state:
    each pool logs in as its own role and the user scope is transaction-local
    (LISTEN uses its own connection). asyncpg still rolls back a transaction
    left open before calling this.
    """


def _login_name(url: str, kind: str) -> str:
    try:
        user = urlsplit(url).username
    except ValueError:
        user = None
    if not user:
        raise DatabaseError(f"database.{kind}_url must name its user (postgresql://USER:...)")
    return unquote(user)


async def _ensure_database(server: EmbeddedServer, connect_timeout: float) -> None:
    conn = await asyncpg.connect(server.dsn, timeout=connect_timeout)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME)
        if not exists:
            # Another process may create it first.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    finally:
        await conn.close()
