"""The embedded PostgreSQL: fresh start, reuse, stale pid files, exposure."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.db, pytest.mark.slow]

# Each step runs in its own process, as separate memchat runs would.
_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import asyncpg
    from engine.db.embedded import start_embedded

    async def main(server, action):
        conn = await asyncpg.connect(server.dsn)
        try:
            if action == "write":
                await conn.execute("CREATE TABLE IF NOT EXISTS marker (v text)")
                await conn.execute("INSERT INTO marker VALUES ('kept')")
            print(await conn.fetchval("SELECT string_agg(v, ',') FROM marker"))
            print(await conn.fetchval("SHOW listen_addresses") or "<none>")
            print(await conn.fetchval("SELECT pg_postmaster_start_time()"))
        finally:
            await conn.close()

    server = start_embedded(Path(sys.argv[1]))
    asyncio.run(main(server, sys.argv[2]))
    if sys.argv[3] == "keep":
        # Simulate a crash: leave without letting memchat stop the server.
        import os
        os._exit(0)
    """
)


def _run(data_dir: Path, action: str, exit_mode: str = "stop") -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(data_dir), action, exit_mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _postmaster(data_dir: Path) -> psutil.Process | None:
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return None
    return psutil.Process(int(pid_file.read_text().splitlines()[0]))


def test_fresh_start_reuse_and_clean_stop(embedded_base: Path) -> None:
    data_dir = embedded_base / "pgdata"
    marker, listen, _ = _run(data_dir, "write")
    assert marker == "kept"
    assert listen == "<none>", "the embedded server must not listen on TCP"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert not (data_dir / "postmaster.pid").exists(), "server should stop when memchat exits"

    marker, _, _ = _run(data_dir, "write")
    assert marker == "kept,kept", "the second run must reuse the same data"


def test_survives_a_killed_server_and_a_stale_pid_file(embedded_base: Path) -> None:
    data_dir = embedded_base / "pgdata"
    _, _, started = _run(data_dir, "write", "keep")
    postmaster = _postmaster(data_dir)
    assert postmaster is not None and postmaster.is_running()
    family = [postmaster, *postmaster.children()]
    postmaster.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    # The pid in the stale file now belongs to a live process that is not postgres
    # (this test's own), as happens after a reboot.
    pid_file = data_dir / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")

    marker, _, restarted = _run(data_dir, "read")
    assert marker == "kept"
    assert restarted != started
