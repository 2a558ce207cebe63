"""``memchat memories``, ``memory add|forget`` and ``scenario seed|load``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from engine.cli.output import one_line, print_json, say, table, warn, when
from engine.config import Settings
from engine.errors import InvalidInput
from engine.runtime import open_runtime
from engine.scenarios import JobReport, SeedResult, run_load, run_seed
from engine.validation import printable


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    memories = commands.add_parser(
        "memories",
        help="list what memchat remembers about a user, newest first",
        epilog="examples:\n  memchat memories --user user_1@example.com\n"
        "  memchat memories --user user_1@example.com --history\n\n" + exit_codes,
        formatter_class=fmt,
    )
    memories.add_argument("--user", required=True)
    memories.add_argument(
        "--history", action="store_true", help="the audit trail of every change instead"
    )
    memories.add_argument("--json", action="store_true", help="print JSON")
    memories.set_defaults(handler=memories_command)

    memory = commands.add_parser(
        "memory",
        help="add or forget one memory of a user by hand",
        epilog='examples:\n  memchat memory add --user alice "Likes green tea" --topics food\n'
        "  memchat memory forget --user alice 5d0c7d8e-...\n\n" + exit_codes,
        formatter_class=fmt,
    )
    actions = memory.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="remember a fact", epilog=exit_codes, formatter_class=fmt)
    add.add_argument("--user", required=True)
    add.add_argument("text", help="a short statement, e.g. 'Likes green tea'")
    add.add_argument("--topics", default="", help="comma-separated, e.g. food,likes")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(handler=memory_add_command)
    forget = actions.add_parser(
        "forget", help="delete a memory by id", epilog=exit_codes, formatter_class=fmt
    )
    forget.add_argument("--user", required=True)
    forget.add_argument("memory_id", metavar="ID", help="memory id (see `memchat memories`)")
    forget.add_argument("--json", action="store_true", help="print JSON")
    forget.set_defaults(handler=memory_forget_command)

    scenario = commands.add_parser(
        "scenario",
        help="run a scripted multi-user conversation (seed) or a load",
        epilog="examples:\n  memchat scenario seed\n"
        "  memchat scenario load --users 200 --sessions 2 --turns 3\n\n" + exit_codes,
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
    load.set_defaults(handler=load_command)

    worker = commands.add_parser(
        "worker",
        help="run memory workers only, until Ctrl-C or SIGTERM (scale out across processes)",
        epilog="example:\n  MEMCHAT_MEMORY__CONCURRENCY=8 memchat worker\n\n" + exit_codes,
        formatter_class=fmt,
    )
    worker.set_defaults(handler=worker_command)


def _topics(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


async def memories_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings, run_workers=False) as rt, rt.store.scope(args.user) as s:
        items = await (s.memory_events() if args.history else s.list_memories())
    if args.json:
        print_json(items)
        return 0
    if not items:
        say(f"no memories for {args.user}" if not args.history else "no memory changes yet")
        return 0
    if args.history:
        table(
            [
                [when(e.at), e.op, e.actor, str(e.memory_id), e.before or "", e.after or ""]
                for e in items
            ],
            ["AT", "OP", "BY", "MEMORY", "BEFORE", "AFTER"],
        )
    else:
        table(
            [[str(m.memory_id), when(m.updated_at), m.content] for m in items],
            ["MEMORY", "UPDATED", "TEXT"],
        )
    return 0


async def memory_add_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings, run_workers=False) as rt, rt.store.scope(args.user) as s:
        await s.ensure_user()
        memory = await s.add_memory(args.text, _topics(args.topics), actor="cli")
    if args.json:
        print_json({"added": memory is not None, "memory": memory})
    elif memory is None:
        say(f"{args.user} already has that memory")
    else:
        say(f"added {memory.memory_id}: {memory.content}")
    return 0


async def memory_forget_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings, run_workers=False) as rt, rt.store.scope(args.user) as s:
        memory = await s.delete_memory(args.memory_id, actor="cli")
    if args.json:
        print_json({"deleted": memory})
    else:
        say(f"forgot {memory.memory_id}: {memory.content}")
    return 0


async def seed_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings) as rt:
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


async def load_command(args: argparse.Namespace, settings: Settings) -> int:
    for name in ("users", "sessions", "turns"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name} must be at least 1")
    if args.latency_ms is not None:
        if settings.model.resolved_provider != "offline":
            raise InvalidInput("--latency-ms simulates latency with the offline model only")
        settings.model.offline_latency_ms = args.latency_ms
    async with open_runtime(settings) as rt:
        result = await run_load(rt, args.users, args.sessions, args.turns)
    print_json(result.as_json())
    problem = result.problem()
    if problem:
        warn(f"error: load: {problem}")
    return 1 if problem else 0


async def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings) as rt:
        warn(
            f"worker {rt.dispatcher.name}: up to {settings.memory.concurrency} memory jobs "
            "at once on "
            f"{rt.db.info.label}, model: {rt.model.label}, {settings.source_line()}; "
            "Ctrl-C to stop"
        )
        await stop.wait()
        warn(f"stopping: draining running jobs (up to {settings.memory.drain_timeout:g}s)")
    return 0
