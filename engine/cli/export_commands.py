"""``memchat export``: one session as a Markdown file (or on stdout)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.cli.output import say
from engine.cli.resources import open_store_only
from engine.config import Settings
from engine.errors import InvalidInput
from engine.export import export_session, file_name, write_new_file


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    export = commands.add_parser(
        "export",
        help="write one session as Markdown",
        description=(
            "Write a session (title, then every message with who and when) as Markdown. "
            "Without --output it goes to a new file in the current directory, named "
            "after the user and the session; the path is printed."
        ),
        epilog="examples:\n"
        "  memchat export --user alice@example.com --session 3f2b...\n"
        "  memchat export --user alice@example.com --session 3f2b... --output chat.md\n"
        "  memchat export --user alice@example.com --session 3f2b... --output - | less\n\n"
        + exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--user", required=True, help="user id, e.g. alice@example.com")
    export.add_argument("--session", required=True, help="session id (see `memchat sessions`)")
    export.add_argument(
        "--output", "-o", metavar="FILE", help='file to write (replaced if it exists); "-" = stdout'
    )
    export.set_defaults(handler=export_command)


async def export_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res:
        exported = await export_session(res.store, args.user, args.session)
    if args.output == "-":
        # A terminal shows escape sequences in the text, never obeys them.
        say(exported.markdown, end="")
        return 0
    try:
        if args.output is None:
            path = write_new_file(Path.cwd(), file_name(exported.session), exported.markdown)
        else:
            path = Path(args.output)
            path.write_text(exported.markdown, encoding="utf-8")
    except OSError as exc:
        where = args.output or Path.cwd()
        raise InvalidInput(f"cannot write {where}: {exc.strerror or exc}") from None
    say(f"exported {exported.summary} to {path}")
    return 0
