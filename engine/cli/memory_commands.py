"""``memchat memories`` and ``memory add|forget``: one user's memories, database only."""

from __future__ import annotations

import argparse
from typing import Any

from engine.cli import optimize_commands
from engine.cli.output import print_json, say, table, when
from engine.cli.resources import open_store_only
from engine.config import Settings


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
        help="add, forget, optimize or restore memories of a user",
        epilog='examples:\n  memchat memory add --user alice "Likes green tea" --topics food\n'
        "  memchat memory forget --user alice 5d0c7d8e-...\n"
        "  memchat memory optimize --user alice --dry-run\n"
        "  memchat memory restore --user alice --event 42\n\n" + exit_codes,
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
    optimize_commands.register(actions, exit_codes)


def _topics(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


async def memories_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res, res.store.scope(args.user) as s:
        if args.history:
            events = await s.memory_events()
        else:
            memories = await s.list_memories()
    items = events if args.history else memories
    if args.json:
        print_json(items)
        return 0
    if not items:
        say(f"no memories for {args.user}" if not args.history else "no memory changes yet")
        return 0
    if args.history:
        table(
            [
                [
                    str(e.event_id),
                    when(e.at),
                    e.op,
                    e.actor,
                    str(e.memory_id),
                    e.before or "",
                    e.after or "",
                ]
                for e in events
            ],
            ["EVENT", "AT", "OP", "BY", "MEMORY", "BEFORE", "AFTER"],
        )
    else:
        table(
            [[str(m.memory_id), when(m.updated_at), m.content] for m in memories],
            ["MEMORY", "UPDATED", "TEXT"],
        )
    return 0


async def memory_add_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res, res.store.scope(args.user) as s:
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
    async with open_store_only(settings) as res, res.store.scope(args.user) as s:
        memory = await s.delete_memory(args.memory_id, actor="cli")
    if args.json:
        print_json({"deleted": memory})
    else:
        say(f"forgot {memory.memory_id}: {memory.content}")
    return 0
