"""`memchat scenario load --processes N`: real memchat processes on one real PostgreSQL.

Each test runs the command as a user would (a subprocess), whose parts are
memchat processes of their own; the parent's audit is checked, and then the
database is audited again from here (engine/audit.py's invariants: every turn
has one outcome, every job settled once, no row reachable from another scope).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI
from engine.admin import AdminReader
from engine.audit import audit_invariants
from engine.config import Settings, load_settings
from engine.db import Database
from engine.load_processes import LoadProcessError, Share, run_load_processes, shares
from engine.runtime import open_runtime
from tests.conftest import Run

CLEAN = {"leaks": 0, "lost": 0, "duplicates": 0, "failed_jobs": 0, "failed_turns": 0}


def _figures(body: dict[str, object]) -> dict[str, object]:
    return {name: body[name] for name in CLEAN}


def test_shares_split_users_evenly_and_contiguously() -> None:
    assert shares(5, 2) == [Share(0, 3), Share(3, 2)]
    assert shares(50, 3) == [Share(0, 17), Share(17, 17), Share(34, 16)]
    assert sum(s.users for s in shares(1000, 7)) == 1000
    with pytest.raises(ValueError):
        shares(1, 2)


@pytest.mark.db
def test_bad_process_counts_are_one_line(memchat: Run) -> None:
    for args, said in (
        (("--processes", "0"), "--processes must be at least 1"),
        (("--users", "2", "--processes", "3"), "--processes must not exceed --users"),
        (("--workers", "-1"), "--workers at least 0"),
    ):
        result = memchat("scenario", "load", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and said in result.stderr


@pytest.mark.db
async def test_a_part_that_dies_before_ready_is_reported(settings: Settings) -> None:
    # A real process that exits at once, as a part whose settings broke would.
    async with open_runtime(settings, run_workers=False) as rt:
        with pytest.raises(LoadProcessError, match=r"exited with 3 before 'ready'"):
            await run_load_processes(
                rt, 4, 1, 1, 2, memchat=[sys.executable, "-c", "import sys; sys.exit(3)"]
            )


async def _audit_again(database_dsn: str, tmp_path: Path) -> tuple[set[str], int]:
    """The invariants, read here; returns the job workers and the jobs counted."""
    config = tmp_path / "audit.toml"
    config.touch()
    settings = load_settings(config, overrides={"database": {"url": database_dsn}})
    db = await Database.open(settings)
    try:
        report = await audit_invariants(db, scope_sample=60)
        report.assert_ok()
        jobs = await AdminReader(db).list_jobs(limit=100_000)
    finally:
        await db.close()
    assert all(job.status == "done" for job in jobs)
    return {job.worker.rsplit(":", 1)[0] for job in jobs if job.worker}, len(jobs)


@pytest.mark.db
@pytest.mark.slow
async def test_two_processes_60_users_offline_audit_clean(
    memchat: Run, database_dsn: str, tmp_path: Path
) -> None:
    result = memchat(
        "scenario", "load", "--users", "60", "--sessions", "2", "--turns", "2", "--processes", "2"
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["processes"], body["workers"], body["users"], body["runs"]) == (2, 0, 60, 240)
    assert _figures(body) == CLEAN and body["open_jobs"] == 0
    assert body["memories"] >= 60  # each user said its name: one memory at least
    assert len(body["cpu_s_per_process"]) == 2 and min(body["cpu_s_per_process"]) > 0
    workers, jobs = await _audit_again(database_dsn, tmp_path)
    assert jobs == 240  # one job per reply, each settled once (audited above)
    # The jobs were run by the parts (host:pid:tag), not by the parent alone.
    assert len(workers) >= 2


@pytest.mark.db
@pytest.mark.slow
async def test_processes_and_a_worker_over_http_audit_clean(
    memchat: Run, database_dsn: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-test-key",
        "MEMCHAT_MODEL__NAME": "fake",
    }
    args = ("--users", "50", "--sessions", "1", "--turns", "2", "--processes", "2")
    result = memchat("scenario", "load", *args, "--workers", "1", env=env)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["processes"], body["workers"], body["runs"]) == (2, 1, 100)
    assert _figures(body) == CLEAN and body["open_jobs"] == 0
    assert len(body["cpu_s_per_process"]) == 3
    _, jobs = await _audit_again(database_dsn, tmp_path)
    assert jobs == 100
    # Every turn and every memory job went over HTTP to the one fake server:
    # 100 replies, and at least one extraction per user (a run may take the
    # user's second turn along: memory.coalesce_turns), so not 200 exactly.
    assert fake.request_count >= 100 + 50


@pytest.mark.slow
def test_embedded_database_is_shared_by_every_process(embedded_base: Path) -> None:
    # No database.url: the parent starts the embedded server, its parts reach
    # the same one through the data dir's socket and credentials file.
    config = embedded_base / "config.toml"
    config.write_text(f'[database]\ndata_dir = "{embedded_base / "pgdata"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMCHAT_", "OPENAI_"))}
    load = ["--users", "50", "--sessions", "1", "--turns", "1", "--processes", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--config", str(config), "scenario", "load", *load],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["processes"] == 2 and body["runs"] == 50
    assert _figures(body) == CLEAN and body["open_jobs"] == 0
