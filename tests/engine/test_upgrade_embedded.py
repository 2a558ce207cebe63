"""A PostgreSQL 16 data dir from an older memchat (pgserver) is stopped at, then upgraded.

The old data dir is made with pgserver's own PostgreSQL 16 binaries (not its
start-up code), holding memchat's schema as of migration 0003 and a chat;
then memchat (18) refuses it in one line, and `memchat db upgrade-embedded`
carries every row over.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from engine.db.embedded import _private_tempdir, _run_as
from engine.db.migrate import available_migrations
from engine.db.server_account import ServerAccount, server_account

pytestmark = [
    pytest.mark.db,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("pgserver") is None,
        reason="needs pgserver's PostgreSQL 16 (no wheels for Python 3.13+)",
    ),
]


def _old_bins() -> Path:
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


async def _fill(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE DATABASE memchat")
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn.replace("/postgres?", "/memchat?"))
    try:
        # memchat's schema as pgserver-era memchats left it (0001-0003, shared roles).
        await conn.execute(
            "CREATE ROLE memchat_app NOLOGIN; CREATE ROLE memchat_admin NOLOGIN;"
            "CREATE TABLE memchat_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available_migrations():
            if migration.version <= 3:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO memchat_migrations (version, name, checksum) VALUES ($1,$2,$3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        await conn.execute(
            """
            INSERT INTO users (user_id, display_name) VALUES ('alice', 'Alice'), ('bob', 'Bob');
            INSERT INTO sessions (user_id, title) VALUES ('alice', 'old chat'), ('bob', 'b');
            INSERT INTO messages (session_id, user_id, role, content)
                 SELECT session_id, user_id, 'user', 'message ' || g
                   FROM sessions, generate_series(1, 50) g;
            INSERT INTO memories (user_id, content) VALUES ('alice', 'Name is Alice');
            """
        )
    finally:
        await conn.close()


def _make_pg16_data_dir(data_dir: Path) -> None:
    account: ServerAccount = server_account(data_dir)
    data_dir.mkdir(mode=0o700)
    if account.uid != os.geteuid():
        os.chown(data_dir, account.uid, account.gid)
    bins = _old_bins()
    # What pgserver ran: initdb with trust, superuser "postgres".
    _run_as(
        account,
        [str(bins / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"],
        data_dir,
        "initdb",
    )
    with _private_tempdir(account) as sock:
        pg_ctl = [str(bins / "pg_ctl"), "-D", str(data_dir), "-w"]
        options = f"-h '' -k {shlex.quote(str(sock))}"
        _run_as(account, [*pg_ctl, "-l", str(sock / "log"), "-o", options, "start"], data_dir, "s")
        try:
            import asyncio

            asyncio.run(_fill(f"postgresql://postgres@/postgres?host={sock}"))
        finally:
            _run_as(account, [*pg_ctl, "-m", "fast", "stop"], data_dir, "stop")
    assert (data_dir / "PG_VERSION").read_text().strip() == "16"


def _memchat(data_dir: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "none.toml"
    config.touch()
    env = {
        **os.environ,
        "MEMCHAT_DATABASE__DATA_DIR": str(data_dir),
        "MEMCHAT_CONFIG": str(config),
    }
    env.pop("MEMCHAT_DATABASE__URL", None)
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_pgserver_data_dir_is_refused_in_one_line_then_upgraded(
    embedded_base: Path, tmp_path: Path
) -> None:
    data_dir = embedded_base / "pgdata"
    _make_pg16_data_dir(data_dir)

    refused = _memchat(data_dir, tmp_path, "users")
    assert refused.returncode == 4
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "is PostgreSQL 16" in lines[0] and "memchat db upgrade-embedded" in lines[0]
    assert (data_dir / "PG_VERSION").read_text().strip() == "16", "refusing must not touch it"

    upgraded = _memchat(data_dir, tmp_path, "db", "upgrade-embedded")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "from PostgreSQL 16 to 18" in upgraded.stdout
    assert (data_dir / "PG_VERSION").read_text().strip() == "18"
    backup = data_dir.with_name("pgdata.pg16")
    assert (backup / "PG_VERSION").read_text().strip() == "16"

    listed = _memchat(data_dir, tmp_path, "users", "--json")
    assert listed.returncode == 0, listed.stderr
    users = {u["user_id"]: u for u in json.loads(listed.stdout)}
    assert sorted(users) == ["alice", "bob"]
    assert (users["alice"]["messages"], users["alice"]["memories"]) == (50, 1)
    assert users["bob"]["messages"] == 50

    again = _memchat(data_dir, tmp_path, "db", "upgrade-embedded")
    assert again.returncode == 4
    assert again.stderr.strip().endswith("is already PostgreSQL 18: nothing to upgrade")
