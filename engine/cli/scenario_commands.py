"""``memchat scenario seed|load``: scripted conversations on the full runtime."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from engine.cli.output import one_line, print_json, say, warn
from engine.cli.resources import open_chat_runtime, open_full_runtime
from engine.config import Settings
from engine.errors import InvalidInput
from engine.load_processes import Share, run_load_processes, run_part
from engine.scenarios import JobReport, SeedResult, run_load, run_seed
from engine.validation import printable


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    scenario = commands.add_parser(
        "scenario",
        help="run a scripted multi-user conversation (seed) or a load",
        epilog="examples:\n  memchat scenario seed\n"
        "  memchat scenario load --users 200 --sessions 2 --turns 3\n"
        "  memchat scenario load --users 200 --processes 2\n\n" + exit_codes,
        formatter_class=fmt,
    )
    kinds = scenario.add_subparsers(dest="scenario", metavar="NAME", required=True)
    seed = kinds.add_parser(
        "seed",
        help="three users at once, the agent-framework example's script (resets those users)",
        description=(
            "Run the seed script, wait for its memory jobs, print each user's memories. "
            "Failed turns (with their errors) and memory jobs that failed or are still "
            "pending are listed; then the exit code is 1."
        ),
        epilog=exit_codes,
        formatter_class=fmt,
    )
    seed.add_argument("--json", action="store_true", help="print one JSON object")
    seed.set_defaults(handler=seed_command)
    load = kinds.add_parser(
        "load",
        help="N users x S sessions x T turns at once, then a leak/loss audit (one JSON line)",
        description=(
            "Run the load, wait for every memory job, audit, print one JSON line. Exit 1 "
            "(with one line on stderr) when turns or memory jobs failed, jobs are still open, "
            "or the audit found leaks, lost jobs or duplicates; the most frequent errors are "
            "in turn_errors and job_errors."
        ),
        epilog=exit_codes,
        formatter_class=fmt,
    )
    load.add_argument("--users", type=int, default=10)
    load.add_argument("--sessions", type=int, default=2)
    load.add_argument("--turns", type=int, default=3)
    load.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="simulated model latency per call (offline model only)",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=1,
        help="spread the users over N memchat processes on the same database, each with "
        "its own memory workers; one audit across all (the clock starts once every "
        "process has made its users' sessions)",
    )
    load.add_argument(
        "--workers",
        type=int,
        default=0,
        help="with --processes: also run N `memchat worker` processes on the same queue",
    )
    # The protocol of engine/load_processes.py: what each of those processes runs.
    load.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    load.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    load.add_argument("--wait-within", type=float, default=600.0, help=argparse.SUPPRESS)
    load.set_defaults(handler=load_command, settings_overrides=load_overrides)


async def seed_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_full_runtime(settings) as rt:
        result = await run_seed(rt)
    if args.json:
        print_json(result.as_json())
    else:
        _print_seed(result)
    problem = result.problem()
    if problem:
        warn(f"error: seed: {problem}")
    return 1 if problem else 0


def _print_seed(result: SeedResult) -> None:
    for number, (user_id, memories) in enumerate(result.memories.items(), start=1):
        say(f"User {number}'s memories ({user_id}):")
        for index, text in enumerate(memories, start=1):
            say(f"  {index}. {text}")
        if not memories:
            say("  (none)")
    if result.turn_failures:
        say("\nFailed turns:")
        for turn in result.turn_failures:
            say(f"  {turn.user_id} {turn.session}: {printable(turn.text)}: {one_line(turn.error)}")
    for title, jobs in (
        ("Memory jobs not done", result.unsettled_jobs),
        ("Memory job notes", result.job_notes),
    ):
        if jobs:
            say(f"\n{title}:")
            for job in jobs:
                say(f"  job {job.job_id} {job.user_id} {job.status}: {_job_text(job)}")
    say(f"\n{result.runs} runs in {result.wall_s:.2f}s")


def _job_text(job: JobReport) -> str:
    parts = [f"after {job.attempts} attempts" if job.attempts != 1 else "after 1 attempt"]
    if job.error:
        parts.append(f"error: {one_line(job.error)}")
    if job.note:
        parts.append(f"note: {one_line(job.note)}")
    return "; ".join(parts)


def load_overrides(args: argparse.Namespace) -> Mapping[str, Any]:
    """--latency-ms is a setting: the settings are loaded with it (main())."""
    if args.latency_ms is None:
        return {}
    return {"model": {"offline_latency_ms": args.latency_ms}}


async def load_command(args: argparse.Namespace, settings: Settings) -> int:
    for name in ("users", "sessions", "turns"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name} must be at least 1")
    if args.latency_ms is not None and settings.model.resolved_provider != "offline":
        raise InvalidInput("--latency-ms simulates latency with the offline model only")
    if args.part:
        async with open_full_runtime(settings) as rt:
            share = Share(args.offset, args.users)
            return await run_part(
                rt, share, args.sessions, args.turns, wait_within=args.wait_within
            )
    if args.processes < 1 or args.workers < 0:
        raise InvalidInput("--processes must be at least 1 and --workers at least 0")
    if args.processes > args.users:
        raise InvalidInput("--processes must not exceed --users (each process runs a user)")
    if args.processes > 1 or args.workers:
        return await _load_processes(args, settings)
    async with open_full_runtime(settings) as rt:
        result = await run_load(rt, args.users, args.sessions, args.turns)
    print_json(result.as_json())
    problem = result.problem()
    if problem:
        warn(f"error: load: {problem}")
    return 1 if problem else 0


async def _load_processes(args: argparse.Namespace, settings: Settings) -> int:
    # The processes load their settings as this one did: same file, environment,
    # working directory and setting options.
    memchat = [sys.executable, "-m", "engine.cli"]
    memchat += ["--config", args.config] if args.config else []
    memchat += ["-v"] if args.verbose else []
    options = ["--latency-ms", str(args.latency_ms)] if args.latency_ms is not None else []
    # Without workers: this process only audits; the turns and jobs are theirs.
    async with open_chat_runtime(settings) as rt:
        run = await run_load_processes(
            rt,
            args.users,
            args.sessions,
            args.turns,
            args.processes,
            memchat=memchat,
            load_options=options,
            workers=args.workers,
        )
    print_json(run.as_json())
    problem = run.result.problem()
    if problem:
        warn(f"error: load: {problem}")
    return 1 if problem else 0
