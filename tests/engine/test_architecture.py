"""Architecture checks on the syntax tree: who may open the database's cross-user ways in.

Import contracts ([tool.importlinter] in pyproject.toml) cover who imports
what; these cover what an import cannot show: a method called on an object
that came from anywhere.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GATEWAYS = frozenset({"unscoped", "admin", "queue"})
"""Database.unscoped() / admin() / queue(): across users, or the queue functions."""

ALLOWED = ("engine/queue.py", "engine/admin.py", "engine/db/")
"""The job queue and the admin module use the gateways (engine/db defines them)."""


def _sources(allowed: tuple[str, ...] = ALLOWED) -> Iterator[tuple[str, str]]:
    """(path, text) of every engine/tui/bench module outside ``allowed``."""
    for top in ("engine", "tui", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(allowed):
                yield rel, path.read_text(encoding="utf-8")


def _receiver_is_a_database(node: ast.expr) -> bool:
    """``db``, ``self.db``, ``runtime.db``, ``database``: a Database by its name."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in {"db", "database"}


def gateway_uses(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every gateway call on anything (``x.admin()``), and every
    gateway passed around uncalled from something named like a Database
    (``connection = self.db.admin``)."""
    called: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in GATEWAYS
        ):
            called.add(id(node.func))
            yield node.lineno, f"{ast.unparse(node.func)}()"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in GATEWAYS
            and id(node) not in called
            and _receiver_is_a_database(node.value)
        ):
            yield node.lineno, ast.unparse(node)


def test_cross_user_connections_are_opened_only_by_queue_and_admin() -> None:
    offenders = [
        f"{rel}:{line}: {text}"
        for rel, source in _sources()
        for line, text in gateway_uses(ast.parse(source, rel))
    ]
    assert offenders == [], "use engine.queue.JobQueue or engine.admin.AdminReader"


def test_the_gateway_rule_sees_calls_on_anything_and_databases_passed_around() -> None:
    # The rule itself, on code that breaks it in each way it can be broken.
    source = (
        "async def f(runtime, reader, db):\n"
        "    async with runtime.db.admin() as conn: ...\n"
        "    async with reader.whatever.unscoped() as conn: ...\n"
        "    gate = db.queue\n"
        "    ok = runtime.jobs.queue\n"  # an attribute of that name, not a Database's
    )
    assert list(gateway_uses(ast.parse(source))) == [
        (2, "runtime.db.admin()"),
        (3, "reader.whatever.unscoped()"),
        (4, "db.queue"),
    ]


def test_the_allowed_modules_do_use_the_gateways() -> None:
    # Were the names to change, the rule above would pass on nothing.
    found = {
        rel
        for rel, source in _sources(allowed=("engine/db/",))
        if any(gateway_uses(ast.parse(source, rel)))
    }
    assert {"engine/queue.py", "engine/admin.py"} <= found


def test_memory_jobs_statements_live_in_the_queue_and_admin() -> None:
    # The queue owns every statement on memory_jobs; admin reads across users.
    statement = re.compile(r"\b(FROM|UPDATE|INTO)\s+memory_jobs\b")
    offenders = [rel for rel, text in _sources() if statement.search(text)]
    assert offenders == []


def test_the_command_line_starts_without_the_model_client() -> None:
    """`openai` is about 0.7 s of a command's start: `memchat config`, `users`,
    `doctor` and an offline chat must not pay it (only an HTTP model or an
    embeddings endpoint imports it, when it is made)."""
    import subprocess
    import sys

    probe = (
        "import sys, engine.cli.main; "
        "print(sorted(m for m in ('openai', 'textual') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert loaded == "[]", f"imported at start-up: {loaded}"
