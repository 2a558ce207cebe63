"""Run ``memchat`` as a user would (a subprocess), timing what the real model does."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SETTLED = ("done", "failed")


@dataclass
class ChatRun:
    """One ``memchat chat``: what streamed, when, and how the process ended."""

    user: str
    text: str
    code: int
    stdout: str
    stderr: str
    reads: int
    """How many separate reads of stdout brought text: more than one means it streamed."""
    started_wall: float
    ttft_s: float | None
    total_s: float


@dataclass
class Memchat:
    """``python -m engine.cli`` on one database, with the model settings in ``env``."""

    database_url: str
    config: Path
    env: dict[str, str] = field(default_factory=dict)

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MEMCHAT_DATABASE__URL": self.database_url,
            "MEMCHAT_CONFIG": str(self.config),
            **self.env,
        }

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", *args],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str, timeout: float = 600) -> Any:
        done = self.run(*args, "--json", timeout=timeout)
        assert done.returncode == 0, f"memchat {' '.join(args)} --json: {done.stderr.strip()}"
        return json.loads(done.stdout)

    def chat(self, user: str, text: str, *, timeout: float = 900) -> ChatRun:
        """``memchat chat --user USER TEXT``, reading stdout as it comes."""
        started_wall = time.time()
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "chat", "--user", user, text],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
        )
        assert process.stdout is not None and process.stderr is not None
        out = bytearray()
        err = bytearray()
        reads = 0
        ttft: float | None = None
        streams = {process.stdout.fileno(): out, process.stderr.fileno(): err}
        deadline = started + timeout
        while streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                raise AssertionError(f"memchat chat did not finish within {timeout:g}s")
            ready, _, _ = select.select(list(streams), [], [], min(remaining, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                streams[fd].extend(chunk)
                if fd == process.stdout.fileno() and chunk.strip():
                    reads += 1
                    if ttft is None:
                        ttft = time.monotonic() - started
        code = process.wait()
        return ChatRun(
            user=user,
            text=text,
            code=code,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            reads=reads,
            started_wall=started_wall,
            ttft_s=round(ttft, 2) if ttft is not None else None,
            total_s=round(time.monotonic() - started, 2),
        )

    def jobs(self, user: str | None = None) -> list[dict[str, Any]]:
        args = ["jobs", "--limit", "1000"]
        if user is not None:
            args += ["--user", user]
        return self.json(*args)

    def memories(self, user: str) -> list[dict[str, Any]]:
        return self.json("memories", "--user", user)

    def history(self, user: str) -> list[dict[str, Any]]:
        """Every message of the user's newest session, oldest first."""
        sessions = self.json("sessions", "--user", user)
        assert sessions, f"{user} has no session"
        found = self.json(
            "history", "--user", user, "--session", sessions[0]["session_id"], "--limit", "1000"
        )
        return found["messages"]


def seconds(value: str | None) -> float | None:
    """An ISO timestamp (as memchat's JSON has them) as epoch seconds."""
    return datetime.fromisoformat(value).timestamp() if value else None


def turn_timings(run: ChatRun, job: dict[str, Any] | None) -> dict[str, Any]:
    """Per-turn figures: first streamed text, reply stored (the job is created with the
    reply), the extraction's own duration and the whole command."""
    timings: dict[str, Any] = {
        "text": run.text,
        "ttft_s": run.ttft_s,
        "total_s": run.total_s,
        "stdout_reads": run.reads,
    }
    if job is not None:
        created = seconds(job.get("created_at"))
        begun, ended = seconds(job.get("started_at")), seconds(job.get("finished_at"))
        timings["reply_s"] = round(created - run.started_wall, 2) if created else None
        timings["extraction_s"] = round(ended - begun, 2) if begun and ended else None
        timings["job"] = {
            k: job.get(k)
            for k in (
                "job_id",
                "status",
                "attempts",
                "extraction",
                "last_error",
                "note",
                "prompt_tokens",
                "completion_tokens",
            )
        }
    return timings


async def audit(database_url: str, tmp_path: Path) -> list[str]:
    """engine.audit's invariants over the whole database: every turn has one outcome,
    every completed reply one settled job, no leak, no duplicate. Problem lines."""
    from engine.audit import audit_invariants
    from engine.db import Database
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, database={"url": database_url})
    db = await Database.open(settings)
    try:
        found = await audit_invariants(db)
    finally:
        await db.close()
    return [f"audit: {line}" for line in found.problems]
