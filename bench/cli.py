"""``python -m bench``: run the scenarios, print a table (or JSON lines) per point."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from bench import concurrency, cost, freshness, peers, processes, recall, soak
from bench.harness import REPO, BenchServer, Point, bench_server, machine_info
from engine import event_loop
from engine.errors import MemchatError

Scenario = Callable[..., Awaitable[list[Point]]]

SCENARIOS: dict[str, str] = {
    "concurrency": "N users x 2 sessions x 3 turns: wall time against the ideal",
    "cost": "CPU ms per run of memchat and PostgreSQL, SQL statements per run",
    "freshness": "turn completion -> memory visible to a subscriber; the NOTIFY hop",
    "soak": "20,000 runs: RSS and connections stay flat",
    "recall": "10,000 memories vs 50: prompt size, turn CPU; retrieval p95 (1 M rows); "
    "vectors: exact vs HNSW",
    "tui": "keystroke latency while 3 panes stream, opening a long session, RSS",
    "processes": "the same load in 1 and in 2 memchat processes on one PostgreSQL",
    "peers": "the agent framework's cookbook workload beside memchat's (needs agno)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run memchat's benchmarks (all of them unless scenarios are named).",
        epilog="scenarios:\n"
        + "\n".join(f"  {name:<12} {text}" for name, text in SCENARIOS.items())
        + "\n\nexample: python -m bench concurrency --users 200 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    parser.add_argument("--json", action="store_true", help="one JSON object per point")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
    parser.add_argument(
        "--dsn",
        help="PostgreSQL server to use (a superuser DSN; the bench creates and drops its own "
        "database 'memchat_bench'); default: the bench's own embedded server",
    )
    parser.add_argument(
        "--users",
        help="concurrency, processes, peers: comma-separated user counts "
        "(default 10,200,1000; processes and peers: 200)",
    )
    parser.add_argument(
        "--soak-runs", type=int, help="soak: total runs (default 20000, a multiple of 1000)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        print(
            f"python -m bench: error: unknown scenario {unknown[0]!r} "
            f"(choose from {', '.join(SCENARIOS)})",
            file=sys.stderr,
        )
        return 2
    users: list[int] | None = None
    if args.users:
        try:
            users = [int(n) for n in args.users.split(",")]
            if any(n < 1 for n in users):
                raise ValueError
        except ValueError:
            print("python -m bench: error: --users takes numbers like 10,200", file=sys.stderr)
            return 2
    if args.soak_runs is not None and (args.soak_runs < 2000 or args.soak_runs % 1000):
        print(
            "python -m bench: error: --soak-runs must be a multiple of 1000, at least 2000",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.ERROR)
    names = args.scenarios or list(SCENARIOS)
    try:
        return event_loop.run(_run(names, args, users))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemchatError as exc:
        print(f"python -m bench: error: {exc.message}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError, asyncpg.PostgresError) as exc:
        # A server that cannot be reached, a scenario's process that failed.
        print(f"python -m bench: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _run(names: list[str], args: argparse.Namespace, users: list[int] | None) -> int:
    async with bench_server(args.dsn) as server:
        machine = machine_info(server.version)
        if not args.json:
            print(_machine_line(machine, server))
        missed = 0
        for name in names:
            began = time.perf_counter()
            if not args.json:
                print(f"\n== {name}: {SCENARIOS[name]}", flush=True)
            size = "quick" if args.quick else "full size"
            # On stderr, so that --json output stays one object per line.
            print(
                f"bench: running {name} ({size}, about {_expected_s(name, args.quick)} s)...",
                file=sys.stderr,
                flush=True,
            )
            points = await _scenario(name, server, args, users)
            for point in points:
                if args.json:
                    print(json.dumps(point.as_json(machine)), flush=True)
                else:
                    print(_table(point), flush=True)
                missed += sum(1 for ok in point.met().values() if ok is False)
            if not args.json:
                print(f"({name} took {time.perf_counter() - began:.0f}s)", flush=True)
    if not args.json:
        print(f"\n{missed} target(s) missed" if missed else "\nevery target met")
    return 0


async def _scenario(
    name: str, server: BenchServer, args: argparse.Namespace, users: list[int] | None
) -> list[Point]:
    quick: bool = args.quick
    if name == "concurrency":
        return await concurrency.run(server, quick=quick, users=users)
    if name == "cost":
        return await cost.run(server, quick=quick)
    if name == "freshness":
        return await freshness.run(server, quick=quick)
    if name == "soak":
        return await soak.run(server, quick=quick, runs=args.soak_runs)
    if name == "processes":
        return await processes.run(server, quick=quick, users=users)
    if name == "peers":
        return await peers.run(server, quick=quick, users=users)
    if name == "recall":
        return await recall.run(server, quick=quick)
    # In a process of its own, as the app runs for a user: the heap and the
    # garbage collector's state the other scenarios leave behind would
    # otherwise be measured too.
    dsn = await server.fresh_database()
    command = [sys.executable, "-m", "bench.tui_responsiveness", dsn]
    child = await asyncio.create_subprocess_exec(
        *command, *(["--quick"] if quick else []), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the tui scenario failed (exit {child.returncode})")
    return [_point(json.loads(line)) for line in output.decode().splitlines() if line.strip()]


# Seconds each scenario took on the 2-core machine of docs/benchmarks.md
# (recall: mostly loading 1 M memories, on the machine shared with other work).
EXPECTED_S = {
    "concurrency": 45,
    "cost": 12,
    "freshness": 25,
    "soak": 85,
    "tui": 35,
    "processes": 40,
    "peers": 90,
    "recall": 900,
}


def _expected_s(name: str, quick: bool) -> int:
    return 10 if quick else EXPECTED_S[name]


def _point(result: dict[str, Any]) -> Point:
    return Point(
        scenario=str(result["scenario"]),
        point=str(result["point"]),
        params=dict(result["params"]),
        figures=dict(result["figures"]),
        targets={name: (op, float(limit)) for name, (op, limit) in result["targets"].items()},
    )


def _machine_line(machine: dict[str, Any], server: BenchServer) -> str:
    where = "embedded" if server.embedded is not None else "external"
    return (
        f"machine: {machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"PostgreSQL {machine['postgresql']} ({where}), commit {machine['commit']}"
    )


def _table(point: Point) -> str:
    verdicts = point.met()
    params = ", ".join(f"{k}={v}" for k, v in point.params.items())
    rows = [f"-- {point.point} ({params})"]
    width = max(len(name) for name in point.figures)
    for name, value in point.figures.items():
        line = f"   {name:<{width}}  {_shown(value)}"
        if name in point.targets:
            op, limit = point.targets[name]
            verdict = {True: "met", False: "MISSED", None: "n/a"}[verdicts[name]]
            line = f"{line:<{width + 18}}  target {op} {_shown(limit)}: {verdict}"
        rows.append(line)
    return "\n".join(rows)


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    return str(value)
