"""Generated database passwords, kept in one JSON file only its owner can read.

The embedded server's superuser and memchat's login roles get random
passwords; memchat keeps them in a 0600 file (``memchat-credentials.json`` in
the embedded data dir, or one per external database under the user data
dir). The file is checked before it is believed: a file that someone else
owns, that others may read, or that is a symlink is refused, because its
passwords would no longer be secret (or no longer be ours).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DatabaseError

CREDENTIALS_FILE = "memchat-credentials.json"


def new_password() -> str:
    # URL-safe characters only: they need no quoting in SQL literals or DSNs.
    return secrets.token_urlsafe(24)


@dataclass(slots=True)
class Credentials:
    path: Path
    superuser: str | None
    passwords: dict[str, str]

    def password(self, role: str) -> str | None:
        return self.passwords.get(role)

    def save(self) -> None:
        """Write atomically (temp file + rename), mode 0600 from the start."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"superuser": self.superuser, "passwords": self.passwords}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_credentials(path: Path) -> Credentials:
    """The credentials in ``path`` (empty when the file does not exist yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return Credentials(path, None, {})
    except OSError as exc:
        raise DatabaseError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid != os.geteuid():
            raise DatabaseError(
                f"{path} belongs to uid {info.st_uid}, not to you: refusing to use its passwords"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise DatabaseError(
                f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"its passwords may be known; run `chmod 600 {path}` only if you are sure "
                "nobody read it, otherwise delete it and the roles it names"
            )
        try:
            data = json.load(handle)
            superuser = data.get("superuser")
            passwords = {str(k): str(v) for k, v in data.get("passwords", {}).items()}
        except (ValueError, AttributeError):
            raise DatabaseError(f"{path} is not a memchat credentials file") from None
    return Credentials(path, superuser, passwords)


def external_credentials_path(user_data_dir: Path, dsn: str) -> Path:
    """Where the generated passwords for the database at ``dsn`` are kept (one file each)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ",".join(parse_qs(parts.query).get("host", [])) or "local"
        port = parts.port or 5432
    except ValueError:
        host, port = "unknown", 0
    database = parts.path.lstrip("/") or "postgres"
    key = f"{host}:{port}/{database}"
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:60]
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return user_data_dir / "credentials" / f"{readable}-{digest}.json"
