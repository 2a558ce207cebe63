"""Issue 12 findings 11 and 12 in the app: forged NOTIFY payloads are only hints
to re-read through the user's scope; look-alike user ids are flagged.

Real PostgreSQL, the real event hub; the forger is a separate connection
sending on memchat's channels, as any process connected to the database can.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import pytest

from engine.admin import AdminReader
from engine.config import load_settings
from engine.queue import JOB_CHANNEL
from engine.store import MEMORY_CHANNEL
from tests.tui.conftest import AppFactory, wait_until
from tui.app import MemchatApp, StatusBar
from tui.screens.inspector import user_title

pytestmark = pytest.mark.db


async def _forge(dsn: str, *notifications: tuple[str, dict[str, object]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for channel, payload in notifications:
            await conn.execute("SELECT pg_notify($1, $2)", channel, json.dumps(payload))
    finally:
        await conn.close()


async def test_forged_notifications_change_nothing_shown(
    make_app: AppFactory, database_dsn: str
) -> None:
    app = make_app(["alice"])
    async with app.run_test(size=(120, 40)):
        await app.ready.wait()
        pane = app.pane_of("alice")
        assert pane is not None
        await _forge(
            database_dsn,
            (
                MEMORY_CHANNEL,
                {
                    "user_id": "alice",
                    "memory_id": str(uuid.uuid4()),
                    "op": "add",
                    "content": "EVIL forged memory",
                },
            ),
            (
                JOB_CHANNEL,
                {
                    "user_id": "alice",
                    "job_id": 424242,
                    "state": "failed",
                    "last_error": "EVIL forged failure",
                },
            ),
            (JOB_CHANNEL, {"user_id": "alice", "job_id": 424243, "state": "running"}),
        )
        # A real change after the forged ones: the hub delivers in order, so
        # once it shows, the forged events were handled.
        assert app.runtime is not None
        async with app.runtime.store.scope("alice") as s:
            await s.add_memory("Likes tea")
        await wait_until(lambda: [m.content for m in pane.sidebar._memories] == ["Likes tea"])
        assert pane.sidebar.job_state == "idle"
        assert "EVIL" not in (pane.sidebar.job_error or "")


def _notified(app: MemchatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_look_alike_user_ids_are_flagged(make_app: AppFactory) -> None:
    app = make_app(["alice"])
    async with app.run_test(size=(120, 40)):
        await app.ready.wait()
        assert not any("looks like" in m for m in _notified(app))
        await app.add_pane("aIice")  # capital I
        await wait_until(lambda: any("aiice looks like alice" in m for m in _notified(app)))


async def test_the_start_line_names_the_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "chosen.toml"
    config.write_text('[database]\nurl = "postgresql://me@127.0.0.1:1/none"\nconnect_timeout = 1\n')
    app = MemchatApp(load_settings(config), ["alice"], animate=False, tune_gc=False)
    async with app.run_test(size=(200, 30)):
        bar = app.query_one(StatusBar)
        await wait_until(lambda: "Cannot start" in str(bar.render()))
        assert f"settings: {config} (--config)" in str(bar.render())


async def test_the_inspector_marks_look_alike_users(
    make_app: AppFactory, database_dsn: str
) -> None:
    app = make_app(["alice"])
    async with app.run_test(size=(160, 48)):
        await app.ready.wait()
        assert app.runtime is not None
        async with app.runtime.store.scope("aIice") as s:
            await s.ensure_user()
        overview = {u.user_id: u for u in await AdminReader(app.runtime.db).overview()}
    title = user_title(overview["aiice"]).plain
    assert title == "aiice  ⚠ looks like alice"
    assert user_title(overview["alice"]).plain == "alice  ⚠ looks like aiice"
