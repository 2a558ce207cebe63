"""``memchat``: the command line. Every user mistake is one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from engine import event_loop
from engine.cli import (
    bench_commands,
    chat_commands,
    db_commands,
    doctor_commands,
    export_commands,
    info_commands,
    jobs_commands,
    memory_commands,
    scenario_commands,
    serve_commands,
    worker_commands,
)
from engine.cli.output import warn
from engine.config import Settings, load_settings
from engine.errors import ConfigError, MemchatError
from engine.logsafe import install_logging

log = logging.getLogger("memchat")

EXIT_CODES = """\
exit codes:
  0    success
  1    the turn failed (model error; the message is stored) or an unexpected error
  2    bad usage, bad input or broken settings
  3    not found (unknown user, session or memory)
  4    database unreachable or refused the work
  130  interrupted (Ctrl-C); a reply being streamed is stored as cancelled
"""

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
BrokenSettingsHandler = Callable[[argparse.Namespace, ConfigError], Coroutine[Any, Any, int]]
"""What a command that still runs on broken settings (doctor, bench) sets as on_broken_settings."""
SettingsOverrides = Callable[[argparse.Namespace], Mapping[str, Any]]
"""What a command whose options are settings (scenario load --latency-ms) sets as
settings_overrides: the settings are loaded with them, never changed after."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        self.exit(2, f"memchat: error: {message} (see `{self.prog} --help`)\n")


Interactive = Callable[[argparse.Namespace, Settings], int]
"""What `memchat` with no command runs (the TUI, supplied by the tui package)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memchat",
        description="Multi-user chat with per-user memory in PostgreSQL.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="settings file (default: $MEMCHAT_CONFIG, ./config.toml, user config dir)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chat_commands.register(commands, EXIT_CODES)
    export_commands.register(commands, EXIT_CODES)
    memory_commands.register(commands, EXIT_CODES)
    scenario_commands.register(commands, EXIT_CODES)
    worker_commands.register(commands, EXIT_CODES)
    info_commands.register(commands, EXIT_CODES)
    jobs_commands.register(commands, EXIT_CODES)
    doctor_commands.register(commands, EXIT_CODES)
    bench_commands.register(commands, EXIT_CODES)
    db_commands.register(commands, EXIT_CODES)
    serve_commands.register(commands, EXIT_CODES)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    interactive: Interactive | None = None,
) -> int:
    parser = build_parser()
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    # Before anything can log: every line, library tracebacks included, is
    # rendered literally and without secrets (the app enters here too).
    install_logging(args.verbose)
    if args.command is None and interactive is None:
        parser.print_help()
        return 0
    try:
        try:
            settings = load_settings(args.config, overrides=_overrides(args))
        except ConfigError as exc:
            # `memchat doctor` reports a broken file as one of its findings.
            on_broken: BrokenSettingsHandler | None = getattr(args, "on_broken_settings", None)
            if on_broken is None:
                raise
            return event_loop.run(on_broken(args, exc))
        # The start line: which settings file is in use, and how it was found.
        log.info("%s", settings.source_line())
        if args.command is None:
            assert interactive is not None
            return interactive(args, settings)
        handler: Handler = args.handler
        return event_loop.run(handler(args, settings))
    except MemchatError as exc:
        warn(f"error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    except BrokenPipeError:
        # `memchat users | head -3`: the reader left; that is not an error to
        # report. Point stdout at devnull so the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception:
        # A bug, not a user mistake: the traceback goes through the safe
        # formatter rather than Python's raw one (which prints exception text
        # from libraries and servers as it is).
        log.exception("unexpected error")
        return 1


def _overrides(args: argparse.Namespace) -> Mapping[str, Any] | None:
    overrides: SettingsOverrides | None = getattr(args, "settings_overrides", None)
    return overrides(args) if overrides is not None else None


def run() -> None:
    sys.exit(main())
