"""``memchat db upgrade-embedded``: move a PostgreSQL 16 data dir (pgserver's) to 18.

Older memchats ran the embedded server from pgserver (PostgreSQL 16). A data
dir cannot be opened by another major version, and pgserver does not install
on Python 3.13, so memchat stops with one line naming this command rather
than touching the files. The command:

1. starts the old server from PostgreSQL 16 binaries (pgserver's, if it is
   installed, or ``--old-bindir``) on a private socket directory, no TCP;
2. dumps the whole cluster with the new ``pg_dumpall`` (a newer pg_dump reads
   older servers) and counts every table's rows;
3. stops it, initialises a new data dir next to it the way memchat does
   (password auth, private socket), restores the dump and counts again;
4. only if every count matches, renames the old dir to ``<name>.pg16`` and
   puts the new one in its place. On any failure the old dir is untouched.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.db.dsn import with_database
from engine.db.embedded import (
    _private_tempdir,
    _run_as,
    bin_dir,
    check_socket_dir,
    pg_version,
    server_major,
    start_embedded,
)
from engine.db.server_account import ServerAccount, server_account
from engine.errors import DatabaseError

_LIST_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_toast%'
 ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    data_dir: Path
    backup: Path
    old_version: str
    new_version: str
    databases: int
    rows: int

    @property
    def summary(self) -> str:
        return (
            f"upgraded {self.data_dir} from PostgreSQL {self.old_version} to "
            f"{self.new_version}: {self.databases} database(s), {self.rows} rows, all "
            f"counted again after the copy; the old files are kept in {self.backup}"
        )


def old_binaries(version: str, given: Path | None) -> Path:
    if given is not None:
        bins = given.expanduser()
    else:
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise DatabaseError(
                f"upgrading needs the PostgreSQL {version} binaries: pip install "
                "'pgserver==0.1.4' (Python 3.12 or older), or pass --old-bindir DIR "
                f"(e.g. /usr/lib/postgresql/{version}/bin)"
            )
        bins = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    try:
        out = subprocess.run(
            [str(bins / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        raise DatabaseError(f"no usable PostgreSQL binaries in {bins}") from None
    found = re.search(r"(\d+)", out)
    if found is None or found[1] != version:
        raise DatabaseError(f"{bins} holds PostgreSQL {out.strip()}, not {version}")
    return bins


def upgrade_embedded(data_dir: Path, old_bindir: Path | None = None) -> UpgradeResult:
    data_dir = data_dir.expanduser().absolute()
    version = pg_version(data_dir)
    new_version = server_major()
    if version is None:
        raise DatabaseError(f"{data_dir} holds no PostgreSQL data: nothing to upgrade")
    if version == new_version:
        raise DatabaseError(f"{data_dir} is already PostgreSQL {version}: nothing to upgrade")
    if (data_dir / "postmaster.pid").exists():
        raise DatabaseError(
            f"a server may still run on {data_dir} (postmaster.pid exists): stop every "
            "program using it (older memchats) first"
        )
    backup = data_dir.with_name(f"{data_dir.name}.pg{version}")
    staging = data_dir.with_name(f"{data_dir.name}.pg{new_version}-new")
    for path in (backup, staging):
        if path.exists():
            raise DatabaseError(f"{path} is in the way: move it elsewhere, then run this again")
    old_bins = old_binaries(version, old_bindir)
    account = server_account(data_dir)
    with _private_tempdir(account) as work:
        dump = work / "cluster.sql"
        before = _dump_old(data_dir, old_bins, account, work, dump)
        new = start_embedded(staging)
        try:
            _psql(new.dsn, ["-v", "ON_ERROR_STOP=1", "-f", str(dump)], "restore")
            after = _count_all(new.dsn)
        finally:
            new.release()
    if after != before:
        shutil.rmtree(staging, ignore_errors=True)
        missing = sorted(set(before.items()) - set(after.items()))[:3]
        raise DatabaseError(
            f"the copy of {data_dir} does not match it ({missing}); nothing was changed"
        )
    os.rename(data_dir, backup)
    os.rename(staging, data_dir)
    rows = sum(int(count) for counts in before.values() for count in _counts(counts))
    return UpgradeResult(data_dir, backup, version, new_version, len(before), rows)


def _counts(text: str) -> list[str]:
    return [item.rsplit("=", 1)[1] for item in text.split()]


def _dump_old(
    data_dir: Path, old_bins: Path, account: ServerAccount, work: Path, dump: Path
) -> dict[str, str]:
    # The old cluster trusts local connections, so its socket goes where only
    # its own user (and root) can reach it, and TCP stays off.
    check_socket_dir(work, account.uid)
    options = f"-h '' -k {shlex.quote(str(work))} -c unix_socket_permissions=0700"
    pg_ctl = [str(old_bins / "pg_ctl"), "-D", str(data_dir), "-w"]
    _run_as(
        account,
        [*pg_ctl, "-l", str(work / "old-server.log"), "-o", options, "start"],
        data_dir,
        f"start with the PostgreSQL binaries in {old_bins}",
    )
    try:
        dsn = f"postgresql://postgres@/postgres?host={work}"
        counts = _count_all(dsn)
        _run(
            [str(bin_dir() / "pg_dumpall"), "-d", dsn, "-f", str(dump)],
            "dump the old data",
        )
        # The new cluster has its superuser already (with a password); pg_dumpall
        # always emits its CREATE ROLE, which would stop the restore.
        text = dump.read_text()
        dump.write_text(text.replace("\nCREATE ROLE postgres;\n", "\n", 1))
    finally:
        _run_as(account, [*pg_ctl, "-m", "fast", "stop"], data_dir, "stop")
    return counts


def _count_all(dsn: str) -> dict[str, str]:
    """Row counts of every table of every database (except templates), by database."""
    names = _psql(
        dsn,
        ["-At", "-c", "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1"],
        "list the databases",
    ).split()
    return {name: _count_tables(with_database(dsn, name)) for name in names}


def _count_tables(dsn: str) -> str:
    """``schema.table=rows`` for every table, one string (what both sides must agree on)."""
    tables = _psql(dsn, ["-At", "-c", _LIST_TABLES], "list the tables").split("\n")
    tables = [table for table in tables if table]
    if not tables:
        return ""
    # The names come from format('%I.%I'): already quoted identifiers.
    query = " UNION ALL ".join(
        f"SELECT {_literal(table)} || '=' || count(*) FROM {table}" for table in tables
    )
    counted = _psql(dsn, ["-At", "-c", query], "count rows").split()
    return " ".join(sorted(counted))


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _psql(dsn: str, args: list[str], what: str) -> str:
    return _run([str(bin_dir() / "psql"), "-X", "-q", "-d", dsn, *args], what)


def _run(argv: list[str], what: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DatabaseError(f"could not {what}: {reason}; nothing was changed")
    return result.stdout
