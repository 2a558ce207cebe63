"""Small DSN helpers: show one safely, point one at another database."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

_SECRET_PARAMS = {"password", "sslpassword"}


def redact_dsn(dsn: str) -> str:
    """The DSN with its passwords replaced (user:pw@ and ?password=), fit to show or log."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<unparseable database URL>"
    if password:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    if parts.query:
        query = [
            (key, "***" if key.lower() in _SECRET_PARAMS else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="/*"))
    return urlunsplit(parts)


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def with_login(dsn: str, user: str, password: str) -> str:
    """The same server and database, logging in as ``user`` with ``password``."""
    parts = urlsplit(dsn)
    hostport = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    query = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key.lower() not in ("user", "password")
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="/")))
