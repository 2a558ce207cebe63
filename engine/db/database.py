"""The connection pool and the only two ways into the data: per user, or admin.

``scoped(user_id)`` is a transaction in which PostgreSQL's row-level security
shows and accepts that user's rows only. ``admin()`` is a read-only transaction
across users, for the inspector and audits. Pool connections run as the
non-superuser role ``memchat_app`` (set as a startup parameter, so the pool's
``RESET ALL`` on release keeps it), which cannot bypass row-level security.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from asyncpg.connection import LoggedQuery

from engine.config import Settings
from engine.db.dsn import check_dsn, redact_dsn, with_database
from engine.db.embedded import DATABASE_NAME, EmbeddedServer, start_embedded
from engine.db.migrate import ADMIN_ROLE, APP_ROLE, migrate
from engine.errors import DatabaseError
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


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    embedded: bool
    location: str
    """The data dir for the embedded server, the redacted DSN otherwise."""
    server_version: str

    @property
    def label(self) -> str:
        if self.embedded:
            return f"embedded PostgreSQL {self.server_version}"
        host = urlsplit(self.location).hostname or "local socket"
        return f"PostgreSQL {self.server_version} at {host}"


class Database:
    def __init__(
        self,
        pool: asyncpg.Pool,
        info: DatabaseInfo,
        embedded: EmbeddedServer | None,
        dsn: str,
        settings: Settings,
        query_loggers: list[QueryLogger] | None = None,
    ) -> None:
        self.pool = pool
        self._query_loggers = query_loggers if query_loggers is not None else []
        self.info = info
        self._embedded = embedded
        self._dsn = dsn
        self._settings = settings.database

    async def add_query_logger(self, callback: QueryLogger) -> None:
        """Call ``callback`` with every statement the pool runs from now on (counts, tracing).

        Connections open now are replaced as they are next released, so the
        callback sees all of their statements from then on.
        """
        self._query_loggers.append(callback)
        await self.pool.expire_connections()

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A connection outside the pool (for LISTEN), as the runtime role.

        The caller owns it and must close it. It is not scoped to any user:
        use it for LISTEN only, never to read rows.
        """
        try:
            return await asyncpg.connect(
                self._dsn,
                timeout=self._settings.connect_timeout,
                server_settings={"role": APP_ROLE, "application_name": "memchat-listen"},
            )
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"cannot connect to {self.info.location}: {_reason(exc)}") from None

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        """Start the embedded server if needed, migrate, and open the pool."""
        db_settings = settings.database
        if db_settings.url is not None:
            dsn = db_settings.url.get_secret_value()
            check_dsn(dsn)  # one line for a DSN the driver would misread, not its traceback
            return await cls._open_at(dsn, settings, None)
        embedded = await asyncio.to_thread(start_embedded, settings.data_dir())
        try:
            await _ensure_database(embedded, db_settings.connect_timeout)
            dsn = with_database(embedded.dsn, DATABASE_NAME)
            return await cls._open_at(dsn, settings, embedded)
        except BaseException:
            await asyncio.to_thread(embedded.release)
            raise

    @classmethod
    async def _open_at(
        cls, dsn: str, settings: Settings, embedded: EmbeddedServer | None
    ) -> Database:
        db_settings = settings.database
        shown = redact_dsn(dsn)
        try:
            owner = await asyncpg.connect(dsn, timeout=db_settings.connect_timeout)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"cannot connect to {shown}: {_reason(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"cannot connect to {shown}: {exc}") from None
        try:
            applied = await migrate(owner)
            if applied:
                log.info("applied migrations %s", applied)
            version = str(await owner.fetchval("SHOW server_version")).split()[0]
        finally:
            await owner.close()
        query_loggers: list[QueryLogger] = []

        async def init(conn: asyncpg.Connection) -> None:
            for callback in query_loggers:
                conn.add_query_logger(callback)

        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(db_settings.pool_min_size, db_settings.pool_max_size),
                max_size=db_settings.pool_max_size,
                command_timeout=db_settings.command_timeout,
                timeout=db_settings.connect_timeout,
                server_settings={"role": APP_ROLE, "application_name": "memchat"},
                reset=_keep_session,
                init=init,
            )
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"cannot open a pool to {shown}: {_reason(exc)}") from None
        info = DatabaseInfo(
            embedded=embedded is not None,
            location=str(embedded.data_dir) if embedded else shown,
            server_version=version,
        )
        return cls(pool, info, embedded, dsn, settings, query_loggers)

    async def close(self) -> None:
        await self.pool.close()
        if self._embedded is not None:
            # Stopping takes a moment and must not block the event loop.
            await asyncio.to_thread(self._embedded.release)
            self._embedded = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        finished = False
        try:
            async with self.pool.acquire() as conn:
                yield conn
                finished = True
        except CONNECTION_ERRORS as exc:
            if finished:
                # The work is done (committed); only handing the connection
                # back failed, and the pool has discarded it. Not the caller's
                # problem: telling it otherwise would report stored work as lost.
                log.info("dropped a broken connection on release: %s", _reason(exc))
                return
            raise DatabaseError(f"lost the database connection: {_reason(exc)}") from None

    @asynccontextmanager
    async def scoped(self, user_id: str) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that can see and write ``user_id``'s rows only.

        BEGIN and the scope go in one round trip (a simple-protocol query with
        the id as a quoted literal; ids are validated to a quote-free alphabet
        anyway), which is why this is not asyncpg's ``transaction()``: nested
        blocks use :func:`savepoint`.
        """
        user_id = validate_user_id(user_id)
        begin = f"BEGIN; SELECT set_config('memchat.user_id', {_literal(user_id)}, true)"
        async with self._connection() as conn, _block(conn, begin, "COMMIT", "ROLLBACK"):
            yield conn

    @asynccontextmanager
    async def unscoped(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in no user's scope: row-level security shows it no rows.

        Only for the job-queue functions (claim, requeue, counts), which are
        SECURITY DEFINER and return ids, never user content.
        """
        async with self._connection() as conn:
            yield conn

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction across all users: the inspector's path, nothing else."""
        async with self._connection() as conn, conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL ROLE {ADMIN_ROLE}")
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
    the role is a startup parameter and the user scope is transaction-local
    (LISTEN uses its own connection). asyncpg still rolls back a transaction
    left open before calling this.
    """


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


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
