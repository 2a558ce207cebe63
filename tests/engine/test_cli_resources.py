"""Each command opens the lightest it needs (engine/cli/resources.py), and
options that are settings are loaded with the settings, not set after."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.cli import resources
from engine.cli.main import _overrides, build_parser, main


def test_load_options_become_settings_overrides() -> None:
    parser = build_parser()
    load = parser.parse_args(["scenario", "load", "--latency-ms", "5"])
    assert _overrides(load) == {"model": {"offline_latency_ms": 5.0}}
    assert _overrides(parser.parse_args(["scenario", "load"])) == {}
    assert _overrides(parser.parse_args(["sessions", "--user", "a"])) is None


@pytest.fixture
def root_logging() -> Iterator[None]:
    """main() installs its own root handler (force=True): put pytest's back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.db
@pytest.mark.usefixtures("root_logging")
def test_read_only_commands_open_no_model_and_no_workers(
    database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "none.toml"
    config.write_text("")
    monkeypatch.setenv("MEMCHAT_DATABASE__URL", database_dsn)
    # A model that could not even be created: looking at stored data never needs one.
    monkeypatch.setenv("MEMCHAT_MODEL__PROVIDER", "openai")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a read-only command opened the runtime")

    monkeypatch.setattr(resources, "open_runtime", refuse)
    for argv, code in (
        (["memory", "add", "--user", "alice", "Likes green tea"], 0),
        (["memories", "--user", "alice"], 0),
        (["memories", "--user", "alice", "--history"], 0),
        (["memory", "forget", "--user", "alice", str(uuid.uuid4())], 3),
        (["sessions", "--user", "alice"], 0),
        (["history", "--user", "alice", "--session", str(uuid.uuid4())], 3),
        (["users"], 0),
        (["jobs"], 0),
        (["config"], 0),
    ):
        assert main(["--config", str(config), *argv]) == code, argv
