"""What every scenario shares: a fresh database, the fake model process,
CPU and memory meters, and the shape of a measured point.

Figures are per-run costs or ratios taken within one run, so they stay
meaningful on a noisy machine. CPU is read from the kernel (psutil), never
derived from wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import platformdirs
import psutil

from engine.config import Settings, load_settings
from engine.db import with_database
from engine.db.embedded import EmbeddedServer, start_embedded

REPO = Path(__file__).resolve().parents[1]
BENCH_DATABASE = "memchat_bench"

Figures = dict[str, Any]


@dataclass(slots=True)
class Point:
    """One measured point of a scenario: what was run, what came out, what was wanted."""

    scenario: str
    point: str
    params: dict[str, Any]
    figures: Figures
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)

    def met(self) -> dict[str, bool | None]:
        verdicts: dict[str, bool | None] = {}
        for name, (op, limit) in self.targets.items():
            value = self.figures.get(name)
            if not isinstance(value, int | float):
                verdicts[name] = None
            else:
                verdicts[name] = value <= limit if op == "<=" else value >= limit
        return verdicts

    def as_json(self, machine: dict[str, Any]) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "point": self.point,
            "params": self.params,
            "figures": self.figures,
            "targets": {name: [op, limit] for name, (op, limit) in self.targets.items()},
            "met": self.met(),
            "machine": machine,
        }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a real sample)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- the machine -------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def machine_info(server_version: str) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "postgresql": server_version,
        "platform": platform.platform(terse=True),
        "commit": git_commit(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --- the database ------------------------------------------------------------------


@dataclass(slots=True)
class BenchServer:
    """A PostgreSQL server the bench may create and drop its own database on."""

    dsn: str
    """Superuser DSN (any database)."""
    embedded: EmbeddedServer | None
    version: str = ""

    @property
    def bench_dsn(self) -> str:
        return with_database(self.dsn, BENCH_DATABASE)

    async def fresh_database(self) -> str:
        """Drop and create the bench database: every scenario starts from nothing."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {BENCH_DATABASE}")
            self.version = str(await conn.fetchval("SHOW server_version")).split()[0]
        finally:
            await conn.close()
        return self.bench_dsn

    async def drop_database(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")
        finally:
            await conn.close()


@asynccontextmanager
async def bench_server(dsn: str | None) -> AsyncIterator[BenchServer]:
    """The server at ``dsn``, or the bench's own embedded one (not the user's data)."""
    if dsn is not None:
        server = BenchServer(dsn, None)
    else:
        data_dir = Path(platformdirs.user_cache_dir("memchat")) / "bench-pgdata"
        embedded = await asyncio.to_thread(start_embedded, data_dir)
        server = BenchServer(embedded.dsn, embedded)
    try:
        await server.fresh_database()
        yield server
    finally:
        with contextlib.suppress(Exception):
            await server.drop_database()
        if server.embedded is not None:
            await asyncio.to_thread(server.embedded.release)


def bench_settings(database_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings from defaults plus ``sections`` only: no config file, no environment."""
    env_keys = [k for k in os.environ if k.startswith("MEMCHAT_") or k.startswith("OPENAI_")]
    saved = {k: os.environ.pop(k) for k in env_keys}
    try:
        overrides: dict[str, dict[str, Any]] = {"database": {"url": database_url}}
        for name, values in sections.items():
            overrides.setdefault(name, {}).update(values)
        return load_settings(os.devnull, overrides=overrides)
    finally:
        os.environ.update(saved)


# --- the model ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelTiming:
    latency_ms: float
    token_delay_ms: float
    reply_tokens: int

    def model_settings(self, base_url: str) -> dict[str, Any]:
        return {"provider": "openai", "base_url": base_url, "api_key": "bench", "name": "fake"}


class _ChildProcess:
    """A process the bench starts for a block and stops (SIGTERM, then SIGKILL) after it."""

    stop_within_s = 10.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=self.stop_within_s)
            if self._proc.poll() is None:
                self._proc.kill()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid


class FakeModelProcess(_ChildProcess):
    """``python -m bench.fake_openai`` in its own process, as a real endpoint would be."""

    def __init__(self, timing: ModelTiming) -> None:
        super().__init__()
        self.timing = timing
        self.base_url = ""

    def __enter__(self) -> FakeModelProcess:
        t = self.timing
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.fake_openai",
                "--port",
                "0",
                "--latency-ms",
                str(t.latency_ms),
                "--token-delay-ms",
                str(t.token_delay_ms),
                "--reply-tokens",
                str(t.reply_tokens),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self._proc.kill()
            raise RuntimeError("the fake model server did not start")
        self.base_url = line[1]
        return self


class WorkerProcess(_ChildProcess):
    """``memchat worker`` in its own process: memory jobs off the chat process's core.

    The scale-out shape memchat supports (docs/architecture.md): turns in one
    process, memory jobs in another, both on the same database.
    """

    # Draining running jobs on SIGTERM takes up to memory.drain_timeout.
    stop_within_s = 30.0

    def __init__(self, dsn: str, model: dict[str, Any], concurrency: int) -> None:
        super().__init__()
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MEMCHAT_", "OPENAI_"))},
            "MEMCHAT_CONFIG": os.devnull,
            "MEMCHAT_DATABASE__URL": dsn,
            "MEMCHAT_MEMORY__CONCURRENCY": str(concurrency),
            **{f"MEMCHAT_MODEL__{key.upper()}": str(value) for key, value in model.items()},
        }

    def __enter__(self) -> WorkerProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker"],
            cwd=REPO,
            env=self._env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        return self


# --- meters ------------------------------------------------------------------------


def _cpu_seconds(proc: psutil.Process, *, with_reaped_children: bool = False) -> float:
    times = proc.cpu_times()
    total = times.user + times.system
    if with_reaped_children:
        total += times.children_user + times.children_system
    return total


class PostgresCpu:
    """CPU of a PostgreSQL server: the postmaster, its live children, and the
    children it has already reaped (their time moves into its counters)."""

    def __init__(self, postmaster_pid: int) -> None:
        self._postmaster = psutil.Process(postmaster_pid)

    @classmethod
    async def of(cls, dsn: str) -> PostgresCpu | None:
        conn = await asyncpg.connect(dsn)
        try:
            # Asked while the backend lives: once closed, it may be gone.
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            try:
                parent = psutil.Process(backend).parent()
            except psutil.Error:
                return None  # a server on another host, or in a container
        finally:
            await conn.close()
        return cls(parent.pid) if parent is not None else None

    def seconds(self) -> float:
        total = _cpu_seconds(self._postmaster, with_reaped_children=True)
        for child in self._postmaster.children():
            with contextlib.suppress(psutil.Error):
                total += _cpu_seconds(child)
        return total


@dataclass(slots=True)
class CpuReading:
    memchat_s: float
    postgres_s: float | None
    model_s: float | None
    wall_s: float


class CpuMeter:
    """CPU seconds used by memchat (this process), PostgreSQL and the fake model."""

    def __init__(self, postgres: PostgresCpu | None, model_pid: int | None) -> None:
        self._me = psutil.Process()
        self._postgres = postgres
        self._model = psutil.Process(model_pid) if model_pid else None

    def read(self) -> CpuReading:
        return CpuReading(
            memchat_s=_cpu_seconds(self._me),
            postgres_s=self._postgres.seconds() if self._postgres else None,
            model_s=_cpu_seconds(self._model) if self._model else None,
            wall_s=time.perf_counter(),
        )

    @contextmanager
    def measure(self) -> Iterator[list[CpuReading]]:
        """Yields a list that holds (start, end) readings once the block is done."""
        readings = [self.read()]
        yield readings
        readings.append(self.read())


def used(readings: list[CpuReading]) -> CpuReading:
    start, end = readings
    return CpuReading(
        memchat_s=end.memchat_s - start.memchat_s,
        postgres_s=(
            end.postgres_s - start.postgres_s
            if end.postgres_s is not None and start.postgres_s is not None
            else None
        ),
        model_s=(
            end.model_s - start.model_s
            if end.model_s is not None and start.model_s is not None
            else None
        ),
        wall_s=end.wall_s - start.wall_s,
    )


def rss_mb() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)


class PeakRss:
    """The highest RSS of this process while the block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        self.peak_mb = rss_mb()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak_mb = max(self.peak_mb, rss_mb())

    async def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, rss_mb())
            await asyncio.sleep(0.05)


def median_ms(values: list[float]) -> float:
    return ms(statistics.median(values)) if values else float("nan")
