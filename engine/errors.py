"""Errors that reach a user. Each carries a message fit to print as one line."""

from __future__ import annotations


class MemchatError(Exception):
    """Base for every error memchat reports to a user instead of a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(MemchatError):
    """A settings file or variable is broken."""

    exit_code = 2


class InvalidInput(MemchatError):
    """Something the user typed or passed cannot be accepted as it is."""

    exit_code = 2


class NotFound(MemchatError):
    """An id that does not exist for this user (or belongs to another one)."""

    exit_code = 3


class DatabaseError(MemchatError):
    """PostgreSQL could not be reached or refused the work."""

    exit_code = 4
