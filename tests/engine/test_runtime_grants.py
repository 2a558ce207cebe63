"""The runtime roles' grants as rows (migration 0012) are exactly 0011's, on the real server.

Every ACL in the database (tables, sequences, functions, the schema, the
database itself) and every row-level security policy is read from the
catalogue before 0012 (granted by 0011's memchat_grant_runtime_roles) and
after (granted again by 0012's, which reads memchat_runtime_grants), and the
two must be equal. Run on the embedded server (pgvector: memory_vectors
exists) and on an external one without pgvector (MEMCHAT_TEST_DSN), where
the vector rows are skipped.
"""

from __future__ import annotations

import asyncpg
import pytest

import engine.db.migrate as migrate_module
from engine.db.migrate import available_migrations, migrate

pytestmark = pytest.mark.db

Privileges = frozenset[tuple[str, ...]]

# Each privilege one row: (object kind, object, grantee, privilege).
_ACLS = """
SELECT 'relation', c.oid::regclass::text, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'function', p.oid::regprocedure::text, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
       LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'schema', n.nspname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_namespace n, aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE n.nspname = 'public'
UNION ALL
SELECT 'database', d.datname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_database d, aclexplode(d.datacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE d.datname = current_database()
"""
_POLICIES = """
SELECT tablename, policyname, permissive, array_to_string(roles, ','), cmd,
       coalesce(qual, ''), coalesce(with_check, '')
  FROM pg_policies WHERE schemaname = 'public'
"""


async def _privileges(conn: asyncpg.Connection) -> tuple[Privileges, Privileges]:
    acls = frozenset(tuple(row) for row in await conn.fetch(_ACLS))
    policies = frozenset(tuple(row) for row in await conn.fetch(_POLICIES))
    return acls, policies


async def _roles(conn: asyncpg.Connection) -> list[str]:
    rows = dict(await conn.fetch("SELECT kind, rolname FROM memchat_runtime_roles"))
    return [rows["app"], rows["admin"], rows["worker"]]


async def _migrate_before(conn: asyncpg.Connection, version: int) -> None:
    every = available_migrations()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            migrate_module,
            "available_migrations",
            lambda: [m for m in every if m.version < version],
        )
        await migrate(conn)


def _new_in_0012(privileges: Privileges) -> Privileges:
    """What 0012 itself adds: its table and functions, the owner's alone."""
    added = (
        "memchat_runtime_grants",
        "memchat_apply_grants(",
        "memchat_apply_runtime_grants(",
        "memory_words",
        "memchat_count_memory_words(",
        "memchat_forget_memory_words(",
        "memchat_vector_index_name(",
        "memchat_install_recall_vector(",
        "memchat_index_vectors(",
    )
    return frozenset(p for p in privileges if p[1].startswith(added))


async def test_0012_grants_exactly_what_0011_granted(empty_database_dsn: str) -> None:
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        await _migrate_before(conn, 12)
        acls_0011, policies_0011 = await _privileges(conn)
        assert 12 in await migrate(conn)
        roles = await _roles(conn)
        # The roles did not change, so migrate() did not grant again: do it with
        # 0012's function, which first revokes nothing (same roles) and re-creates
        # the admin's policies.
        await conn.execute("SELECT memchat_grant_runtime_roles($1, $2, $3)", *roles)
        acls_0012, policies_0012 = await _privileges(conn)
        vectors = await conn.fetchval("SELECT to_regclass('memory_vectors') IS NOT NULL")
    finally:
        await conn.close()
    added = _new_in_0012(acls_0012)
    assert acls_0012 - added == acls_0011
    assert policies_0012 == policies_0011
    # 0012's own objects: nothing for the runtime logins or PUBLIC.
    assert {grantee for _, _, grantee, _ in added}.isdisjoint({*roles, "PUBLIC"})
    # The comparison saw what matters: the app's search and, with pgvector, its vectors.
    app = roles[0]
    assert ("function", "memchat_recall(text,integer,integer)", app, "EXECUTE") in acls_0011
    assert (("relation", "memory_vectors", app, "DELETE") in acls_0011) is vectors
    assert any(p[1] == "memories_admin_read" for p in policies_0011)


async def test_new_roles_get_the_same_grants_and_the_old_ones_lose_theirs(
    empty_database_dsn: str,
) -> None:
    # A clone or restore under other role names: the rows are granted to the new
    # roles, the old ones keep nothing.
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        await migrate(conn)
        old = await _roles(conn)
        acls_old, policies_old = await _privileges(conn)
        new = [f"{name[:50]}_moved" for name in old]
        for name in new:
            await conn.execute(f'CREATE ROLE "{name}" NOLOGIN')
        try:
            await conn.execute("SELECT memchat_grant_runtime_roles($1, $2, $3)", *new)
            acls_new, policies_new = await _privileges(conn)
            # Back, so that the roles the fixture made are the ones that stay.
            await conn.execute("SELECT memchat_grant_runtime_roles($1, $2, $3)", *old)
        finally:
            for name in new:
                await conn.execute(f'DROP OWNED BY "{name}"')
                await conn.execute(f'DROP ROLE "{name}"')
    finally:
        await conn.close()
    renamed = dict(zip(old, new, strict=True))
    assert acls_new == frozenset(
        (kind, name, renamed.get(grantee, grantee), privilege)
        for kind, name, grantee, privilege in acls_old
    )
    assert {p[3] for p in policies_new} - {p[3] for p in policies_old} == {new[1]}
    assert not any(grantee in old for _, _, grantee, _ in acls_new)


async def test_a_later_migration_adds_rows_and_grants_them(empty_database_dsn: str) -> None:
    # How a migration after 0012 grants something new: a row, then
    # memchat_apply_runtime_grants(its version) for a database already granted.
    conn = await asyncpg.connect(empty_database_dsn)
    try:
        await migrate(conn)
        app, admin, worker = await _roles(conn)
        await conn.execute("CREATE FUNCTION memchat_later() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        await conn.execute("REVOKE ALL ON FUNCTION memchat_later() FROM PUBLIC")
        await conn.execute(
            "INSERT INTO memchat_runtime_grants (kind, object_type, object_name, privileges, since)"
            " VALUES ('worker', 'FUNCTION', 'memchat_later()', 'EXECUTE', 99)"
        )
        await conn.execute("SELECT memchat_apply_runtime_grants(99)")
        may = "SELECT has_function_privilege($1, 'memchat_later()', 'EXECUTE')"
        assert [await conn.fetchval(may, role) for role in (app, admin, worker)] == [
            False,
            False,
            True,
        ]
        # A row naming an object that does not exist is an error, unless optional.
        await conn.execute(
            "INSERT INTO memchat_runtime_grants (kind, object_type, object_name, privileges, since)"
            " VALUES ('app', 'TABLE', 'no_such_table', 'SELECT', 100)"
        )
        with pytest.raises(asyncpg.RaiseError, match="no TABLE no_such_table"):
            await conn.execute("SELECT memchat_apply_runtime_grants(100)")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO memchat_runtime_grants "
                "(kind, object_type, object_name, privileges, since) "
                "VALUES ('app', 'TABLE', 'users', 'SELECT; DROP TABLE users', 101)"
            )
    finally:
        await conn.close()
