"""Fixtures for the real-model tests: two llama.cpp servers and a results report.

The servers are session-scoped: one with ``--chat_format
chatml-function-calling`` (tools work), one with the model's own chat format
(no tools). A fixture that cannot have its server skips with one line saying
why. What the tiny model did (memories per extraction mode, per-turn timings)
is figures, not pass conditions: it is printed at the end of the run and
written to ``.cache/real-model/summary.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.real_model.harness import (
    ENABLED,
    MODEL_ALIAS,
    MODEL_FILE,
    N_CTX,
    REPO,
    SKIP_REASON,
    SUMMARY,
    THREADS,
    LlamaServer,
    NotAvailable,
    prepared,
)

FUNCTION_CALLING = "chatml-function-calling"

# Small replies keep a run short on a shared 2-core machine.
REPLY_MAX_TOKENS = 64
EXTRACTION_MAX_TOKENS = 192
# A slow shared machine: a memory request may queue behind a reply on the
# single-slot server; the chat waits this long for its own turn's job.
MODEL_TIMEOUT_S = 120
DRAIN_TIMEOUT_S = 300


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_model: drives memchat through a real small model (llama.cpp server); "
        "runs only with `make test-real-model`",
    )


def model_env(server: LlamaServer, extraction: str) -> dict[str, str]:
    """memchat's settings for this server, as a user would give them: environment variables."""
    return {
        "MEMCHAT_MODEL__BASE_URL": server.base_url,
        "MEMCHAT_MODEL__NAME": MODEL_ALIAS,
        "MEMCHAT_MODEL__CONTEXT_TOKENS": str(N_CTX),
        "MEMCHAT_MODEL__MAX_TOKENS": str(REPLY_MAX_TOKENS),
        "MEMCHAT_MODEL__TIMEOUT": str(MODEL_TIMEOUT_S),
        # Repeatable figures: the same answers run after run (on one machine).
        "MEMCHAT_MODEL__TEMPERATURE": "0",
        "MEMCHAT_MEMORY__EXTRACTION": extraction,
        "MEMCHAT_MEMORY__MAX_TOKENS": str(EXTRACTION_MAX_TOKENS),
        "MEMCHAT_MEMORY__PAUSE_WHILE_STREAMING": "true",
        "MEMCHAT_MEMORY__DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S),
        "MEMCHAT_MEMORY__RETRY_DELAY": "0.5",
    }


@dataclass
class Report:
    """What the run measured; written as JSON and printed at the end."""

    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    runs: list[dict[str, Any]] = field(default_factory=list)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, **run: Any) -> None:
        self.runs.append(run)
        self.write()

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": MODEL_FILE,
            "n_ctx": N_CTX,
            "threads": THREADS,
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "commit": _commit(),
            "servers": self.servers,
            "memories_by_mode": self.memories_by_mode(),
            "runs": self.runs,
        }

    def memories_by_mode(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for run in self.runs:
            if "memories" in run and "extraction" in run:
                key = f"{run['server']}/{run['extraction']}"
                if run.get("kind") != "chat":
                    key += f" ({run['kind']})"
                totals[key] = totals.get(key, 0) + len(run["memories"])
        return totals

    def write(self) -> None:
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")

    def lines(self) -> list[str]:
        out = [f"real model: {MODEL_FILE}, n_ctx {N_CTX}, {THREADS} threads"]
        for run in self.runs:
            head = f"{run['server']:<24} {run.get('extraction', ''):<5} {run['kind']:<5}"
            memories = run.get("memories")
            count = f"{len(memories)} memories" if memories is not None else ""
            jobs = f"jobs {run['job_states']}" if "job_states" in run else ""
            if run["kind"] == "doctor":
                jobs = f"exit {run['exit']} in {run['seconds']}s"
            elif run["kind"] == "auto":
                jobs = f"chose {run['chosen']}"
            out.append(f"  {head} {count:<12} {jobs}  {run.get('problems') or ''}".rstrip())
            for turn in run.get("turns", ()):
                figures = ", ".join(
                    f"{key} {turn[key]}s" for key in TIMINGS if turn.get(key) is not None
                )
                out.append(f"      {turn.get('text', '')[:40]!r}: {figures}")
                job = turn.get("job") or {}
                if job.get("note") or job.get("last_error"):
                    says = job.get("last_error") or job.get("note")
                    out.append(f"        job {job.get('job_id')} {job.get('status')}: {says}")
        out.append("memories extracted per server/mode: " + json.dumps(self.memories_by_mode()))
        out.append(f"summary: {SUMMARY}")
        return out


_REPORT: Report | None = None
TIMINGS = ("ttft_s", "first_text_s", "reply_s", "extraction_s", "job_settled_s", "total_s")


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


@pytest.fixture(scope="session")
def report() -> Report:
    global _REPORT
    if _REPORT is None:
        _REPORT = Report()
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT is None or not _REPORT.runs:
        return
    _REPORT.write()
    terminalreporter.section("real model results (figures, not pass conditions)")
    for line in _REPORT.lines():
        terminalreporter.write_line(line)


def require_real_model() -> None:
    """Skip the calling test module, in one line, unless the real model can run:
    enabled (REAL_MODEL_TESTS=1), llama-cpp-python installed and the model here."""
    if not ENABLED:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    try:
        prepared()
    except NotAvailable as exc:
        pytest.skip(f"real model not available: {exc}", allow_module_level=True)


@pytest.fixture(scope="session")
def real_model() -> tuple[Path, Path]:
    """(python of the llama.cpp venv, the GGUF file), installed on first use."""
    if not ENABLED:
        pytest.skip(SKIP_REASON)
    try:
        return prepared()
    except NotAvailable as exc:
        pytest.skip(f"real model not available: {exc}")


def _serve(real_model: tuple[Path, Path], chat_format: str | None, report: Report) -> LlamaServer:
    python, model = real_model
    server = LlamaServer(python, model, chat_format)
    started = time.perf_counter()
    try:
        server.start()
    except NotAvailable as exc:
        pytest.skip(f"real model server cannot start: {exc}")
    report.servers[server.name] = {
        "chat_format": chat_format,
        "ready_s": round(time.perf_counter() - started, 2),
        "log": str(server.log_path),
    }
    return server


@pytest.fixture(scope="session")
def fc_server(real_model: tuple[Path, Path], report: Report) -> Iterator[LlamaServer]:
    """llama.cpp with ``--chat_format chatml-function-calling``: tool calls work."""
    server = _serve(real_model, FUNCTION_CALLING, report)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plain_server(real_model: tuple[Path, Path], report: Report) -> Iterator[LlamaServer]:
    """llama.cpp with the model's own chat format: no function calling."""
    server = _serve(real_model, None, report)
    yield server
    server.stop()


SERVERS = {"fc": "fc_server", "plain": "plain_server"}


@pytest.fixture
def server(request: pytest.FixtureRequest) -> LlamaServer:
    """The server a parametrized test names ("fc" or "plain")."""
    return request.getfixturevalue(SERVERS[request.param])
