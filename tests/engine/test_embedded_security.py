"""The embedded server against another local user: the socket, the password, root.

Written as the attacks were: another OS user (made with useradd, run with
``runuser``) tries to reach the socket; a connection that reaches it gives no
password; a data dir made with trust auth by an older memchat; memchat run
as root with its data dir under a private directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from engine.db.credentials import CREDENTIALS_FILE
from engine.db.embedded import MAX_SOCKET_PATH, bin_dir, start_embedded
from engine.errors import DatabaseError

pytestmark = [pytest.mark.db, pytest.mark.slow]

ATTACKER = "memchat-attacker"
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create another OS user (useradd) and run as it"
)


@pytest.fixture(scope="module")
def attacker() -> str:
    """Another local OS user, as the one who read every chat."""
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/bin/sh", ATTACKER],
            check=True,
            capture_output=True,
        )
    return ATTACKER


def _long_base(base: Path) -> Path:
    """A data dir parent so long that ``<data_dir>/.s.PGSQL.5432`` cannot be a socket path."""
    long = base / ("d" * (MAX_SOCKET_PATH - len(str(base)) + 5))
    long.mkdir()
    if os.geteuid() == 0:
        long.chmod(0o711)
    return long


_CONNECT_AS_ATTACKER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(type(exc).__name__)
    else:
        print("CONNECTED")
    """
)


