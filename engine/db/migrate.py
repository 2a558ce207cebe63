"""Versioned SQL migrations, applied at start under an advisory lock.

Files are ``engine/db/migrations/NNNN_name.sql``. All pending ones run in a
single transaction that first takes a transaction-level advisory lock, so two
processes starting at once serialise: the second finds nothing left to do.
Applied versions are recorded in ``memchat_migrations`` with a checksum; an
applied file that was edited afterwards is refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from engine.db.credentials import Credentials, load_credentials
from engine.db.roles import KINDS, ensure_login_roles, grant_runtime_roles, role_names
from engine.errors import DatabaseError

# Any stable 64-bit number; "memchat" in ASCII.
MIGRATION_LOCK_KEY = 0x6D656D63686174
# The cluster-wide roles of migrations 0001-0003, which name them. They are
# still created (NOLOGIN) so those files apply to a fresh database; 0006 and
# every start after it revoke whatever they held (engine/db/roles.py).
LEGACY_APP_ROLE = "memchat_app"
LEGACY_ADMIN_ROLE = "memchat_admin"

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("engine.db").joinpath("migrations").iterdir():
        match = _FILE_RE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


# Roles are cluster-wide, so several databases (and racing processes) may try
# to create them: duplicate_object / unique_violation mean someone else won.
_ENSURE_LEGACY_ROLES = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LEGACY_APP_ROLE}') THEN
        BEGIN
            CREATE ROLE {LEGACY_APP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LEGACY_ADMIN_ROLE}') THEN
        BEGIN
            CREATE ROLE {LEGACY_ADMIN_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END
$$;
"""


async def _ensure_legacy_roles(conn: asyncpg.Connection) -> None:
    """The NOLOGIN roles migration 0001 names, needed only to apply it to a fresh database."""
    if await current_version(conn) is not None:
        return
    try:
        await conn.execute(_ENSURE_LEGACY_ROLES)
    except asyncpg.InsufficientPrivilegeError:
        user = await conn.fetchval("SELECT current_user")
        raise DatabaseError(
            f"the database user {user} cannot create roles (it needs CREATEROLE) to set up a "
            f"new memchat database; have an administrator run: CREATE ROLE {LEGACY_APP_ROLE} "
            f"NOLOGIN; CREATE ROLE {LEGACY_ADMIN_ROLE} NOLOGIN; (see README: Database)"
        ) from None


async def migrate(
    conn: asyncpg.Connection,
    *,
    given: dict[str, str] | None = None,
    credentials: Credentials | None = None,
) -> list[int]:
    """Apply every pending migration and set up the login roles; return the versions applied.

    ``given`` maps a kind (app, admin, worker) to the role name of a login the
    settings provide; the other kinds are created here, with passwords kept in
    ``credentials`` (re-read under the lock, saved before the commit).
    """
    await _ensure_legacy_roles(conn)
    wanted = available_migrations()
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS memchat_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM memchat_migrations")
        done = {row["version"]: row for row in rows}
        known = {m.version for m in wanted}
        if newer := sorted(set(done) - known):
            raise DatabaseError(
                f"the database schema is at version {max(newer)}, newer than this memchat "
                f"knows ({max(known)}): upgrade memchat"
            )
        for migration in wanted:
            row = done.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise DatabaseError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied to this database; restore the original file"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.RaiseError as exc:
                # A migration that refuses the data it finds says why in one
                # line (e.g. 0005: user ids that differ only by case).
                raise DatabaseError(
                    f"migration {migration.version:04d}_{migration.name} stopped: {exc}"
                ) from None
            await conn.execute(
                "INSERT INTO memchat_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.version)
        database = str(await conn.fetchval("SELECT current_database()"))
        names = role_names(database, given)
        managed = tuple(kind for kind in KINDS if kind not in (given or {}))
        if credentials is not None:
            # Another process may have stored passwords while we waited for the lock.
            fresh = load_credentials(credentials.path)
            credentials.superuser = fresh.superuser or credentials.superuser
            credentials.passwords.update(fresh.passwords)
        if await ensure_login_roles(conn, names, managed, credentials) and credentials:
            credentials.save()
        await grant_runtime_roles(conn, names)
    return applied_now


async def current_version(conn: asyncpg.Connection) -> int | None:
    exists = await conn.fetchval("SELECT to_regclass('memchat_migrations') IS NOT NULL")
    if not exists:
        return None
    version: int | None = await conn.fetchval("SELECT max(version) FROM memchat_migrations")
    return version
