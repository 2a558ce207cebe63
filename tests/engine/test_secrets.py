"""Secrets stay secret: the API key and the database password, on every way out.

Ways out checked: command output (text and JSON), stderr, `-v` logs, the
error text stored with a failed turn, `memchat config`, `memchat doctor`, and
``repr(settings)``. The embedded PostgreSQL's exposure (Unix socket only,
``listen_addresses`` empty, data dir 0700) is covered by
tests/engine/test_embedded.py::test_fresh_start_reuse_and_clean_stop.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import pytest

from bench.fake_openai import FakeOpenAI
from tests.conftest import make_settings

pytestmark = [pytest.mark.db, pytest.mark.slow]

KEY = "sk-secret-XYZ"
PASSWORD = "hunter2"
UNREACHABLE_DSN = f"postgresql://me:{PASSWORD}@127.0.0.1:1/none"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def memchat(memchat: Run) -> Run:
    """The shared runner, with the recognisable key in the environment."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return memchat(*args, env={"OPENAI_API_KEY": KEY, **(env or {})})

    return run


class _EchoingHandler(BaseHTTPRequestHandler):
    """A careless server: every error message quotes the key it was sent."""

    status = 401

    def _echo(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps(
            {"error": {"message": f"Incorrect API key provided: {key}", "type": "x"}}
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._echo()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._echo()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture(params=[401, 400])
def echoing_server(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Handler", (_EchoingHandler,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def assert_no_secret(*results: subprocess.CompletedProcess[str]) -> None:
    for result in results:
        for stream in (result.stdout, result.stderr):
            assert KEY not in stream, stream
            assert PASSWORD not in stream, stream


def failed_turn_texts(memchat: Run, env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """A failing `chat --json` (with -v logs), then that session's stored history."""
    chat = memchat("-v", "chat", "--user", "alice", "--json", "hello", env=env)
    assert chat.returncode == 1, chat.stderr
    body = json.loads(chat.stdout)
    assert body["status"] == "failed" and body["error"]
    history = memchat("history", "--user", "alice", "--session", body["session_id"], "--json")
    assert history.returncode == 0, history.stderr
    messages = json.loads(history.stdout)["messages"]
    assert messages[-1]["status"] == "failed" and messages[-1]["error"], "error text is stored"
    return [chat, history]


@pytest.mark.parametrize("fault", ["500", "timeout"])
def test_failed_turn_never_shows_the_key(memchat: Run, fake: FakeOpenAI, fault: str) -> None:
    fake.fail_next(fault, count=5)  # type: ignore[arg-type]
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "MEMCHAT_MODEL__MAX_RETRIES": "1",
        "MEMCHAT_MODEL__TIMEOUT": "1",
    }
    results = failed_turn_texts(memchat, env)
    assert "INFO" in results[0].stderr, "-v logs at INFO to stderr"
    assert_no_secret(*results)


def test_server_echoing_the_key_in_errors_is_scrubbed(memchat: Run, echoing_server: str) -> None:
    env = {"OPENAI_BASE_URL": echoing_server, "MEMCHAT_MODEL__MAX_RETRIES": "0"}
    results = failed_turn_texts(memchat, env)
    doctor = memchat("-v", "doctor", env=env)
    doctor_json = memchat("doctor", "--json", env=env)
    assert doctor.returncode == 1 and doctor_json.returncode == 1
    assert "problem  model:" in doctor.stdout
    assert_no_secret(*results, doctor, doctor_json)


def test_config_never_shows_secrets(memchat: Run) -> None:
    env = {"MEMCHAT_DATABASE__URL": f"postgresql://me:{PASSWORD}@db.example:5432/m"}
    text = memchat("config", env=env)
    as_json = memchat("config", "--json", env=env)
    assert text.returncode == 0 and as_json.returncode == 0
    assert "postgresql://me:***@db.example:5432/m" in text.stdout
    assert json.loads(as_json.stdout)["settings"]["model"]["api_key"] == "***"
    assert_no_secret(text, as_json)


def test_doctor_never_shows_secrets(memchat: Run, fake: FakeOpenAI) -> None:
    healthy = {"OPENAI_BASE_URL": fake.base_url}
    refused = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    runs = [
        memchat("-v", "doctor", env=healthy),
        memchat("doctor", "--json", env=healthy),
        memchat("-v", "doctor", env=refused),
        memchat("doctor", "--json", env=refused),
    ]
    assert [r.returncode for r in runs] == [0, 0, 1, 1], [r.stdout for r in runs]
    assert_no_secret(*runs)


def test_database_password_is_redacted_in_doctor_and_error_lines(memchat: Run) -> None:
    env = {"MEMCHAT_DATABASE__URL": UNREACHABLE_DSN, "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2"}
    doctor = memchat("doctor", env=env)
    doctor_json = memchat("doctor", "--json", env=env)
    chat = memchat("-v", "chat", "--user", "alice", "hi", env=env)
    assert doctor.returncode == 1 and chat.returncode == 4
    assert "postgresql://me:***@127.0.0.1:1/none" in doctor.stdout
    assert "postgresql://me:***@127.0.0.1:1/none" in chat.stderr
    assert_no_secret(doctor, doctor_json, chat)


def test_settings_repr_hides_secrets(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        model={"api_key": KEY},
        database={"url": f"postgresql://me:{PASSWORD}@db.example/m"},
    )
    for text in (repr(settings), str(settings), repr(settings.model), repr(settings.database)):
        assert KEY not in text and PASSWORD not in text
    dumped = settings.model_dump_json()
    assert KEY not in dumped and PASSWORD not in dumped


QUERY_DSN = f"postgresql://me@127.0.0.1:1/none?password={PASSWORD}"


def test_doctor_scrubs_a_password_given_as_a_query_parameter(memchat: Run) -> None:
    env = {"MEMCHAT_DATABASE__URL": QUERY_DSN, "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2"}
    doctor = memchat("doctor", env=env)
    assert doctor.returncode == 1 and "password=***" in doctor.stdout
    assert_no_secret(doctor)


def test_config_and_error_lines_redact_a_query_parameter_password(memchat: Run) -> None:
    env = {"MEMCHAT_DATABASE__URL": QUERY_DSN, "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2"}
    assert_no_secret(memchat("config", env=env), memchat("users", env=env))


# -- finding 8 of issue 12: every DSN form, model URL secrets, prefix-less echoes ----

ODD_PASSWORD = "hun/ter#2?x"
ODD_DSNS = [
    # libpq keyword form, bare and quoted
    f"host=127.0.0.1 port=1 user=me password={PASSWORD} dbname=none",
    f"host=127.0.0.1 port=1 user=me password='{PASSWORD} x' dbname=none",
    # a URL whose password holds / # ? unescaped
    f"postgresql://me:{ODD_PASSWORD}@127.0.0.1:1/none",
]


@pytest.mark.parametrize("dsn", ODD_DSNS)
def test_odd_dsns_are_redacted_everywhere_and_refused_in_one_line(memchat: Run, dsn: str) -> None:
    env = {"MEMCHAT_DATABASE__URL": dsn, "MEMCHAT_DATABASE__CONNECT_TIMEOUT": "2"}
    runs = [
        memchat("config", env=env),
        memchat("config", "--json", env=env),
        memchat("doctor", env=env),
        memchat("doctor", "--json", env=env),
        memchat("-v", "users", env=env),
        memchat("-v", "chat", "--user", "alice", "hi", env=env),
    ]
    assert [r.returncode for r in runs] == [0, 0, 1, 1, 2, 2], [r.stderr for r in runs]
    for result in runs:
        for stream in (result.stdout, result.stderr):
            assert PASSWORD not in stream and "ter#2" not in stream, stream
            assert "Traceback" not in stream, stream
    for refused in runs[4:]:
        assert "database.url must be a postgresql://" in refused.stderr
        assert len([ln for ln in refused.stderr.splitlines() if "INFO" not in ln]) == 1


def test_config_hides_model_url_credentials_and_query_secrets(memchat: Run) -> None:
    url = "https://llm.example/v1?api-version=1&api_key=qsecret123&sig=sigsecret1"
    shown = memchat("config", "--json", env={"OPENAI_BASE_URL": url})
    assert shown.returncode == 0, shown.stderr
    base_url = json.loads(shown.stdout)["settings"]["model"]["base_url"]
    assert base_url == "https://llm.example/v1?api-version=1&api_key=***&sig=***"
    assert "qsecret123" not in shown.stdout and "sigsecret1" not in shown.stdout


async def _stored_errors(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT error FROM messages WHERE error IS NOT NULL")
    finally:
        await conn.close()
    return [row["error"] for row in rows]


class _PrefixlessEchoHandler(_EchoingHandler):
    """Echoes the key with its ``sk-`` prefix cut off, as some proxies do."""

    def _echo(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ").removeprefix("sk-")
        body = json.dumps({"error": {"message": f"bad key '{key}'", "type": "x"}}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_key_echoed_without_its_prefix_is_not_stored_or_shown(
    memchat: Run, database_dsn: str
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PrefixlessEchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        env = {"OPENAI_BASE_URL": url, "MEMCHAT_MODEL__MAX_RETRIES": "0"}
        results = failed_turn_texts(memchat, env)
    finally:
        server.shutdown()
        server.server_close()
    bare = KEY.removeprefix("sk-")
    # The row itself, not output (which is scrubbed on the way out as well).
    stored = asyncio.run(_stored_errors(database_dsn))
    assert stored and all("bad key" in e and bare not in e for e in stored), stored
    for result in results:
        assert bare not in result.stdout and bare not in result.stderr