def _attacker_connects(user: str, socket_path: Path) -> str:
    # The system's Python: this venv's may sit under a private home directory.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    result = subprocess.run(
        [
            "runuser",
            "-u",
            user,
            "--",
            python,
            "-I",
            "-c",
            _CONNECT_AS_ATTACKER,
            str(socket_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@ROOT_ONLY
@pytest.mark.parametrize("long_path", [False, True], ids=["short-path", "long-path"])
def test_another_os_user_cannot_reach_the_socket(
    embedded_base: Path, attacker: str, long_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reported setup: no XDG_RUNTIME_DIR, and (long_path) a data dir whose
    # socket path does not fit, which sent pgserver to a shared runtime dir.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    parent = _long_base(embedded_base) if long_path else embedded_base
    server = start_embedded(parent / "pgdata")
    try:
        socket_dir = Path(urlsplit(server.dsn).query.removeprefix("host=").replace("%2F", "/"))
        assert socket_dir == server.socket_dir
        info = socket_dir.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == server.account.uid
        assert (socket_dir == server.data_dir) != long_path
        socket_path = socket_dir / ".s.PGSQL.5432"
        assert socket_path.is_socket()
        assert _attacker_connects(attacker, socket_path) == "PermissionError"
    finally:
        server.release()


def test_reaching_the_socket_is_not_enough(embedded_base: Path) -> None:
    """Even whoever can open the socket must give the password from the 0600 file."""
    server = start_embedded(embedded_base / "pgdata")
    try:
        without_password = server.dsn.replace(server.dsn.split("@")[0], "postgresql://postgres")

        async def attempt(dsn: str) -> None:
            conn = await asyncpg.connect(dsn)
            await conn.close()

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(attempt(without_password))
        asyncio.run(attempt(server.dsn))
        hba = (server.data_dir / "pg_hba.conf").read_text()
        assert [line for line in hba.splitlines() if line and not line.startswith("#")] == [
            "local all all scram-sha-256"
        ]
        credentials = server.data_dir / CREDENTIALS_FILE
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    finally:
        server.release()


def test_trust_data_dir_from_an_older_memchat_is_converted(embedded_base: Path) -> None:
    data_dir = embedded_base / "pgdata"
    # What pgserver made: initdb with trust for every connection, no password.
    data_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        server = start_embedded(data_dir)  # creates the dir as memchat-postgres's
        server.release()
        shutil.rmtree(data_dir)
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, server.account.uid, server.account.gid)
        user = ["runuser", "-u", server.account.name, "--"]
    else:
        user = []
    subprocess.run(
        [*user, str(bin_dir() / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        cwd="/",
    )
    assert "trust" in (data_dir / "pg_hba.conf").read_text()

    server = start_embedded(data_dir)
    try:
        assert "trust" not in (data_dir / "pg_hba.conf").read_text()
        no_password = server.dsn.replace(server.dsn.split("@")[0], "postgresql://postgres")

        async def attempt(dsn: str) -> str:
            conn = await asyncpg.connect(dsn)
            try:
                return str(await conn.fetchval("SELECT current_user"))
            finally:
                await conn.close()

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(attempt(no_password))
        assert asyncio.run(attempt(server.dsn)) == "postgres"
    finally:
        server.release()


@pytest.fixture
def private_parent() -> Iterator[Path]:
    """A directory like a 0700 $HOME: nobody but its owner may enter it."""
    path = Path(tempfile.mkdtemp(prefix="memchat-home-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _modes(path: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.parents]}


@ROOT_ONLY
def test_root_changes_no_permission_outside_the_data_dir(private_parent: Path) -> None:
    data_dir = private_parent / "share" / "memchat" / "pgdata"
    data_dir.parent.mkdir(parents=True)
    before = _modes(data_dir.parent)
    with pytest.raises(DatabaseError) as caught:
        start_embedded(data_dir)
    message = caught.value.message
    assert "\n" not in message
    assert f"cannot enter {private_parent} (mode 0700)" in message
    assert _modes(data_dir.parent) == before, "memchat must not open up $HOME or its parents"


@ROOT_ONLY
def test_root_runs_the_server_as_an_unprivileged_user(embedded_base: Path) -> None:
    before = _modes(embedded_base)
    server = start_embedded(embedded_base / "pgdata")
    try:
        assert server.account.uid != 0
        assert (server.data_dir).stat().st_uid == server.account.uid
    finally:
        server.release()
    assert _modes(embedded_base) == before


@ROOT_ONLY
def test_a_precreated_shared_runtime_dir_does_not_matter(
    embedded_base: Path, attacker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user squatting ``<tmp>/runtime-<uid>`` (where pgserver put sockets) is ignored."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    tmp = embedded_base / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(tmp))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        squat = tmp / f"runtime-{os.geteuid()}" / "python_PostgresServer"
        subprocess.run(
            ["runuser", "-u", attacker, "--", "mkdir", "-p", "-m", "0777", str(squat)],
            check=True,
        )
        server = start_embedded(_long_base(embedded_base) / "pgdata")
        try:
            assert server.socket_dir.parent == tmp
            assert server.socket_dir.stat().st_uid == server.account.uid
            assert not any(squat.iterdir())
        finally:
            server.release()
    finally:
        tempfile.tempdir = None


def test_doctor_shows_the_socket_dir_and_fails_an_open_one(
    embedded_base: Path, tmp_path: Path
) -> None:
    from engine.doctor import diagnose
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, database={"data_dir": str(embedded_base / "pgdata")})
    checks = {r.name: r for r in asyncio.run(diagnose(settings=settings))}
    socket_line = checks["socket"]
    assert socket_line.ok, socket_line
    assert f"{embedded_base / 'pgdata'} (mode 0700" in socket_line.detail
    assert "password required" in socket_line.detail
    logins = checks["login roles"]
    assert logins.ok and "app memchat_app_memchat" in logins.detail

    # Someone opens a temp socket dir up while a memchat holds the server.
    # (A data dir memchat makes private again itself, at every start.)
    long_settings = make_settings(
        tmp_path, database={"data_dir": str(_long_base(embedded_base) / "pgdata")}
    )
    server = start_embedded(long_settings.data_dir())
    try:
        assert server.socket_dir != server.data_dir
        server.socket_dir.chmod(0o755)
        checks = {r.name: r for r in asyncio.run(diagnose(settings=long_settings))}
    finally:
        server.socket_dir.chmod(0o700)
        server.release()
    # memchat refuses to join through it at all: the database line says why.
    assert not checks["database"].ok
    assert "refusing the embedded PostgreSQL's socket directory" in checks["database"].detail
