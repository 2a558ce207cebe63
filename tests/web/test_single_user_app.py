"""The app as a `memchat serve` user tab: one pane, no way to another user (Pilot, real PG)."""

from __future__ import annotations

import pytest
from textual.command import CommandPalette

from engine.config import Settings
from engine.runtime import open_runtime
from tests.tui.conftest import AppFactory, wait_until
from tui.app import StatusBar, UserTabs
from tui.screens.inspector import InspectorScreen

pytestmark = pytest.mark.db

ALICE, BOB = "alice@example.com", "bob@example.com"


async def test_a_user_tab_shows_one_pane_and_offers_no_other_user(
    make_app: AppFactory, tui_settings: Settings
) -> None:
    async with (
        open_runtime(tui_settings, run_workers=False) as other,
        other.store.scope(BOB) as bob,
    ):
        await bob.ensure_user()
        await bob.add_memory("bob's secret plan")
    # --users is ignored: the tab is alice's alone.
    app = make_app([ALICE, BOB], single_user=ALICE)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.ready.wait()
        assert [p.user_id for p in app.panes] == [ALICE]
        assert app.runtime is not None and app.runtime.db.only_user == ALICE
        assert not app.query(UserTabs)
        status = str(app.query_one(StatusBar).render())
        assert "memory jobs running" not in status
        for key in ("f3", "ctrl+n", "f9", "alt+2", "f4"):
            await pilot.press(key)
            assert not isinstance(app.screen, InspectorScreen)
            assert [p.user_id for p in app.panes] == [ALICE]
        app.action_inspector()  # even called directly
        await pilot.pause()
        assert not isinstance(app.screen, InspectorScreen)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert any(t.startswith("New session for") for t in titles)
        banned = ("Isolation inspector", "Add user", "Close pane", "Demo", "Focus user")
        assert not [t for t in titles if t.startswith(banned)], titles
        await pilot.press("ctrl+p")
        await wait_until(lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"inspector")
        await pilot.pause(0.3)
        shown = " ".join(str(w.render()) for w in app.screen.query("*"))
        assert "Isolation inspector" not in shown
        assert BOB not in shown and "secret plan" not in shown
