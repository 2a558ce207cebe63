"""``memchat users`` and ``memchat config``: what is there, and how it is set up."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import SecretStr

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
    say(settings_toml(settings), end="")
    return 0


# Shown for information, never settings of their own: a file holding them would be refused.
_DERIVED = {("model", "resolved_provider")}


def settings_toml(settings: Settings) -> str:
    """The settings in effect as a TOML settings file: unset values, derived values and
    redacted secrets are comments, so the text parses and loads back to the same settings."""
    data = redacted_settings(settings)
    lines = [f"# {settings.source_line()}"]
    for section, values in data.items():
        lines += ["", f"[{_toml_key(section)}]"]
        model = getattr(settings, section, None)
        for key, value in values.items():
            name = _toml_key(key)
            actual = getattr(model, key, None)
            if (section, key) in _DERIVED:
                lines.append(f"# {name} = {_toml_value(value)}  (derived, not a setting)")
            elif value is None:
                lines.append(f"# {name} =  (unset)")
            elif isinstance(actual, SecretStr) or (isinstance(actual, str) and value != actual):
                lines.append(f"# {name} = {_toml_value(value)}  (redacted)")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_string(key)


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(pairs) + "}"
    return _toml_string(str(value))
