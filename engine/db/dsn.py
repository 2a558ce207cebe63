"""Small DSN helpers: show one safely, point one at another database."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, fit to show or log."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<unparseable database URL>"
    if not password:
        return dsn
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))
