"""Red-team findings against the model-endpoint surfaces of issue 11 (all real:
real `memchat` processes, real PostgreSQL, a real hostile HTTP server).

Each test fails on the current main and states what should happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI
from tests.redteam.hostile import HostileServer

pytestmark = [pytest.mark.db, pytest.mark.slow]

KEY = "sk-users-own-real-key-123456"
MEMORY_KEY = "sk-memory-endpoint-key-987654"


def run(
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k != "MEMCHAT_CONFIG" and not k.startswith("MEMCHAT_MODEL") and k != "OPENAI_API_KEY"
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


# -- Finding 1 (HIGH): ./config.toml may set memory.base_url ------------------------------


def test_config_in_the_current_directory_cannot_redirect_memory_extraction(
    tmp_path: Path, database_dsn: str
) -> None:
    """A cloned repository's config.toml sets [memory] base_url: every turn (the user's
    message, the reply and the user's memories) goes to the attacker's endpoint.
    memory.base_url decides where data goes exactly like model.base_url, so an implicit
    file must be refused the same way (engine.config.REDIRECTING_KEYS)."""
    with FakeOpenAI() as legit, FakeOpenAI() as attacker:
        repo = tmp_path / "cloned-repo"
        repo.mkdir()
        (repo / "config.toml").write_text(f'[memory]\nbase_url = "{attacker.base_url}"\n')
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "OPENAI_API_KEY": KEY,
            "MEMCHAT_MODEL__BASE_URL": legit.base_url,
        }
        result = run(repo, "chat", "--user", "alice", "my bank PIN is 4921", env=env)
        leaked = [json.dumps(r) for r in attacker.requests if "4921" in json.dumps(r)]
        assert attacker.accepted_connections == 0 and not leaked, (
            f"the hostile endpoint from ./config.toml received {len(attacker.requests)} "
            f"request(s), {len(leaked)} holding the user's message (rc={result.returncode})"
        )
        assert result.returncode == 2
        assert "memory.base_url" in result.stderr


# -- Finding 2 (MEDIUM): memory.api_key and memory.base_url secrets are not redacted ------


def test_memory_endpoint_key_echoed_without_its_prefix_is_not_stored_or_shown(
    tmp_path: Path, database_dsn: str
) -> None:
    """engine.redact.remember_secrets remembers model.api_key only; memory.api_key (and
    secrets in memory.base_url) are not scrubbed: an endpoint echoing the key without
    `sk-` gets it into memory_jobs.last_error, `memchat jobs`, the CLI's warning, and
    logs."""
    with FakeOpenAI() as chat, HostileServer({"default": "echo_auth_400"}) as memory:
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__BASE_URL": chat.base_url,
            "MEMCHAT_MODEL__API_KEY": KEY,
            "MEMCHAT_MEMORY__BASE_URL": memory.base_url,
            "MEMCHAT_MEMORY__API_KEY": MEMORY_KEY,
            "MEMCHAT_MEMORY__EXTRACTION": "tools",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        turn = run(tmp_path, "-v", "chat", "--user", "alice", "I like tea", env=env)
        jobs = run(tmp_path, "jobs", "--json", env=env)
        bare = MEMORY_KEY[3:]
        assert memory.requests, "the memory endpoint was not asked"
        assert bare not in turn.stderr, "memchat chat (stderr) shows the memory key"
        assert bare not in jobs.stdout, "memchat jobs shows the memory key"


def test_config_hides_memory_url_query_secrets(tmp_path: Path) -> None:
    """`memchat config` redacts secrets of model.base_url but prints memory.base_url raw."""
    env = {
        "MEMCHAT_MODEL__BASE_URL": "http://127.0.0.1:9/v1?api_key=CHATSECRET99",
        "MEMCHAT_MEMORY__BASE_URL": "http://u:MEMPASSWORD99@127.0.0.1:9/v1?api_key=MEMSECRET99",
    }
    result = run(tmp_path, "config", env=env)
    assert result.returncode == 0, result.stderr
    assert "CHATSECRET99" not in result.stdout
    assert "MEMSECRET99" not in result.stdout, "memory.base_url's api_key shown by config"
    assert "MEMPASSWORD99" not in result.stdout, "memory.base_url's password shown by config"


# -- Finding 3 (MEDIUM): the API key lands in endpoint-modes.json --------------------------


def test_key_echoed_during_the_probe_is_not_written_to_endpoint_modes(
    tmp_path: Path, database_dsn: str
) -> None:
    """auto's probe stores the endpoint's refusal text as the learnt "reason" in
    ~/.local/state/memchat/endpoint-modes.json without engine.redact.scrub: the key
    without its prefix is written to disk."""
    with HostileServer({"probe_forced": "echo_auth_400"}) as server:
        state = tmp_path / "state"
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__BASE_URL": server.base_url,
            "MEMCHAT_MODEL__NAME": "x",
            "MEMCHAT_MODEL__API_KEY": KEY,
            "XDG_STATE_HOME": str(state),
        }
        result = run(tmp_path, "chat", "--user", "alice", "hello", env=env)
        assert result.returncode == 0, result.stderr
        modes = (state / "memchat" / "endpoint-modes.json").read_text()
        assert "refused" in modes
        assert KEY[3:] not in modes, f"the API key is in endpoint-modes.json: {modes}"


# -- Finding 4 (MEDIUM): model.timeout is not a bound on a request --------------------------


def test_a_trickling_stream_cannot_hold_a_turn_forever(tmp_path: Path, database_dsn: str) -> None:
    """model.timeout is documented as "Seconds per model request", but it is a per-read
    timeout: a server sending an SSE comment every 0.5 s (or a <think> that never
    closes, or whitespace deltas) holds `memchat chat` forever; max_reply_chars never
    triggers because no text is yielded."""
    with HostileServer({"stream": "slowloris"}) as server:
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__BASE_URL": server.base_url,
            "MEMCHAT_MODEL__NAME": "x",
            "MEMCHAT_MODEL__TIMEOUT": "2",
            "MEMCHAT_MODEL__MAX_RETRIES": "0",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        started = time.monotonic()
        try:
            result = run(tmp_path, "chat", "--user", "alice", "hi", env=env, timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail("memchat chat still streaming after 40 s with model.timeout = 2")
        assert result.returncode == 1
        assert time.monotonic() - started < 30


def test_memchat_chat_waits_for_its_memory_job_at_most_the_drain_timeout(
    tmp_path: Path, database_dsn: str
) -> None:
    """`memchat chat` runs its own job "within the drain timeout" (chat_commands), but
    WorkerPool.run_own_jobs checks the deadline only between jobs: a memory endpoint
    that trickles its body keeps the process (and the job, whose lease the heartbeat
    extends) running forever."""
    with FakeOpenAI() as chat, HostileServer({"tools": "slowloris", "json": "slowloris"}) as memory:
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__BASE_URL": chat.base_url,
            "MEMCHAT_MEMORY__BASE_URL": memory.base_url,
            "MEMCHAT_MEMORY__EXTRACTION": "tools",
            "MEMCHAT_MEMORY__TIMEOUT": "2",
            "MEMCHAT_MEMORY__DRAIN_TIMEOUT": "3",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        try:
            result = run(tmp_path, "chat", "--user", "alice", "I like tea", env=env, timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail("memchat chat still waiting for its memory job after 40 s")
        assert result.returncode == 0, result.stderr


# -- Finding 5 (LOW): doctor crashes on a /models answer without "data" --------------------


def test_doctor_survives_a_models_answer_without_data(tmp_path: Path, database_dsn: str) -> None:
    """GET /models answered 200 `{}`: model_check does `[m.id for m in page.data]` on
    None, the TypeError escapes, doctor prints a traceback and no check at all."""
    with HostileServer({"models": ("json", {})}) as server:
        env = {
            "MEMCHAT_DATABASE__URL": database_dsn,
            "MEMCHAT_MODEL__BASE_URL": server.base_url,
            "MEMCHAT_MODEL__NAME": "x",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        result = run(tmp_path, "doctor", "--no-probe", env=env)
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "model" in result.stdout
