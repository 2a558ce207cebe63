"""``memchat users`` and ``memchat config``: what is there, and how it is set up."""

from __future__ import annotations

import argparse
from typing import Any

from engine.admin import AdminReader, UserSummary
from engine.cli.output import print_json, say, table, tokens_cell, when
from engine.cli.resources import open_store_only
from engine.config import Settings
from engine.db import redact_dsn
from engine.redact import redact_url


def register(commands: argparse._SubParsersAction[Any], exit_codes: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    users = commands.add_parser(
        "users",
        help="list every user with counts and tokens used (admin, read-only)",
        epilog="example:\n  memchat users --json\n\n" + exit_codes,
        formatter_class=fmt,
    )
    users.add_argument("--json", action="store_true", help="print JSON")
    users.set_defaults(handler=users_command)

    config = commands.add_parser(
        "config",
        help="show the settings in effect and where they came from (secrets redacted)",
        epilog="example:\n  memchat --config ./config.toml config\n\n" + exit_codes,
        formatter_class=fmt,
    )
    config.add_argument("--json", action="store_true", help="print JSON")
    config.set_defaults(handler=config_command)


async def users_command(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store_only(settings) as res:
        users = await AdminReader(res.db).list_users()
    if args.json:
        print_json(users)
        return 0
    if not users:
        say("no users yet")
        return 0
    # Token totals only where an endpoint reported usage: unknown is not 0.
    with_tokens = any(u.tokens is not None for u in users)
    headers = ["USER", "CREATED", "SESSIONS", "MESSAGES", "MEMORIES"]
    table(
        [_user_row(u, with_tokens) for u in users],
        [*headers, "TOKENS IN/OUT"] if with_tokens else headers,
    )
    return 0


def _user_row(user: UserSummary, with_tokens: bool) -> list[str]:
    row = [
        user.user_id,
        when(user.created_at),
        str(user.sessions),
        str(user.messages),
        str(user.memories),
    ]
    if with_tokens:
        tokens = user.tokens
        row.append(tokens_cell(tokens.prompt, tokens.completion) if tokens else "")
    return row


def redacted_settings(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    if settings.database.url is not None:
        data["database"]["url"] = redact_dsn(settings.database.url.get_secret_value())
    data["database"]["data_dir"] = str(settings.data_dir())
    if settings.model.api_key is not None:
        data["model"]["api_key"] = "***"
    if settings.model.base_url:
        # user:pass@ and query secrets (api_key=, sig=, ...) are refused or
        # allowed elsewhere; here they are only never shown.
        data["model"]["base_url"] = redact_url(settings.model.base_url, keep_user=False)
    if settings.memory.base_url:
        data["memory"]["base_url"] = redact_url(settings.memory.base_url, keep_user=False)
    data["model"]["resolved_provider"] = settings.model.resolved_provider
    return data


async def config_command(args: argparse.Namespace, settings: Settings) -> int:
    data = redacted_settings(settings)
    source = str(settings.config_file) if settings.config_file else None
    if args.json:
        print_json({"config_file": source, "settings": data})
        return 0
    say(f"# {settings.source_line()}")
    for section, values in data.items():
        say(f"\n[{section}]")
        for key, value in values.items():
            say(f"{key} = {value!r}")
    return 0
