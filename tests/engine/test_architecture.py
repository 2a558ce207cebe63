"""Cheap architecture checks: who may open the database's cross-user ways in."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Database.unscoped() / admin() / queue(): across users, or the queue functions.
# Only the job queue and the admin module use them (and engine/db itself).
ALLOWED = ("engine/queue.py", "engine/admin.py", "engine/db/")


def _other_sources() -> Iterator[tuple[str, str]]:
    """(path, text) of every engine/tui/bench module outside the allowed ones."""
    for top in ("engine", "tui", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(ALLOWED):
                yield rel, path.read_text(encoding="utf-8")


def test_cross_user_connections_are_opened_only_by_queue_and_admin() -> None:
    # Called or passed around (``db.admin`` without the parentheses counts too).
    call = re.compile(r"\bdb\.(unscoped|admin|queue)\b")
    offenders = [
        f"{rel}:{number}: {line.strip()}"
        for rel, text in _other_sources()
        for number, line in enumerate(text.splitlines(), 1)
        if call.search(line)
    ]
    assert offenders == [], "use engine.queue.JobQueue or engine.admin.AdminReader"


def test_memory_jobs_statements_live_in_the_queue_and_admin() -> None:
    # The queue owns every statement on memory_jobs; admin reads across users.
    statement = re.compile(r"\b(FROM|UPDATE|INTO)\s+memory_jobs\b")
    offenders = [rel for rel, text in _other_sources() if statement.search(text)]
    assert offenders == []
