"""``memchat db upgrade-embedded``: carry an older memchat's embedded database over."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from engine.cli.output import say
from engine.config import Settings
from engine.db.upgrade_embedded import upgrade_embedded


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    db = commands.add_parser(
        "db",
        help="maintenance of the embedded database",
        description="Maintenance of the embedded database.",
        epilog=exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = actions.add_parser(
        "upgrade-embedded",
        help="copy a PostgreSQL 16 data dir (older memchat, pgserver) into PostgreSQL 18",
        description=(
            "Copy the embedded database made by an older memchat (PostgreSQL 16, from "
            "pgserver) into a new PostgreSQL 18 data dir: dump, restore, count every "
            "table's rows on both sides, and only then swap the directories. The old "
            "files are kept next to it as <data dir>.pg16. Needs the PostgreSQL 16 "
            "binaries: pip install 'pgserver==0.1.4' (Python 3.12 or older), or --old-bindir."
        ),
        epilog=exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    upgrade.add_argument(
        "--old-bindir",
        metavar="DIR",
        type=Path,
        help="PostgreSQL 16's bin/ (default: the installed pgserver's)",
    )
    upgrade.set_defaults(handler=upgrade_command)


async def upgrade_command(args: argparse.Namespace, settings: Settings) -> int:
    result = await asyncio.to_thread(upgrade_embedded, settings.data_dir(), args.old_bindir)
    say(result.summary)
    return 0
