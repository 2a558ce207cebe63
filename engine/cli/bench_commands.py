"""``memchat bench``: the benchmarks (``python -m bench``), from a source checkout."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.errors import ConfigError, MemchatError

CHECKOUT = Path(__file__).resolve().parents[2]


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks (same as python -m bench; see docs/benchmarks.md)",
        description="Runs `python -m bench` in the source checkout; every argument is "
        "passed on (`memchat bench -- --help` lists them).",
        epilog="examples:\n  memchat bench\n  memchat bench cost concurrency --users 200 --json\n"
        "  memchat bench -- --help\n\n" + exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the bench")
    # The benchmarks use their own database and settings: a broken settings
    # file is no reason to refuse them.
    bench.set_defaults(handler=bench_command, on_broken_settings=bench_anyway)


async def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    return await _run_bench(args.bench_args)


async def bench_anyway(args: argparse.Namespace, _: ConfigError) -> int:
    return await _run_bench(args.bench_args)


async def _run_bench(bench_args: list[str]) -> int:
    if not (CHECKOUT / "bench" / "cli.py").is_file():
        raise MemchatError(
            "the benchmarks live in memchat's source checkout (bench/), which this "
            "installation does not have: clone the repository and run python -m bench there"
        )
    if bench_args[:1] == ["--"]:
        bench_args = bench_args[1:]
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bench", *bench_args], cwd=CHECKOUT
    )
    return done.returncode
