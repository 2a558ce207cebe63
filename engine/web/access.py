"""Who a browser is: private link tokens, exchanged once for a session cookie.

A token is 256 random bits in a URL printed to the operator; the browser
that opens it gets a session cookie (HttpOnly, SameSite=Strict) naming the
same identity, and the page it then loads never carries the token (the
address bar is replaced). Tokens and session ids are looked up by their
SHA-256, so comparing them leaks no timing about the secret; neither is
ever logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError

COOKIE = "memchat_session"


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str | None
    """The one user a link opens the app for; None: the admin (every user, the inspector)."""

    @property
    def label(self) -> str:
        return self.user_id if self.user_id is not None else "admin (all users)"


@dataclass(frozen=True, slots=True)
class Link:
    identity: Identity
    token: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


class Access:
    """The links of one `memchat serve` run and the sessions their visitors got."""

    def __init__(self, links: Sequence[Link]) -> None:
        self.links = list(links)
        self._by_token = {_digest(link.token): link.identity for link in self.links}
        self._sessions: dict[str, Identity] = {}

    @classmethod
    def fresh(cls, users: Sequence[str]) -> Access:
        identities = [Identity(u) for u in users] + [Identity(None)]
        return cls([Link(i, secrets.token_urlsafe(32)) for i in identities])

    @classmethod
    def kept(cls, path: Path, users: Sequence[str]) -> Access:
        """The links saved by the last run for the same users; new ones otherwise."""
        try:
            saved = json.loads(path.read_text())
            links = [Link(Identity(entry["user"]), str(entry["token"])) for entry in saved]
        except FileNotFoundError:
            return cls.fresh(users)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the kept links in {path}: {exc}") from None
        if [link.identity.user_id for link in links] != [*users, None]:
            return cls.fresh(users)  # other users: other links
        return cls(links)

    def save(self, path: Path) -> None:
        """Write the links (0600) so that ``--keep-links`` can reuse them."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = [{"user": link.identity.user_id, "token": link.token} for link in self.links]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            os.fchmod(fd, 0o600)
            json.dump(data, file)

    def exchange(self, token: str) -> tuple[Identity, str] | None:
        """A new session for a valid token: (identity, session id for the cookie)."""
        identity = self._by_token.get(_digest(token))
        if identity is None:
            return None
        session = secrets.token_urlsafe(32)
        self._sessions[_digest(session)] = identity
        return identity, session

    def session(self, session: str | None) -> Identity | None:
        if not session:
            return None
        return self._sessions.get(_digest(session))
