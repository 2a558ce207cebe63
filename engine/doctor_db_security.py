"""``memchat doctor``'s checks of who the connections are and how reachable they are.

Each check looks at what is live, not at what is configured: the login role
of a connection taken from each pool (``session_user``, its attributes and
memberships), the embedded server's socket directory as the file system has
it, and the job queue's rows. Separate from engine/doctor.py so that the
checks of the database's security stay together.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import asyncpg

from engine.admin import CHECK_STUCK_JOBS, AdminReader
from engine.db import Database
from engine.db.embedded import check_socket_dir
from engine.errors import DatabaseError

LOGIN_ROLES = "login roles"
SOCKET = "socket"
STUCK_JOBS = "stuck jobs"


def _login_problems(kind: str, row: asyncpg.Record) -> list[str]:
    problems = []
    if row["login"] != row["role"]:
        problems.append(f"runs as {row['role']} after SET ROLE")
    for attribute in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb", "rolreplication"):
        if row[attribute]:
            problems.append(attribute.removeprefix("rol").upper())
    if row["member_of"]:
        problems.append("member of " + ", ".join(row["member_of"]))
    if kind == "admin" and row["can_write"]:
        problems.append("may write tables")
    if kind == "worker" and (row["can_write"] or row["can_read"]):
        problems.append("may use tables directly")
    return problems


async def login_roles_check(db: Database) -> list[tuple[str, bool, str]]:
    """(kind, ok, text) for the app, admin and worker pools' live logins."""
    results = []
    for kind, row in (await AdminReader(db).live_logins()).items():
        problems = _login_problems(kind, row)
        if problems:
            results.append(
                (kind, False, f"{kind} logs in as {row['login']}: {', '.join(problems)}")
            )
        else:
            results.append((kind, True, f"{kind} {row['login']}"))
    return results


def login_roles_summary(results: list[tuple[str, bool, str]]) -> tuple[bool, str, str | None]:
    ok = all(good for _, good, _ in results)
    if ok:
        detail = (
            "; ".join(text for _, _, text in results)
            + " (no superuser, BYPASSRLS or CREATEROLE; admin reads only;"
            " worker runs the queue only)"
        )
        return True, detail, None
    detail = "; ".join(text for _, good, text in results if not good)
    fix = (
        "give each connection a login of its own without those rights: unset database.app_url/"
        "admin_url/worker_url to let memchat make them, or ALTER ROLE ... NOSUPERUSER "
        "NOBYPASSRLS NOCREATEROLE and REVOKE the memberships (see docs/security.md)"
    )
    return False, detail, fix


def socket_check(db: Database) -> tuple[bool, str, str | None]:
    if not db.info.embedded or db.info.socket_dir is None:
        return True, "not the embedded server (its socket is the server's business)", None
    directory = Path(db.info.socket_dir)
    try:
        info = directory.lstat()
    except OSError as exc:
        return False, f"{directory}: {exc.strerror}", "restart memchat"
    mode = stat.S_IMODE(info.st_mode)
    detail = f"{directory} (mode {mode:04o}, uid {info.st_uid})"
    data_dir = Path(db.info.location)
    try:
        owner = data_dir.stat().st_uid
        check_socket_dir(directory, owner)
    except (DatabaseError, OSError):
        fix = (
            f"stop every memchat, then start one again: memchat picks a private socket "
            f"directory; never chmod {directory} open"
        )
        return False, detail + ": other users may reach it", fix
    if owner == os.geteuid():
        who = "you"
    else:
        try:
            who = f"{pwd.getpwuid(owner).pw_name} (the server's user) and root"
        except KeyError:
            who = f"uid {owner} and root"
    return True, f"{detail}: only {who} can reach it; password required", None


async def stuck_jobs_check(db: Database) -> tuple[bool, str, str | None]:
    (stuck,) = (await AdminReader(db).run_checks(CHECK_STUCK_JOBS)).checks
    if stuck.ok:
        return True, stuck.detail, None
    fix = (
        "start `memchat worker` (or any memchat): it requeues expired leases and works the "
        "queue; see the inspector (F3) for whose jobs they are"
    )
    return False, stuck.detail, fix
