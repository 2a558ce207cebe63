"""``memchat jobs``: the memory jobs of every user (or one), newest first.

Read-only, across users, through ``AdminReader``: it opens the database and
nothing else (no model, no memory workers), so looking never changes what it
looks at.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.admin import AdminReader
from engine.cli.output import one_line, print_json, say, table, tokens_cell, when
from engine.cli.resources import open_store_only
from engine.config import Settings
from engine.errors import InvalidInput
from engine.records import MemoryJob

DEFAULT_LIMIT = 50


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    jobs = commands.add_parser(
        "jobs",
        help="list memory jobs newest first, with errors and notes (admin, read-only)",
        description=(
            "List memory jobs, newest first: status, attempts, how the answer was asked for "
            "(tools or json), tokens (when the endpoint reported them), times, the error of "
            "a failed or retrying job and the note of a job that succeeded with something to "
            "say (refused changes, an unusable answer)."
        ),
        epilog="examples:\n  memchat jobs --failed\n"
        "  memchat jobs --user user_1@example.com --limit 10 --json\n\n" + exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.add_argument("--user", help="only this user's jobs")
    jobs.add_argument("--failed", action="store_true", help="only jobs whose status is failed")
    jobs.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most N jobs (default {DEFAULT_LIMIT})",
    )
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(handler=jobs_command)


async def jobs_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise InvalidInput("--limit must be at least 1")
    async with open_store_only(settings) as res:
        reader = AdminReader(res.db)
        jobs = await reader.list_jobs(args.user, failed_only=args.failed, limit=args.limit)
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        say(_nothing(args))
        return 0
    table([_row(job) for job in jobs], HEADERS)
    return 0


HEADERS = [
    "JOB",
    "USER",
    "STATUS",
    "TRIES",
    "MODE",
    "TOKENS IN/OUT",
    "CREATED",
    "FINISHED",
    "ERROR / NOTE",
]


def _row(job: MemoryJob) -> list[str]:
    return [
        str(job.job_id),
        job.user_id,
        job.status,
        str(job.attempts),
        job.extraction or "",
        tokens_cell(job.prompt_tokens, job.completion_tokens),
        when(job.created_at),
        when(job.finished_at) if job.finished_at else "",
        detail(job),
    ]


def detail(job: MemoryJob) -> str:
    """The error (of a failed job, or of a retrying one's last attempt) and the note."""
    parts = []
    if job.last_error:
        parts.append(f"error: {one_line(job.last_error)}")
    if job.note:
        parts.append(f"note: {one_line(job.note)}")
    return "; ".join(parts)


def _nothing(args: argparse.Namespace) -> str:
    kind = "failed memory jobs" if args.failed else "memory jobs"
    return f"no {kind} for {args.user}" if args.user else f"no {kind}"
