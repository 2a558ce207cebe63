"""The embedded PostgreSQL (pgserver) used when no ``database.url`` is set.

pgserver runs a real PostgreSQL from its wheel, listening on a Unix socket only
(never TCP), in a data directory only its owner can read. It is shared by every
memchat process on the machine that uses the same data dir and stopped when
the last of them exits. Two things it does not handle are mended here before
it starts: a ``postmaster.pid`` left by a killed server whose pid now belongs
to some other process, and dead processes still listed as holding the server
(which would keep it from ever being stopped).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from engine.errors import DatabaseError

log = logging.getLogger(__name__)

DATABASE_NAME = "memchat"
_HANDLES_FILE = ".handle_pids.json"


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    data_dir: Path
    dsn: str
    """DSN of the maintenance database ``postgres``."""
    _handle: Any = field(repr=False, compare=False)

    def release(self) -> None:
        """Let go of the server; it stops when no other memchat process holds it."""
        self._handle.cleanup()


def start_embedded(data_dir: Path) -> EmbeddedServer:
    """Start (or join) the embedded server in ``data_dir``; blocking, ~1 s on first run."""
    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create {data_dir.parent}: {exc.strerror}") from None
    _remove_stale_pid_file(data_dir)
    _prune_dead_handles(data_dir)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes.
        warnings.simplefilter("ignore")
        import pgserver

        try:
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises bare subprocess/assert errors
            log_file = data_dir / "log"
            raise DatabaseError(
                f"the embedded PostgreSQL in {data_dir} did not start ({type(exc).__name__}); "
                f"see {log_file}"
            ) from exc
    return EmbeddedServer(data_dir=data_dir, dsn=server.get_uri(), _handle=server)


def _remove_stale_pid_file(data_dir: Path) -> None:
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return
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


def _prune_dead_handles(data_dir: Path) -> None:
    handles = data_dir / _HANDLES_FILE
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))
