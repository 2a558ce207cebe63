"""``memchat doctor``: one line per check, ``ok`` or ``problem`` with its fix."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from engine.cli.output import print_json, say
from engine.config import Settings
from engine.doctor import CheckResult, all_ok, diagnose, settings_problem
from engine.errors import ConfigError

EXIT_ALL_OK = 0
EXIT_PROBLEMS = 1

DOCTOR_EXIT_CODES = """\
exit codes:
  0    every check is ok
  1    at least one problem (each printed with its fix), including broken settings
  2    bad usage (unknown option)
  130  interrupted (Ctrl-C)
"""

# Wide enough for "problem" plus two spaces, so the check names line up.
STATUS_WIDTH = 9


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    # The doctor's exit codes differ from the other commands' (a problem is
    # its normal finding, not an error), so it documents its own; exit_codes
    # is accepted for the same register() shape as every other command module.
    del exit_codes
    doctor = commands.add_parser(
        "doctor",
        help="check settings, database, isolation, memory jobs and model; print fixes",
        description=(
            "Check the settings file, the database (reachable, migrated, row-level "
            "security in force for the runtime role), the memory job queue and the "
            "model endpoint: listed, a short reply streams, and whether it returns tool "
            "calls (which memory extraction form will be used; costs a few tokens). "
            "Prints one line per check, `ok` or `problem`, and the fix for each "
            "problem. Secrets (API key, database password) are never shown."
        ),
        epilog=(
            "examples:\n  memchat doctor\n  memchat doctor --json\n  memchat doctor --no-probe\n\n"
            + DOCTOR_EXIT_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument(
        "--no-probe",
        action="store_true",
        help="only GET /models: send no chat or tool-call request to the model",
    )
    doctor.set_defaults(handler=doctor_command, on_broken_settings=doctor_broken_settings)


async def doctor_command(args: argparse.Namespace, settings: Settings) -> int:
    results = await diagnose(settings=settings, probe=not args.no_probe)
    return report(results, as_json=args.json)


async def doctor_broken_settings(args: argparse.Namespace, error: ConfigError) -> int:
    """For main() to call when load_settings failed: the doctor still reports it."""
    return report([settings_problem(error)], as_json=args.json)


def report(results: list[CheckResult], *, as_json: bool) -> int:
    ok = all_ok(results)
    if as_json:
        print_json({"ok": ok, "checks": [dataclasses.asdict(r) for r in results]})
    else:
        for result in results:
            say(format_line(result))
    return EXIT_ALL_OK if ok else EXIT_PROBLEMS


def format_line(result: CheckResult) -> str:
    status = "ok" if result.ok else "problem"
    line = f"{status:<{STATUS_WIDTH}}{result.name}: {result.detail}"
    if result.fix:
        line += f" -> {result.fix}"
    return line
