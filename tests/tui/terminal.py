"""The real `memchat` in a pseudo-terminal, read back through a terminal emulator.

Keys go in as the exact bytes xterm-compatible terminals (xterm, GNOME
Terminal, Alacritty, tmux) send; the screen is what pyte, a VT100 emulator,
makes of the app's output. Tests wait for screen content with a deadline,
never for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ptyprocess
import pyte

# What an xterm-compatible terminal sends for each key.
KEYS: dict[str, bytes] = {
    "enter": b"\r",
    "tab": b"\t",
    "escape": b"\x1b",
    "ctrl+j": b"\n",
    "ctrl+w": b"\x17",
    "ctrl+q": b"\x11",
    "ctrl+left": b"\x1b[1;5D",
    "ctrl+right": b"\x1b[1;5C",
    "f8": b"\x1b[19~",
    "f9": b"\x1b[20~",
    "up": b"\x1b[A",
    "delete": b"\x1b[3~",
    **{f"alt+{n}": b"\x1b" + str(n).encode() for n in range(10)},
}


def paste(text: str) -> bytes:
    """Bracketed paste; terminals send line breaks as CR inside it."""
    return b"\x1b[200~" + text.replace("\n", "\r").encode() + b"\x1b[201~"


def memchat_command() -> str:
    found = shutil.which("memchat", path=str(Path(sys.executable).parent))
    assert found, "the memchat console script is not installed in this venv"
    return found


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str], cols: int, rows: int) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.lock = threading.Lock()
        self.process = ptyprocess.PtyProcess.spawn(argv, env=env, dimensions=(rows, cols))
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.process.read(65536)
            except EOFError:
                return
            with self.lock:
                self.output += data
                self.stream.feed(data)

    def send(self, *keys: str | bytes) -> None:
        """Keys by name (see KEYS), or raw bytes, or text typed as is, in one write."""
        data = b"".join(
            k if isinstance(k, bytes) else KEYS.get(k, k.encode() if len(k) else b"") for k in keys
        )
        self.process.write(data)

    def type(self, text: str) -> None:
        self.process.write(text.encode())

    def text(self) -> str:
        with self.lock:
            return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, what: str | Callable[[str], bool], within: float = 20.0) -> str:
        check = (lambda screen: what in screen) if isinstance(what, str) else what
        deadline = time.monotonic() + within
        while True:
            screen = self.text()
            if check(screen):
                return screen
            if time.monotonic() > deadline or not self.process.isalive():
                raise AssertionError(f"not on screen in {within}s: {what!r}\n{screen}")
            time.sleep(0.02)

    def resize(self, cols: int, rows: int) -> None:
        with self.lock:
            self.screen.resize(rows, cols)
        self.process.setwinsize(rows, cols)

    def wait_exit(self, within: float = 20.0) -> int:
        deadline = time.monotonic() + within
        while self.process.isalive():
            if time.monotonic() > deadline:
                raise AssertionError("memchat did not exit\n" + self.text())
            time.sleep(0.02)
        return self.process.exitstatus or 0

    def close(self) -> None:
        if self.process.isalive():
            self.process.terminate(force=True)


def start_memchat(
    database_dsn: str, users: list[str], *, cols: int = 160, rows: int = 48
) -> Terminal:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "LANG": "C.UTF-8",
        "MEMCHAT_CONFIG": os.devnull,
        "MEMCHAT_DATABASE__URL": database_dsn,
        "MEMCHAT_MODEL__PROVIDER": "offline",
        "MEMCHAT_MODEL__OFFLINE_TOKEN_DELAY_MS": "0",
        **{k: v for k, v in os.environ.items() if k.startswith("XDG_")},
    }
    return Terminal([memchat_command(), "--users", ",".join(users)], env, cols, rows)
