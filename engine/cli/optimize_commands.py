"""``memchat memory optimize`` and ``memory restore``: consolidate a user's memories
through the model, and undo any audited change from the history."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from engine.cli.output import print_json, say, table
from engine.cli.resources import open_store_only
from engine.config import Settings, memory_model_settings
from engine.consolidate import Consolidation, Consolidator
from engine.memory import MemoryManager
from engine.memory_history import restore_event
from engine.models import create_model


def register(actions: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    optimize = actions.add_parser(
        "optimize",
        help="merge near-duplicate and outdated memories of a user through the model",
        epilog="examples:\n  memchat memory optimize --user alice --dry-run\n"
        "  memchat memory optimize --user alice\n\n"
        "every change is audited (actor optimize): see `memchat memories --user alice "
        "--history`,\nundo one with `memchat memory restore`.\n\n" + exit_codes,
        formatter_class=fmt,
    )
    optimize.add_argument("--user", required=True)
    optimize.add_argument(
        "--dry-run", action="store_true", help="show what would change, change nothing"
    )
    optimize.add_argument("--json", action="store_true", help="print JSON")
    optimize.set_defaults(handler=optimize_command)

    restore = actions.add_parser(
        "restore",
        help="undo one audited memory change (see `memchat memories --history --json`)",
        epilog="examples:\n  memchat memory restore --user alice --event 42\n\n" + exit_codes,
        formatter_class=fmt,
    )
    restore.add_argument("--user", required=True)
    restore.add_argument("--event", required=True, type=_event_id, metavar="N")
    restore.add_argument("--json", action="store_true", help="print JSON")
    restore.set_defaults(handler=restore_command)


def _event_id(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an event number: {raw[:40]!r}") from None
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"not an event number: {value}")
    return value


@asynccontextmanager
async def _consolidator(settings: Settings) -> AsyncIterator[Consolidator]:
    # The memory model (memory.model / memory.base_url), as extraction uses it.
    model = create_model(memory_model_settings(settings.model, settings.memory))
    try:
        async with open_store_only(settings) as res:
            manager = MemoryManager(
                model, settings.memory, context_tokens=settings.model.context_tokens
            )
            yield Consolidator(res.store, manager, context_tokens=settings.model.context_tokens)
    finally:
        await model.aclose()


async def optimize_command(args: argparse.Namespace, settings: Settings) -> int:
    async with _consolidator(settings) as consolidator:
        result = await consolidator.run(args.user, dry_run=args.dry_run)
    if args.json:
        print_json(_as_json(result))
        return 0
    if result.changes:
        table(
            [
                [c.op, str(c.memory.memory_id), c.memory.content, c.after or ""]
                for c in result.changes
            ],
            ["CHANGE", "MEMORY", "BEFORE", "AFTER"],
        )
    for line in result.rejected:
        say(f"refused {line}")
    say(result.summary())
    return 0


def _as_json(result: Consolidation) -> dict[str, Any]:
    return {
        "user_id": result.user_id,
        "dry_run": result.dry_run,
        "before": result.before,
        "after": result.after,
        "merged": result.updated,
        "removed": result.deleted,
        "requests": result.requests,
        "changes": [
            {
                "op": c.op,
                "memory_id": c.memory.memory_id,
                "before": c.memory.content,
                "after": c.after,
            }
            for c in result.changes
        ],
        "refused": result.rejected,
    }


async def restore_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res, res.store.scope(args.user) as scope:
        restored = await restore_event(scope, args.event)
    if args.json:
        print_json(restored)
    else:
        say(
            f"change {restored.event.event_id} ({restored.event.op}) undone: "
            f"{restored.action} {restored.memory.memory_id}: {restored.memory.content}"
        )
    return 0
