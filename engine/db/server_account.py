"""Which OS user runs the embedded PostgreSQL, and whether it can.

PostgreSQL refuses to run as root. For an ordinary user the server runs as
that user. As root it runs as an unprivileged system user: the data dir's
owner when an existing data dir belongs to one (e.g. pgserver's), else
``memchat-postgres`` (created with ``useradd`` when missing). That user must
be able to reach the data dir and the binaries through their parent
directories; memchat does not loosen anyone's permissions to make that so
(pgserver did: it made ``$HOME`` and every parent world-readable). When the
user cannot, memchat says which directory is in the way, in one line.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DatabaseError

SYSTEM_USER = "memchat-postgres"


@dataclass(frozen=True, slots=True)
class ServerAccount:
    uid: int
    gid: int
    name: str

    @property
    def groups(self) -> set[int]:
        if self.uid == os.geteuid():
            return {self.gid, *os.getgroups()}
        return {self.gid} | {g.gr_gid for g in grp.getgrall() if self.name in g.gr_mem}

    def may(self, path: Path, bit: int) -> bool:
        """Whether this user has permission ``bit`` (rwx as 4/2/1) on ``path``."""
        info = path.stat()
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == self.uid:
            return bool(mode & (bit << 6))
        if info.st_gid in self.groups:
            return bool(mode & (bit << 3))
        return bool(mode & bit)

    def check_can_reach(self, path: Path) -> None:
        """Every parent of ``path`` must be searchable by this user."""
        if self.uid == os.geteuid():
            return
        for parent in reversed(path.parents):
            if not self.may(parent, 1):
                mode = stat.S_IMODE(parent.stat().st_mode)
                raise DatabaseError(
                    f"as root, memchat runs the embedded PostgreSQL as the user {self.name}, "
                    f"who cannot enter {parent} (mode {mode:04o}) to reach {path}; memchat "
                    "changes no permissions outside its data dir: set database.data_dir to a "
                    f"directory {self.name} can reach, or run memchat as an ordinary user"
                )

    def check_can_run(self, program: Path) -> None:
        self.check_can_reach(program)
        if self.uid != os.geteuid() and not self.may(program, 1):
            raise DatabaseError(
                f"as root, memchat runs the embedded PostgreSQL as the user {self.name}, who "
                f"may not execute {program}; reinstall memchat where other users can read it, "
                "or run memchat as an ordinary user"
            )


def server_account(data_dir: Path) -> ServerAccount:
    uid = os.geteuid()
    if uid != 0:
        return ServerAccount(uid, os.getegid(), pwd.getpwuid(uid).pw_name)
    try:
        owner = data_dir.stat().st_uid
    except OSError:
        owner = 0
    entry = pwd.getpwuid(owner) if owner != 0 else _system_user()
    return ServerAccount(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True,
        text=True,
    )
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        reason = result.stderr.strip() or f"useradd exit code {result.returncode}"
        raise DatabaseError(
            "PostgreSQL cannot run as root and memchat could not create the system user "
            f"{SYSTEM_USER} to run it ({reason}); run memchat as an ordinary user "
            "or set database.url"
        ) from None
