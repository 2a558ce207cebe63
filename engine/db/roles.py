"""The login roles memchat's connections use, one set per database.

Three kinds, each a LOGIN role of its own so that no connection can
``RESET ROLE`` its way to more rights:

* ``app``    the pool: user-scoped reads and writes, under row-level security
             (no superuser, no BYPASSRLS, no CREATEROLE, member of nothing);
* ``admin``  the inspector and audits: SELECT only;
* ``worker`` the job dispatcher: may only EXECUTE the queue functions.

Only migrations use the owner (the ``database.url`` user, or the embedded
superuser). Roles are cluster-wide in PostgreSQL, so their names carry the
database's name (``memchat_app_<database>``): two deployments on one cluster
never share a role. A role of that name that memchat did not make for this
database, or that has grown rights (BYPASSRLS, membership of or in other
roles), is refused rather than used.

Where ``database.app_url`` (``admin_url``, ``worker_url``) is set, that login
is used as it is (it must meet the same rules); otherwise memchat creates the
role with a generated password kept in its 0600 credentials file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import asyncpg

from engine.db.credentials import Credentials, new_password
from engine.errors import DatabaseError

KINDS = ("app", "admin", "worker")
# PostgreSQL truncates identifiers at 63 bytes; "memchat_worker_" is the longest prefix.
_MAX_SUFFIX = 63 - len("memchat_worker_")


@dataclass(frozen=True, slots=True)
class RoleNames:
    app: str
    admin: str
    worker: str

    def of(self, kind: str) -> str:
        return str(getattr(self, kind))

    def all(self) -> tuple[str, str, str]:
        return (self.app, self.admin, self.worker)


def role_names(database: str, given: dict[str, str] | None = None) -> RoleNames:
    """``memchat_<kind>_<database>``, within 63 characters; ``given`` overrides by kind."""
    clean = re.sub(r"[^a-z0-9_]", "_", database.lower())
    if clean != database or len(clean) > _MAX_SUFFIX:
        # Distinct databases must never map to one name: keep a hash of the real one.
        digest = hashlib.sha256(database.encode()).hexdigest()[:8]
        clean = f"{clean[: _MAX_SUFFIX - 9]}_{digest}"
    names = {kind: f"memchat_{kind}_{clean}" for kind in KINDS}
    names.update(given or {})
    return RoleNames(**names)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _marker(kind: str, database: str) -> str:
    return f"memchat {kind} login of database {database}"


_ROLE_STATE = """
SELECT r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb, r.rolreplication,
       r.rolcanlogin, shobj_description(r.oid, 'pg_authid') AS comment,
       ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
              WHERE m.member = r.oid ORDER BY 1)::text[] AS member_of,
       ARRAY(SELECT u.rolname FROM pg_auth_members m JOIN pg_roles u ON u.oid = m.member
              WHERE m.roleid = r.oid AND u.rolname <> session_user ORDER BY 1)::text[] AS members
  FROM pg_roles r WHERE r.rolname = $1
"""


def role_problems(kind: str, name: str, row: asyncpg.Record) -> list[str]:
    """Why the existing role ``name`` must not serve as memchat's ``kind`` login."""
    problems = [
        attribute
        for attribute in (
            "rolsuper",
            "rolbypassrls",
            "rolcreaterole",
            "rolcreatedb",
            "rolreplication",
        )
        if row[attribute]
    ]
    shown = [p.removeprefix("rol").upper() for p in problems]
    if not row["rolcanlogin"]:
        shown.append("NOLOGIN")
    if row["member_of"]:
        # It could SET ROLE to (or inherit) any of them: e.g. the owner's full rights.
        shown.append("member of " + ", ".join(row["member_of"]))
    if row["members"]:
        shown.append("granted to " + ", ".join(row["members"]))
    return shown


async def ensure_login_roles(
    conn: asyncpg.Connection,
    names: RoleNames,
    managed: tuple[str, ...],
    credentials: Credentials | None,
) -> bool:
    """Create or check the login roles; True when ``credentials`` gained passwords.

    ``managed`` kinds are created here (password from ``credentials``, or a new
    one stored there); the others were given by URL and are only checked.
    Without ``credentials`` (a template or a test), roles get no password.
    """
    row = await conn.fetchrow("SELECT current_database(), current_user")
    assert row is not None  # a SELECT without FROM returns one row
    database, user = row
    changed = False
    for kind in KINDS:
        name = names.of(kind)
        row = await conn.fetchrow(_ROLE_STATE, name)
        if kind not in managed:
            if row is None:
                raise DatabaseError(
                    f"database.{kind}_url logs in as {name}, which does not exist in this cluster"
                )
            if problems := role_problems(kind, name, row):
                raise DatabaseError(
                    f"refusing role {name} as memchat's {kind} login: {'; '.join(problems)} "
                    "(see README: Database)"
                )
            continue
        if row is not None:
            if row["comment"] != _marker(kind, database):
                raise DatabaseError(
                    f"role {name} exists but memchat did not make it for database {database}: "
                    "refusing to use it; drop it or set "
                    f"database.{kind}_url to a login made for this database"
                )
            if problems := role_problems(kind, name, row):
                raise DatabaseError(
                    f"refusing role {name}: {'; '.join(problems)}; remove that or drop the role "
                    "and memchat makes it again"
                )
        password = credentials.password(name) if credentials is not None else None
        fresh = credentials is not None and password is None
        if fresh:
            password = new_password()
        try:
            if row is None:
                await conn.execute(
                    f"CREATE ROLE {quote_ident(name)} LOGIN NOSUPERUSER NOBYPASSRLS "
                    "NOCREATEROLE NOCREATEDB NOREPLICATION NOINHERIT"
                )
                marker = _marker(kind, database).replace("'", "''")
                await conn.execute(f"COMMENT ON ROLE {quote_ident(name)} IS '{marker}'")
            if fresh or (row is None and password is not None):
                # The literal never reaches a log: only statements that fail are logged.
                await conn.execute(f"ALTER ROLE {quote_ident(name)} PASSWORD '{password}'")
        except asyncpg.InsufficientPrivilegeError:
            raise DatabaseError(
                f"the database user {user} cannot create memchat's login roles (it needs "
                "CREATEROLE): have an administrator create them and set database.app_url, "
                "database.admin_url and database.worker_url (see README: Database)"
            ) from None
        if fresh and credentials is not None and password is not None:
            credentials.passwords[name] = password
            changed = True
    return changed


async def grant_runtime_roles(conn: asyncpg.Connection, names: RoleNames) -> None:
    """Point this database's grants and policies at ``names`` (only when they changed).

    A database cloned from a template, restored from a dump, or migrated
    before roles were per database still grants to other roles; the SQL
    function revokes those and grants to these. Skipped when nothing changed,
    because re-creating policies locks the tables.
    """
    if not await conn.fetchval("SELECT to_regclass('memchat_runtime_roles') IS NOT NULL"):
        return  # a schema before 0006 (only tests migrate part of the way)
    rows = await conn.fetch("SELECT kind, rolname FROM memchat_runtime_roles")
    if {row["kind"]: row["rolname"] for row in rows} == dict(zip(KINDS, names.all(), strict=True)):
        return
    await conn.execute("SELECT memchat_grant_runtime_roles($1, $2, $3)", *names.all())
