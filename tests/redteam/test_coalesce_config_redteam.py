"""Red team of memory.coalesce_wait_ms: hostile values, from the file and the environment.

A real `memchat` process on a real database: each value must be refused at
start with one line naming the setting, exit code 2, and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Run

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.mark.parametrize(
    "value",
    ["-1", "10001", "1000000000000000000000", "1.5", "'soon'", "true", "nan", "inf", "[300]"],
)
def test_hostile_coalesce_wait_in_the_file_is_one_line(
    memchat: Run, tmp_path: Path, value: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[memory]\ncoalesce_wait_ms = {value}\n")
    result = memchat("--config", str(bad), "users")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "coalesce_wait_ms" in result.stderr


@pytest.mark.parametrize("value", ["-300", "99999999999", "soon", "", "0x10", "1e3"])
def test_hostile_coalesce_wait_in_the_environment_is_one_line(memchat: Run, value: str) -> None:
    result = memchat("users", env={"MEMCHAT_MEMORY__COALESCE_WAIT_MS": value})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "coalesce_wait_ms" in result.stderr
