"""Issue 12 finding 9: `memchat scenario seed` never deletes data a person made.

Real `memchat` processes on a real PostgreSQL: a person's chats under the
app's default user ids, and under a seed id, must survive the scenario.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from engine.scenarios import SEED_SCRIPT

pytestmark = [pytest.mark.db, pytest.mark.slow]

Run = Callable[..., subprocess.CompletedProcess[str]]


def sessions_of(memchat: Run, user_id: str) -> list[str]:
    result = memchat("sessions", "--user", user_id, "--json")
    assert result.returncode == 0, result.stderr
    return [s["title"] for s in json.loads(result.stdout)]


def test_seed_leaves_the_default_users_alone_and_repeats(memchat: Run) -> None:
    assert not any(u.startswith("user_") for u in SEED_SCRIPT)
    assert memchat("chat", "--user", "user_1@example.com", "my own notes").returncode == 0
    for _ in range(2):  # repeatable: its own users are reset each time
        seed = memchat("scenario", "seed", "--json")
        assert seed.returncode == 0, seed.stderr
        assert "Name is Mark Gonzales" in json.loads(seed.stdout)["users"]["seed-1@example.com"]
    assert sessions_of(memchat, "user_1@example.com") == ["my own notes"]
    assert len(sessions_of(memchat, "seed-1@example.com")) == 2


def test_seed_refuses_to_delete_a_person_under_a_seed_id(memchat: Run) -> None:
    assert memchat("chat", "--user", "seed-2@example.com", "mine, not a demo").returncode == 0
    seed = memchat("scenario", "seed")
    assert seed.returncode == 2
    lines = seed.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed-2@example.com exists and was not created by" in lines[0]
    assert sessions_of(memchat, "seed-2@example.com") == ["mine, not a demo"]
    assert sessions_of(memchat, "seed-1@example.com") == []  # nothing was started
