"""Shared fixtures: a real PostgreSQL, a fresh migrated database per test.

The server is the embedded one (in a temporary data dir) unless
``MEMCHAT_TEST_DSN`` names another; each test gets its own database, cloned
from a template that was migrated once, and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from engine import redact
from engine.config import Settings, load_settings
from engine.db import Database, with_database
from engine.db.embedded import start_embedded
from engine.db.migrate import migrate
from engine.db.roles import quote_ident, role_names
from engine.runtime import open_runtime
from engine.scenarios import SeedResult, run_seed
from engine.store import Store

TEST_DSN_VAR = "MEMCHAT_TEST_DSN"

# Tests must not pick up the developer's own settings or keys.
for _name in list(os.environ):
    if (_name.startswith("MEMCHAT_") and _name != TEST_DSN_VAR) or _name.startswith("OPENAI_"):
        del os.environ[_name]


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    home = tmp_path_factory.mktemp("xdg")
    names = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ["XDG_DATA_HOME"] = str(home / "data")
    # What memory extraction learnt per endpoint (engine/extraction.py) lives here.
    os.environ["XDG_STATE_HOME"] = str(home / "state")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _secrets_remembered_by_this_test_only() -> Iterator[None]:
    """scrub() hides every secret this process was ever told of: a test that loads
    settings with the password "password" would otherwise hide that word in every
    later test's output, and tests would pass or fail by their order."""
    known = redact._known
    saved = (known._values, known._pattern)
    yield
    known._values, known._pattern = saved


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the maintenance database of the server the tests use."""
    external = os.environ.get(TEST_DSN_VAR)
    if external:
        yield external
        return
    with outside_pytest_tmp() as base:
        server = start_embedded(base / "data")
        yield server.dsn
        server.release()


@contextlib.contextmanager
def outside_pytest_tmp() -> Iterator[Path]:
    """A temporary directory for an embedded server's data.

    Not under pytest's tmp: pytest resets /tmp/pytest-of-<user> to mode 0700
    whenever a pytest run starts, and as root the server runs as another
    system user who must be able to traverse to its data dir. memchat no
    longer opens up parents itself, so as root this directory is made
    searchable (not readable) by others; the data dir in it stays 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="memchat-test-pg-"))
    if os.geteuid() == 0:
        path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_base() -> Iterator[Path]:
    with outside_pytest_tmp() as path:
        yield path


def _drop_database(server_dsn: str, name: str) -> None:
    """Drop a test database and the login roles memchat made for it (roles are
    cluster-wide: on a shared server they would pile up run after run)."""
    roles = ", ".join(quote_ident(role) for role in role_names(name).all())
    _run(
        _execute(
            server_dsn,
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f"DROP ROLE IF EXISTS {roles}",
        )
    )


@pytest.fixture(scope="session")
def template_database(pg_server_dsn: str) -> Iterator[str]:
    name = f"memchat_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _run(_execute(pg_server_dsn, f'CREATE DATABASE "{name}"'))

    async def _migrate() -> None:
        conn = await asyncpg.connect(with_database(pg_server_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    _run(_migrate())
    yield name
    _drop_database(pg_server_dsn, name)


@pytest.fixture
def database_dsn(pg_server_dsn: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database of its own for one test."""
    name = f"memchat_t_{uuid.uuid4().hex[:12]}"
    _run(_execute(pg_server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    yield with_database(pg_server_dsn, name)
    _drop_database(pg_server_dsn, name)


@pytest.fixture
def empty_database_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"memchat_e_{uuid.uuid4().hex[:12]}"
    _run(_execute(pg_server_dsn, f'CREATE DATABASE "{name}"'))
    yield with_database(pg_server_dsn, name)
    _drop_database(pg_server_dsn, name)


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from an empty file in tmp_path plus the given sections."""
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("")
    return load_settings(config, overrides=sections)


@pytest.fixture
def settings(tmp_path: Path, database_dsn: str) -> Settings:
    return make_settings(tmp_path, database={"url": database_dsn, "pool_max_size": 20})


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = await Database.open(settings)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def store(db: Database, settings: Settings) -> Store:
    return Store(db, settings.limits)


@pytest.fixture
async def seeded(settings: Settings) -> SeedResult:
    """The seed conversation (three users, offline model), memories extracted."""
    async with open_runtime(settings) as rt:
        result = await run_seed(rt)
    assert result.failed_turns == 0
    return result


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def memchat(database_dsn: str, tmp_path: Path) -> Run:
    """Run `memchat ARGS` as a user would: a subprocess on this test's database."""
    config = tmp_path / "none.toml"
    config.touch()

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        binary: bool = False,
    ) -> subprocess.CompletedProcess[Any]:
        full_env = {
            **os.environ,
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_CONFIG": str(config),
            **(env or {}),
        }
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", *args],
            capture_output=True,
            # binary: the exact bytes a terminal would receive.
            text=not binary,
            env=full_env,
            input=stdin,
            timeout=120,
        )

    return run


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on 127.0.0.1 (real HTTP)."""
    with FakeOpenAI() as server:
        yield server
