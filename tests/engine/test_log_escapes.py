"""Finding 7 of issue 12: no terminal escape reaches stderr through logging.

A real ``memchat -v chat`` process talks to a real HTTP server whose error
text carries an OSC 0 (set window title), an OSC 52 (write the clipboard)
and a CSI sequence. The memory job fails with that text and logs it; the
bytes on the process's stderr must hold no ESC, BEL or C1 control, only
their visible escapes.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.logsafe import SafeFormatter

pytestmark = [pytest.mark.db, pytest.mark.slow]

HOSTILE = "\x1b]0;pwned-title\x07 \x1b]52;c;ZWNobyBwd25lZA==\x07 \x1b[2J\x9b31m"
Run = Callable[..., subprocess.CompletedProcess[str]]


class _HostileHandler(BaseHTTPRequestHandler):
    """Streams a normal reply to a chat turn; answers memory extraction with HTTP 400."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if body.get("stream"):
            chunks = [
                {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            payload = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            self._send(200, "text/event-stream", payload.encode())
            return
        error = {"error": {"message": f"upstream exploded: {HOSTILE}", "type": "server_error"}}
        self._send(400, "application/json", json.dumps(error).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def hostile_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def assert_no_raw_controls(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    raw = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not raw, f"raw control characters on stderr: {raw!r}"


def test_model_error_text_in_log_lines_is_shown_not_obeyed(
    memchat: Run, hostile_server: str, database_dsn: str
) -> None:
    env = {
        "OPENAI_BASE_URL": hostile_server,
        "OPENAI_API_KEY": "sk-anything-1234",
        "MEMCHAT_MODEL__MAX_RETRIES": "0",
        "MEMCHAT_MEMORY__MAX_ATTEMPTS": "1",
    }
    result = memchat("-v", "chat", "--user", "alice", "hi", env=env, binary=True)
    assert result.returncode == 0, result.stderr
    assert b"upstream exploded" in result.stderr, "the job's failure is logged"
    assert_no_raw_controls(result.stderr)
    assert b"\\x1b]0;pwned-title\\x07" in result.stderr
    assert b"\\x1b]52;c;" in result.stderr


def test_formatter_renders_exception_text_literally() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("memchat.test.logsafe")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"library says {HOSTILE}")
        except RuntimeError:
            logger.exception("failed with %s", HOSTILE)
    finally:
        logger.removeHandler(handler)
    assert_no_raw_controls(stream.getvalue().encode())
    assert stream.getvalue().count("\\x1b]52;c;") == 2  # message and traceback


def test_unexpected_error_in_the_cli_is_logged_literally(memchat: Run) -> None:
    # An unparseable DSN used to end in Python's raw traceback.
    env = {"MEMCHAT_DATABASE__URL": "postgresql://me:pa/ss#w?rd@127.0.0.1:1/x"}
    result = memchat("users", env=env, binary=True)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert b"pa/ss" not in result.stderr and b"w?rd" not in result.stderr
    assert_no_raw_controls(result.stderr)
