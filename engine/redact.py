"""Secrets out of everything shown, logged or stored: by parsing, and by value.

Two tools, because neither alone is enough:

* parsing: :func:`redact_url` and :func:`redact_dsn` hide the parts of a URL or
  DSN that hold secrets (userinfo, ``password=`` parameters, query keys such as
  ``api_key`` or ``sig``) whatever their value, in both the URL and the
  keyword (``host=… password=…``) form of a DSN;
* by value: :func:`scrub` replaces every configured secret (the API key with
  and without its ``sk-`` prefix, the database password, secrets in the model
  URL) wherever it appears, e.g. in a server's error text that echoes the key.
  :func:`remember_secrets` is called by ``load_settings``, so every process
  (CLI, TUI, worker, bench) scrubs what its own settings hold.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from engine.config import Settings

REDACTED = "***"
# Query/keyword parameters whose value is a secret, compared lower-cased with
# "-" read as "_". "key" and "sig" cover Google-style keys and signed URLs.
SECRET_PARAMS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "sslpassword",
        "api_key",
        "apikey",
        "key",
        "token",
        "access_token",
        "auth",
        "secret",
        "client_secret",
        "sig",
        "signature",
    }
)
# Shorter "secrets" would blank out ordinary words in the text they are scrubbed from.
MIN_SECRET_CHARS = 4
MIN_KEY_TAIL_CHARS = 8

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# libpq keyword form: key = value, value either bare or single-quoted with \' escapes.
_KEYWORD_RE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|\S*)")
_QUERY_PAIR_RE = re.compile(r"(?P<key>[^&=#]+)=(?P<value>[^&#]*)")


def is_secret_param(name: str) -> bool:
    return unquote(name).strip().lower().replace("-", "_") in SECRET_PARAMS


def redact_url(url: str, *, keep_user: bool = True) -> str:
    """``url`` with its password (or whole userinfo) and secret query values hidden.

    The userinfo is taken to end at the *last* ``@`` of the text, so a password
    with an unescaped ``/``, ``#`` or ``?`` in it is hidden too (a parser
    would have split it into path, fragment or query and shown it).
    """
    match = _SCHEME_RE.match(url)
    if match is None:
        return url
    scheme, rest = match.group(), url[match.end() :]
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        if keep_user and "/" not in user and "?" not in user and "#" not in user:
            shown = f"{user}:{REDACTED}" if sep else user
        else:
            shown = REDACTED
        scheme += shown + "@"
    return scheme + _redact_query(rest)


def _redact_query(rest: str) -> str:
    head, sep, tail = rest.partition("?")
    if not sep:
        return rest
    query, hash_sep, fragment = tail.partition("#")

    def hide(match: re.Match[str]) -> str:
        if is_secret_param(match["key"]):
            return f"{match['key']}={REDACTED}"
        return match.group()

    return head + "?" + _QUERY_PAIR_RE.sub(hide, query) + hash_sep + fragment


def redact_dsn(dsn: str) -> str:
    """A PostgreSQL DSN, URL or keyword form, with its passwords hidden: fit to show."""
    if _SCHEME_RE.match(dsn.strip()):
        return redact_url(dsn.strip())

    def hide(match: re.Match[str]) -> str:
        if is_secret_param(match["key"]):
            return f"{match['key']}={REDACTED}"
        return match.group()

    return _KEYWORD_RE.sub(hide, dsn)


def secrets_in_url(url: str, *, user_is_secret: bool = False) -> list[str]:
    """The secret values a URL or DSN carries (password, secret parameters), decoded and raw.

    ``user_is_secret``: a bare ``TOKEN@host`` userinfo (model URLs) is a secret
    too; a database user name is not.
    """
    found: list[str] = []
    text = url.strip()
    match = _SCHEME_RE.match(text)
    if match is not None:
        rest = text[match.end() :]
        if "@" in rest:
            userinfo, _, rest = rest.rpartition("@")
            user, sep, password = userinfo.partition(":")
            if sep:
                found += [password, unquote(password)]
            elif user_is_secret:
                found += [user, unquote(user)]
        _, _, query = rest.partition("?")
        pairs = [(m["key"], m["value"]) for m in _QUERY_PAIR_RE.finditer(query.split("#")[0])]
    else:
        pairs = [(m["key"], m["value"]) for m in _KEYWORD_RE.finditer(text)]
    for key, value in pairs:
        if is_secret_param(key):
            raw = value.strip("'")
            found += [raw, unquote(raw), raw.replace("\\'", "'")]
    return found


def key_variants(key: str) -> list[str]:
    """An API key as a server might echo it: whole, and without its ``sk-``-style prefix."""
    # "sk-abc…" -> "abc…"; "sk-proj-abc…" -> "proj-abc…" and "abc…".
    one = re.match(r"[A-Za-z]{2,8}[-_]", key)
    two = re.match(r"[A-Za-z]{2,8}[-_][A-Za-z]{2,12}[-_]", key)
    # A tail shorter than a real key's random part is a word ("sk-doctor-test"
    # gave "test"), and hiding every "test" in output hides paths, not secrets.
    tails = [key[m.end() :] for m in (one, two) if m is not None]
    return [key] + [tail for tail in tails if len(tail) >= MIN_KEY_TAIL_CHARS]


class _Known:
    """The secret values of this process, longest first so a prefix never half-hides one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            merged = set(self._values) | {v for v in values if len(v) >= MIN_SECRET_CHARS}
            self._values = tuple(sorted(merged, key=len, reverse=True))
            self._pattern = (
                re.compile("|".join(re.escape(v) for v in self._values)) if self._values else None
            )

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None and text else text


_known = _Known()


def remember(values: Iterable[str]) -> None:
    """Add secret values that :func:`scrub` hides from now on, in this process."""
    _known.add(values)


def remember_secrets(settings: Settings) -> None:
    """Every secret the settings hold: the API key, passwords in the database and model URLs."""
    values: list[str] = []
    memory = settings.memory
    for key in (settings.model.api_key, memory.api_key, memory.embeddings_api_key):
        if key is not None:
            values += key_variants(key.get_secret_value())
    for model_url in (settings.model.base_url, memory.base_url, memory.embeddings_base_url):
        if model_url:
            values += secrets_in_url(model_url, user_is_secret=True)
    database = settings.database
    for url in (database.url, database.app_url, database.admin_url, database.worker_url):
        if url is not None:
            values += secrets_in_url(url.get_secret_value())
    remember(values)


def scrub(text: str) -> str:
    """``text`` with every remembered secret value replaced by ``***``."""
    return _known.scrub(text)
