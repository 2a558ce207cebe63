"""Log lines rendered like everything else memchat shows: literal, without secrets.

Library exceptions and model servers put arbitrary text into log records
(an error body with an OSC sequence renamed the terminal tab; OSC 52 writes
the clipboard). :class:`SafeFormatter` passes each whole formatted line,
traceback included, through :func:`engine.terminal.terminal_safe` and
:func:`engine.redact.scrub`. :func:`install_logging` puts it on the one stderr
handler, at CLI and app start (both enter through ``engine.cli.main``).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from engine.redact import scrub
from engine.terminal import terminal_safe

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(scrub(super().format(record)))


def install_logging(verbose: bool, stream: TextIO | None = None) -> logging.Handler:
    """One stderr handler with :class:`SafeFormatter` on the root logger, replacing any other."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True
    )
    return handler
