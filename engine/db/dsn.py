"""Small DSN helpers: show one safely, check its form, point one at another database."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from engine.errors import ConfigError
from engine.redact import redact_dsn

__all__ = ["check_dsn", "redact_dsn", "with_database", "with_login"]

_DSN_HELP = (
    "database.url must be a postgresql://user:password@host:port/dbname URL "
    "(percent-encode / # ? @ : in the password, e.g. %2F for /)"
)


def check_dsn(dsn: str) -> None:
    """Refuse, in one line, a DSN the driver would misread or choke on.

    asyncpg takes the URL form only: the keyword form is refused here rather
    than by the driver (whose error quoted the whole DSN, password included),
    and a password with an unescaped ``/ # ?`` (which a URL parser splits into
    path, fragment or query) is refused rather than failing with a traceback.
    """
    shown = redact_dsn(dsn)
    try:
        parts = urlsplit(dsn.strip())
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{_DSN_HELP}; got {shown}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{_DSN_HELP}; got {shown}")
    if "@" in dsn and "@" not in parts.netloc:
        # The userinfo's "@" ended up past the host: an unescaped / # ? before it.
        raise ConfigError(f"{_DSN_HELP}; got {shown}")


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
