"""Login roles, as an attacker holding one of memchat's connections would try them.

* RESET ROLE / SET ROLE from a pool connection (finding 3);
* a second memchat database on the same cluster (finding 4);
* the SECURITY DEFINER queue functions from a user's scope (finding 5).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from engine.config import Settings
from engine.db import Database, with_database
from engine.db.dsn import with_login
from engine.db.migrate import _ENSURE_LEGACY_ROLES, available_migrations
from engine.doctor import diagnose
from engine.errors import DatabaseError
from engine.store import Store
from tests.conftest import make_settings

pytestmark = pytest.mark.db


async def _owner_name(database_dsn: str) -> str:
    conn = await asyncpg.connect(database_dsn)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def _seed(store: Store) -> None:
    for user in ("alice", "bob"):
        async with store.scope(user) as s:
            session = await s.create_session()
            await s.append_message(session.session_id, "user", f"secret of {user}")
            await s.add_memory(f"Name is {user}", ["name"])


# -- finding 3: no way back to the owner from a pool connection -----------------------


async def test_reset_role_on_a_pool_connection_gives_no_extra_rights(
    db: Database, store: Store, database_dsn: str
) -> None:
    await _seed(store)
    owner = await _owner_name(database_dsn)
    async with db.scoped("alice") as conn:
        await conn.execute("RESET ROLE")
        assert await conn.fetchval("SELECT current_user") == db.roles.app
        # Still alice's rows only.
        assert await conn.fetchval("SELECT count(*) FROM memories") == 1
    async with db.unscoped() as conn:
        await conn.execute("SET ROLE NONE")
        assert await conn.fetchval("SELECT current_user") == db.roles.app
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
        for target in (owner, "memchat_app", db.roles.admin, db.roles.worker):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f'SET ROLE "{target}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET SESSION AUTHORIZATION DEFAULT; SELECT 1; SET ROLE postgres")
        row = await conn.fetchrow(
            "SELECT session_user AS login, rolsuper, rolbypassrls, rolcreaterole "
            "FROM pg_roles WHERE rolname = session_user"
        )
    assert row["login"] == db.roles.app
    assert not (row["rolsuper"] or row["rolbypassrls"] or row["rolcreaterole"])


async def test_the_admin_connection_cannot_write(db: Database, store: Store) -> None:
    await _seed(store)
    async with db.admin() as conn:
        assert await conn.fetchval("SELECT count(*) FROM memories") == 2
        assert await conn.fetchval("SELECT session_user") == db.roles.admin
        # Leave the read-only transaction and try as the login itself.
        await conn.execute("COMMIT")
        await conn.execute("RESET ROLE")
        for statement in (
            "DELETE FROM memories",
            "UPDATE users SET display_name = 'x'",
            "INSERT INTO memory_jobs (user_id) VALUES ('alice')",
            "TRUNCATE memory_events",
            "UPDATE memchat_queue_limits SET max_lease_seconds = 1e9",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        await conn.execute("BEGIN")  # what the context manager will end
    async with db.admin() as conn:
        assert await conn.fetchval("SELECT count(*) FROM memories") == 2


async def test_the_worker_login_only_runs_the_queue(db: Database, store: Store) -> None:
    await _seed(store)
    async with db.queue() as conn:
        assert await conn.fetchval("SELECT session_user") == db.roles.worker
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM messages")
        assert (await conn.fetchrow("SELECT * FROM memchat_job_counts()"))["pending"] == 0


async def test_a_superuser_app_login_is_refused(
    tmp_path: Path, database_dsn: str, pg_server_dsn: str
) -> None:
    """database.app_url naming a login with more rights than it needs: one line, no start."""
    name = urlsplit(database_dsn).path.lstrip("/")
    strong = f"{name}_strong"
    superuser = await asyncpg.connect(pg_server_dsn)
    try:
        await superuser.execute(f"CREATE ROLE {strong} LOGIN SUPERUSER PASSWORD 'pw'")
        app_url = with_login(database_dsn, strong, "pw")
        settings = make_settings(tmp_path, database={"url": database_dsn, "app_url": app_url})
        with pytest.raises(DatabaseError) as caught:
            await Database.open(settings)
        assert "\n" not in caught.value.message
        assert f"refusing role {strong} as memchat's app login: SUPER" in caught.value.message
        same = make_settings(tmp_path, database={"url": database_dsn, "app_url": database_dsn})
        with pytest.raises(DatabaseError, match="must be the owner"):
            await Database.open(same)
    finally:
        await superuser.execute(f"DROP ROLE IF EXISTS {strong}")
        await superuser.close()


# -- finding 4: two deployments on one cluster ----------------------------------------


@pytest.fixture
async def two_databases(
    tmp_path: Path, database_dsn: str, empty_database_dsn: str
) -> AsyncIterator[tuple[Database, Database]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = await Database.open(make_settings(tmp_path / "a", database={"url": database_dsn}))
    try:
        second = await Database.open(
            make_settings(tmp_path / "b", database={"url": empty_database_dsn})
        )
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def _dbname(db: Database) -> str:
    async with db.unscoped() as conn:
        return str(await conn.fetchval("SELECT current_database()"))


async def test_two_databases_on_one_cluster_share_no_role(
    two_databases: tuple[Database, Database], pg_server_dsn: str
) -> None:
    first, second = two_databases
    assert not set(first.roles.all()) & set(second.roles.all())
    async with first.scoped("alice") as conn:
        await conn.execute("INSERT INTO users (user_id, display_name) VALUES ('alice', 'A')")
    first_name, second_name = await _dbname(first), await _dbname(second)
    for here, there, there_name in ((first, second, second_name), (second, first, first_name)):
        # Each login of one deployment, pointed at the other deployment's database.
        for dsn in (here._dsn, *(_login_dsn(here, kind) for kind in ("admin", "worker"))):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                conn = await asyncpg.connect(with_database(dsn, there_name))
                await conn.close()
        superuser = await asyncpg.connect(with_database(pg_server_dsn, there_name))
        try:
            for role in here.roles.all():
                granted = await superuser.fetchval(
                    "SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = $1",
                    role,
                )
                assert granted == 0, f"{role} holds grants in {there_name}"
        finally:
            await superuser.close()
        del there


def _login_dsn(db: Database, kind: str) -> str:
    pool = {"admin": db._admin_pool, "worker": db._queue_pool}[kind]
    args = pool._connect_args  # the DSN the pool logs in with
    return str(args[0])


async def test_a_squatted_role_name_is_refused(
    tmp_path: Path, empty_database_dsn: str, pg_server_dsn: str
) -> None:
    name = urlsplit(empty_database_dsn).path.lstrip("/")
    squatted = f"memchat_app_{name}"
    superuser = await asyncpg.connect(pg_server_dsn)
    try:
        # Another deployment's admin made the name first, and granted it around.
        await superuser.execute(f"CREATE ROLE {squatted} LOGIN PASSWORD 'known'")
        settings = make_settings(tmp_path, database={"url": empty_database_dsn})
        with pytest.raises(DatabaseError) as caught:
            await Database.open(settings)
        assert "\n" not in caught.value.message
        assert f"role {squatted} exists but memchat did not make it" in caught.value.message
    finally:
        await superuser.execute(f"DROP ROLE IF EXISTS {squatted}")
        await superuser.close()


async def test_a_grown_role_is_refused(
    tmp_path: Path, database_dsn: str, pg_server_dsn: str
) -> None:
    settings = make_settings(tmp_path, database={"url": database_dsn})
    db = await Database.open(settings)
    app = db.roles.app
    await db.close()
    superuser = await asyncpg.connect(pg_server_dsn)
    try:
        await superuser.execute(f"ALTER ROLE {app} BYPASSRLS")
        with pytest.raises(DatabaseError, match=f"refusing role {app}: BYPASSRLS"):
            await Database.open(settings)
        await superuser.execute(f"ALTER ROLE {app} NOBYPASSRLS")
        await superuser.execute(f"CREATE ROLE {app}_friend LOGIN; GRANT {app} TO {app}_friend")
        with pytest.raises(DatabaseError, match=f"granted to {app}_friend"):
            await Database.open(settings)
    finally:
        await superuser.execute(f"DROP ROLE IF EXISTS {app}_friend")
        await superuser.close()


async def test_a_database_of_the_shared_roles_moves_to_its_own(
    tmp_path: Path, empty_database_dsn: str
) -> None:
    # A database as memchat left it before 0006: grants and policies on the
    # cluster-wide memchat_app / memchat_admin.
    owner = await asyncpg.connect(empty_database_dsn)
    try:
        await owner.execute(
            "DO $$ BEGIN CREATE ROLE memchat_app NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
            "DO $$ BEGIN CREATE ROLE memchat_admin NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
            "CREATE TABLE memchat_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available_migrations():
            if migration.version <= 3:
                await owner.execute(migration.sql)
                await owner.execute(
                    "INSERT INTO memchat_migrations (version, name, checksum) VALUES ($1,$2,$3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        assert await owner.fetchval(
            "SELECT has_table_privilege('memchat_app', 'memories', 'SELECT')"
        )
        db = await Database.open(make_settings(tmp_path, database={"url": empty_database_dsn}))
        await db.close()
        for legacy in ("memchat_app", "memchat_admin"):
            grants = await owner.fetchval(
                "SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = $1",
                legacy,
            )
            assert grants == 0, legacy
        roles = await owner.fetch("SELECT DISTINCT unnest(roles) AS r FROM pg_policies")
        assert "memchat_admin" not in {row["r"] for row in roles}
        assert (
            await owner.fetchval("SELECT to_regprocedure('memchat_claim_job(text, float8)')")
            is None
        )
    finally:
        await owner.close()


async def test_a_clone_of_a_template_grants_to_its_own_roles(db: Database) -> None:
    # Every test database is a clone of one migrated template (tests/conftest.py).
    async with db.admin() as conn:
        assert await conn.fetchval("SELECT count(*) FROM memchat_migrations") > 0
        policy_roles = await conn.fetch(
            "SELECT DISTINCT unnest(roles) AS r FROM pg_policies WHERE policyname LIKE '%admin%'"
        )
    assert {row["r"] for row in policy_roles} == {db.roles.admin}


# -- finding 5: the queue functions -------------------------------------------------


async def test_the_app_role_cannot_claim_from_a_user_scope(db: Database, store: Store) -> None:
    await _seed(store)
    async with db.scoped("bob") as conn:
        await conn.execute("INSERT INTO memory_jobs (user_id) VALUES ('bob')")
    for call in (
        "SELECT * FROM memchat_claim_jobs('evil', 1e9, 100)",
        "SELECT memchat_requeue_expired_jobs()",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.scoped("alice") as conn:
                await conn.fetch(call)
    # Even the worker's login refuses to claim from inside a user scope.
    async with db.queue() as conn, conn.transaction():
        await conn.execute("SELECT set_config('memchat.user_id', 'alice', true)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="user scope"):
            await conn.fetch("SELECT * FROM memchat_claim_jobs('evil', 1, 100)")


async def test_a_lease_is_capped_by_the_server(
    db: Database, store: Store, settings: Settings
) -> None:
    async with db.scoped("bob") as conn:
        await conn.execute("INSERT INTO users (user_id, display_name) VALUES ('bob', 'B')")
        await conn.execute("INSERT INTO memory_jobs (user_id) VALUES ('bob')")
    async with db.queue() as conn:
        claimed = await conn.fetch("SELECT * FROM memchat_claim_jobs('w', 1e9, 10)")
    assert [row["user_id"] for row in claimed] == ["bob"]
    async with db.admin() as conn:
        seconds = await conn.fetchval(
            "SELECT extract(epoch FROM lease_until - started_at) FROM memory_jobs"
        )
    assert 3599 <= seconds <= 3600


async def test_doctor_reports_stuck_jobs(settings: Settings, database_dsn: str) -> None:
    owner = await asyncpg.connect(database_dsn)
    try:
        await owner.execute(
            """
            INSERT INTO users (user_id, display_name) VALUES ('carol', 'C'), ('dave', 'D');
            INSERT INTO memory_jobs (user_id, status, lease_until, started_at)
                 VALUES ('carol', 'running', now() - interval '1 hour', now() - interval '2 hours');
            INSERT INTO memory_jobs (user_id, run_after)
                 VALUES ('dave', now() - interval '1 day');
            """
        )
    finally:
        await owner.close()
    checks = {r.name: r for r in await diagnose(settings=settings)}
    stuck = checks["stuck jobs"]
    assert not stuck.ok
    assert stuck.detail == "1 running past their lease; 1 pending for over 10 min"
    assert stuck.fix and "memchat worker" in stuck.fix
    roles = checks["login roles"]
    assert roles.ok and "memchat_app_" in roles.detail and "memchat_worker_" in roles.detail


async def test_an_owner_without_createrole_is_told_what_to_set_and_with_it_works(
    tmp_path: Path, empty_database_dsn: str, pg_server_dsn: str
) -> None:
    """An external database owned by an ordinary login: no superuser anywhere."""
    name = urlsplit(empty_database_dsn).path.lstrip("/")
    owner = f"{name}_owner"
    superuser = await asyncpg.connect(pg_server_dsn)
    try:
        await superuser.execute(f"CREATE ROLE {owner} LOGIN PASSWORD 'pw'")
        await superuser.execute(f"ALTER DATABASE {name} OWNER TO {owner}")
        # What README's administrator runs for such an owner, first of all.
        await superuser.execute(_ENSURE_LEGACY_ROLES)
        in_db = await asyncpg.connect(empty_database_dsn)
        try:  # PostgreSQL 14 and older give PUBLIC the public schema; 15+ its owner
            await in_db.execute(f"ALTER SCHEMA public OWNER TO {owner}")
        finally:
            await in_db.close()
        settings = make_settings(
            tmp_path, database={"url": with_login(empty_database_dsn, owner, "pw")}
        )
        with pytest.raises(DatabaseError) as caught:
            await Database.open(settings)
        message = caught.value.message
        assert "\n" not in message
        assert f"the database user {owner} cannot create memchat's login roles" in message
        assert "database.app_url, database.admin_url and database.worker_url" in message

        await superuser.execute(f"ALTER ROLE {owner} CREATEROLE")
        db = await Database.open(settings)
        try:
            async with db.unscoped() as conn:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(f"SET ROLE {owner}")
            checks = {r.name: r for r in await diagnose(settings=settings)}
            assert checks["login roles"].ok, checks["login roles"]
        finally:
            await db.close()
    finally:
        in_db = await asyncpg.connect(empty_database_dsn)
        try:
            await in_db.execute(f"REASSIGN OWNED BY {owner} TO CURRENT_USER")
        finally:
            await in_db.close()
        await superuser.execute(f"ALTER DATABASE {name} OWNER TO CURRENT_USER")
        await superuser.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        roles = await superuser.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'memchat\\_%' || $1", name
        )
        for role in roles:
            await superuser.execute(f'DROP ROLE "{role["rolname"]}"')
        await superuser.execute(f"DROP ROLE {owner}")
        await superuser.close()


async def test_a_wrong_app_url_password_is_one_line_and_never_shown(
    tmp_path: Path, database_dsn: str
) -> None:
    settings = make_settings(tmp_path, database={"url": database_dsn})
    db = await Database.open(settings)
    app = db.roles.app
    await db.close()
    secret = "s3cret-Passw0rd-never-shown"
    wrong = make_settings(
        tmp_path,
        database={"url": database_dsn, "app_url": with_login(database_dsn, app, secret)},
    )
    checks = {r.name: r for r in await diagnose(settings=wrong)}
    text = " ".join(f"{r.detail} {r.fix}" for r in checks.values())
    assert secret not in text
    # The embedded server checks passwords; a trust server (like CI's) lets it in.
    if not os.environ.get("MEMCHAT_TEST_DSN"):
        assert not checks["database"].ok
    if not checks["database"].ok:
        assert "\n" not in checks["database"].detail
        assert f"cannot log in to postgresql://{app}:***@" in checks["database"].detail


async def test_the_queue_rule_and_channel_are_granted_to_this_databases_roles_only(
    db: Database, database_dsn: str
) -> None:
    # 0007's functions, granted like 0006's: by memchat_grant_runtime_roles, not to PUBLIC.
    owner = await asyncpg.connect(database_dsn)
    try:
        rows = await owner.fetch(
            """
            SELECT p.proname, array_agg(DISTINCT
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
                   ) AS grantees
              FROM pg_proc p, aclexplode(p.proacl) a
             WHERE p.proname IN ('memchat_queue_head', 'memchat_job_channel',
                                 'memchat_claim_jobs')
               AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
             GROUP BY p.proname
            """
        )
    finally:
        await owner.close()
    granted = {row["proname"]: set(row["grantees"]) for row in rows}
    assert granted == {
        "memchat_queue_head": {db.roles.app},
        "memchat_job_channel": {db.roles.app, db.roles.admin, db.roles.worker},
        "memchat_claim_jobs": {db.roles.worker},
    }
