"""The ``memchat`` command."""

from engine.cli.main import main, run

__all__ = ["main", "run"]
