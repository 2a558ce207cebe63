"""The `memchat` console script: the TUI without a command, the CLI with one."""

from __future__ import annotations

import argparse
import sys

from engine.cli.main import main
from engine.config import Settings, load_settings
from engine.errors import InvalidInput
from engine.validation import validate_user_id

# A little pause between the offline model's words makes streaming visible
# in the app, unless the settings say otherwise.
TUI_OFFLINE_TOKEN_DELAY_MS = 30.0


def add_tui_options(parser: argparse.ArgumentParser) -> None:
    parser.usage = "memchat [--config PATH] [--users A,B,...] [--play seed] [COMMAND ...]"
    parser.description = (
        "Multi-user chat with per-user memory in PostgreSQL. Without a COMMAND, "
        "opens the terminal app with one pane per user."
    )
    parser.add_argument(
        "--users",
        metavar="A,B,...",
        help="the users to open panes for (default: ui.users from the settings)",
    )
    parser.add_argument(
        "--play",
        metavar="NAME",
        choices=["seed"],
        help="start the app playing a demo script (seed), F4 pauses",
    )
    # `memchat serve`'s per-tab processes (engine/web): one user only, enforced
    # by the engine; memory jobs left to serve's own `memchat worker`.
    parser.add_argument("--as-user", metavar="USER", help=argparse.SUPPRESS)
    parser.add_argument("--no-workers", action="store_true", help=argparse.SUPPRESS)


def run_tui(args: argparse.Namespace, settings: Settings) -> int:
    users = None
    if args.users is not None:
        users = [u for u in (part.strip() for part in args.users.split(",")) if u]
        if not users:
            raise InvalidInput("--users needs at least one user id")
        users = [validate_user_id(u) for u in users]
    if (
        settings.model.resolved_provider == "offline"
        and "offline_token_delay_ms" not in settings.model.model_fields_set
    ):
        # Loaded again with the pause as an override: settings are never changed after load.
        delay = {"model": {"offline_token_delay_ms": TUI_OFFLINE_TOKEN_DELAY_MS}}
        settings = load_settings(args.config, overrides=delay)
    from tui.app import MemchatApp

    single_user = validate_user_id(args.as_user) if args.as_user is not None else None
    MemchatApp(
        settings,
        users,
        play=args.play,
        single_user=single_user,
        run_workers=not args.no_workers,
    ).run()
    return 0


def run() -> None:
    sys.exit(main(configure=add_tui_options, interactive=run_tui))


if __name__ == "__main__":
    run()
