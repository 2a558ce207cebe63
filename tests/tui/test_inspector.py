"""The isolation inspector screen, driven with Pilot against a real database."""

from __future__ import annotations

import asyncio
import io

import asyncpg
import pytest
from rich.console import Console
from textual.app import App
from textual.containers import VerticalScroll
from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import LoadingIndicator, Static

from engine.admin import AdminReader, AuditResult, UserOverview
from engine.db import Database
from engine.errors import DatabaseError
from engine.models import Usage
from engine.scenarios import SEED_SCRIPT, SeedResult
from engine.store import Store
from tui.screens.inspector import PAGE_SIZE, InspectorScreen, UserSection

pytestmark = pytest.mark.db

USER_1, USER_2, USER_3 = SEED_SCRIPT
SIZE = (120, 40)


class InspectorHost(App[None]):
    """The smallest app that shows the inspector, as the real app does (pushed)."""

    def __init__(self, reader: AdminReader) -> None:
        super().__init__()
        self.reader = reader

    def on_mount(self) -> None:
        self.push_screen(InspectorScreen(self.reader))


class GatedReader(AdminReader):
    """Holds both reads until the test opens the gate."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.gate = asyncio.Event()

    async def overview(self) -> list[UserOverview]:
        await self.gate.wait()
        return await super().overview()

    async def audit(self) -> AuditResult:
        await self.gate.wait()
        return await super().audit()


class BrokenReader(AdminReader):
    async def overview(self) -> list[UserOverview]:
        raise DatabaseError("lost the database connection: [b]gone[/b]\x1b[2J")


def rendered(widget: Widget) -> str:
    """What the widget draws (border and title included), as plain text."""
    width, height = widget.outer_size
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


def screen_text(app: App[None]) -> str:
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()


def sections(app: App[None]) -> dict[str, UserSection]:
    return {section.user.user_id: section for section in app.screen.query(UserSection)}


async def loaded(pilot: Pilot[None], app: App[None]) -> InspectorScreen:
    """Wait for the screen's load worker, then for the layout it caused."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert isinstance(app.screen, InspectorScreen)
    return app.screen


async def test_shows_a_placeholder_until_the_data_is_read(seeded: SeedResult, db: Database) -> None:
    reader = GatedReader(db)
    app = InspectorHost(reader)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        assert screen.query(LoadingIndicator)
        assert not screen.query(UserSection)
        assert "Running the isolation audit" in rendered(screen.query_one("#audit-body"))
        assert "loading…" in rendered(screen.query_one("#inspector-title"))

        reader.gate.set()
        await loaded(pilot, app)
        assert not screen.query(LoadingIndicator)
        assert list(sections(app)) == [USER_1, USER_2, USER_3]
        assert "3 users" in rendered(screen.query_one("#inspector-title"))


async def test_each_section_holds_exactly_its_users_data(seeded: SeedResult, db: Database) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        shown = {user_id: rendered(section) for user_id, section in sections(app).items()}

    assert list(shown) == [USER_1, USER_2, USER_3]
    assert "2 sessions · 8 messages · 4 memories · jobs: 4 done" in shown[USER_1]
    assert "1 session · 4 messages · 2 memories · jobs: 2 done" in shown[USER_2]
    own_words = {
        USER_1: ["user_1", "Mark", "Gonzales", "anime"],
        USER_2: ["user_2", "John", "Doe", "hike"],
        USER_3: ["user_3", "Jane", "Smith", "gym"],
    }
    for user_id, text in shown.items():
        assert text.splitlines()[0].startswith(f"╭─ {user_id} ")
        for memory in seeded.memories[user_id]:
            assert memory in text
        for session, _ in SEED_SCRIPT[user_id]:
            assert session in text
        for other, words in own_words.items():
            if other != user_id:
                for word in words:
                    assert word not in text, f"{word!r} of {other} in {user_id}'s section"


async def test_memory_rows_show_source_session_and_history(store: Store, db: Database) -> None:
    async with store.scope("alice") as s:
        session = await s.create_session("plans")
        message = await s.append_message(session.session_id, "user", "My name is Al")
        memory = await s.add_memory(
            "Name is Al",
            source_session_id=session.session_id,
            source_message_id=message.message_id,
            actor="job",
        )
        assert memory is not None
        await s.update_memory(memory.memory_id, "Name is Alice", actor="cli")
        await s.add_memory("Added by hand")
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        lines = rendered(sections(app)["alice"]).splitlines()

    row = next(line for line in lines if "Name is Alice" in line)
    assert "plans" in row and "add → update (cli)" in row
    assert any("was: Name is Al" in line for line in lines)
    hand = next(line for line in lines if "Added by hand" in line)
    assert "—" in hand and "add (user)" in hand


async def test_shows_the_audit_verdict(seeded: SeedResult, db: Database) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app)
        audit = rendered(screen.query_one("#audit-body"))
        assert screen.query_one("#audit").has_class("-passed")

    assert "✓ Isolation audit: all 3 checks passed" in audit
    for name in ("Memory sources", "Names", "Row-level security"):
        assert f"✓ {name}" in audit
    assert "✗" not in audit


async def test_a_failed_audit_points_at_the_leak(
    seeded: SeedResult, store: Store, db: Database, database_dsn: str
) -> None:
    async with store.scope("bob") as s:
        await s.ensure_user()
        await s.add_memory("Friends with Mark Gonzales")
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("ALTER TABLE memories NO FORCE ROW LEVEL SECURITY")
    finally:
        await conn.close()

    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app)
        audit = rendered(screen.query_one("#audit-body"))
        assert screen.query_one("#audit").has_class("-failed")
        shown = sections(app)
        # The user the audit points at comes first, marked, with the memory marked.
        assert list(shown) == ["bob", USER_1, USER_2, USER_3]
        assert shown["bob"].has_class("-flagged")
        assert not shown[USER_1].has_class("-flagged")
        bob = rendered(shown["bob"])
        user_1 = rendered(shown[USER_1])

    assert "✗ Isolation audit: 2 of 3 checks FAILED" in audit
    assert "✓ Memory sources" in audit
    assert "✗ Names" in audit and "'Friends with Mark Gonzales'" in audit
    assert "✗ Row-level security" in audit
    assert "memories: row-level security is not forced" in audit
    assert "✗ Friends with Mark Gonzales" in bob
    assert "✗" not in user_1


async def test_r_reloads(seeded: SeedResult, store: Store, db: Database) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        assert "Likes green tea" not in rendered(sections(app)[USER_3])
        async with store.scope(USER_3) as s:
            await s.add_memory("Likes green tea")
        async with store.scope("zoe") as s:
            await s.ensure_user()

        await pilot.press("r")
        screen = await loaded(pilot, app)
        shown = sections(app)
        assert list(shown) == [USER_1, USER_2, USER_3, "zoe"]
        assert "Likes green tea" in rendered(shown[USER_3])
        assert "Likes green tea" not in rendered(shown[USER_2])
        assert "4 users" in rendered(screen.query_one("#inspector-title"))


@pytest.mark.parametrize("key", ["escape", "q"])
async def test_closes(db: Database, key: str) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press(key)
        await pilot.pause()
        assert not isinstance(app.screen, InspectorScreen)
        assert len(app.screen_stack) == 1


async def test_footer_shows_the_keys(db: Database) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        footer = screen_text(app).splitlines()[-1]
    assert "r Refresh" in footer and "esc Close" in footer


async def test_markup_and_escape_sequences_are_shown_literally(store: Store, db: Database) -> None:
    hostile = "[bold]x[/bold] \x1b[2J"
    async with store.scope("eve") as s:
        await s.ensure_user("[i]Eve[/i]\x1b]0;pwned\x07")
        session = await s.create_session("plain")
        await s.append_message(session.session_id, "user", "hi")
        await s.add_memory(hostile, ["[u]tag[/u]"], source_session_id=session.session_id)
    async with db.scoped("eve") as conn:
        # The store keeps controls out of titles; the screen must not rely on it.
        await conn.execute("UPDATE sessions SET title = '[red]t[/red]\x1b[31m'")
        await conn.execute(
            "INSERT INTO memory_jobs (user_id, status, last_error) "
            "VALUES ('eve', 'failed', 'model said [blink]no[/blink]\x1b[5m')"
        )

    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        section = sections(app)["eve"]
        text = rendered(section)
        visible = screen_text(app)

    for shown in (text, visible):
        assert "[bold]x[/bold] \\x1b[2J" in shown
        assert "eve ([i]Eve[/i]\\x1b]0;pwned\\x07)" in shown
        assert "[red]t[/red]\\x1b[31m" in shown
        assert "#[u]tag[/u]" in shown
        assert "model said [blink]no[/blink]\\x1b[5m" in shown
        assert "\x1b" not in shown and "\x07" not in shown


async def test_an_empty_database(db: Database) -> None:
    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app)
        assert not screen.query(UserSection)
        assert "No users yet." in screen_text(app)
        assert "all 3 checks passed" in rendered(screen.query_one("#audit-body"))


async def test_a_failed_read_is_reported_on_the_screen(db: Database) -> None:
    app = InspectorHost(BrokenReader(db))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app)
        assert isinstance(app.screen, InspectorScreen)
        audit = rendered(screen.query_one("#audit-body"))
        assert not screen.query(LoadingIndicator)
    assert "Could not read the database" in audit
    assert "[b]gone[/b]\\x1b[2J" in audit


async def test_many_users_are_mounted_a_page_at_a_time(store: Store, db: Database) -> None:
    users = [f"user{i:03d}" for i in range(PAGE_SIZE * 2 + 10)]
    for user_id in users:
        async with store.scope(user_id) as s:
            await s.ensure_user()
            await s.add_memory(f"Likes the number {user_id[4:]}")

    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app)
        scroller = screen.query_one("#users", VerticalScroll)
        assert list(sections(app)) == users[:PAGE_SIZE]
        more = screen.query_one(".more-users", Static)
        assert "35 more users below" in rendered(more)

        await pilot.press("down")
        await pilot.pause()
        assert scroller.scroll_y == 1
        await pilot.press("pagedown")
        await pilot.pause()
        assert scroller.scroll_y > 1
        await pilot.press("home")
        await pilot.pause()
        assert scroller.scroll_y == 0

        # Reaching the end mounts the next page, until every user is there.
        for _ in range(10):
            if not screen.query(".more-users"):
                break
            await pilot.press("end")
            await pilot.pause()
            await pilot.pause()
        assert list(sections(app)) == users
        assert "user059" in rendered(sections(app)["user059"])


async def _job(
    db: Database,
    user_id: str,
    status: str,
    *,
    error: str | None = None,
    note: str | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
) -> None:
    async with db.scoped(user_id) as conn:
        await conn.execute(
            "INSERT INTO memory_jobs (user_id, status, attempts, last_error, note, "
            "prompt_tokens, completion_tokens) VALUES ($1, $2, 3, $3, $4, $5, $6)",
            user_id,
            status,
            error,
            note,
            *tokens,
        )


async def test_tokens_are_shown_per_user_and_nothing_where_none_were_reported(
    store: Store, db: Database
) -> None:
    for user_id in ("alice", "bob"):
        async with store.scope(user_id) as s:
            session = await s.create_session("plans")
            await s.append_message(session.session_id, "user", "hi")
            usage = Usage(1204, 96) if user_id == "alice" else None
            await s.append_message(session.session_id, "assistant", "hello", usage=usage)
    await _job(db, "alice", "done", tokens=(2410, 120))

    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        alice = rendered(sections(app)["alice"])
        bob = rendered(sections(app)["bob"])

    assert "tokens: chat 1,204 in / 96 out · memory 2,410 in / 120 out" in alice
    assert "tokens" not in bob, "unknown usage is shown as nothing, not as 0"


async def test_the_job_section_shows_failed_jobs_errors_and_notes(
    store: Store, db: Database
) -> None:
    async with store.scope("alice") as s:
        await s.ensure_user()
    await _job(db, "alice", "failed", error="oldest failure, not shown")
    await _job(db, "alice", "done")
    await _job(db, "alice", "done", note="2 changes refused: memory.max_calls_per_job")
    await _job(db, "alice", "failed", error="the endpoint said 500", note="json mode")
    await _job(db, "alice", "failed", error="timed out after 60s")

    app = InspectorHost(AdminReader(db))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        section = sections(app)["alice"]
        text = rendered(section)
        assert section.has_class("-failed-jobs")

    assert "jobs: 2 done, 3 failed, 2 with a note" in text
    lines = text.splitlines()
    shown = [i for i, line in enumerate(lines) if "Failed job" in line or "Job note" in line]
    assert [lines[i].strip("│ ") for i in shown] == [
        "✗ Failed job (3 attempts): timed out after 60s",
        "✗ Failed job (3 attempts): the endpoint said 500",
        "Job note: json mode",
        "Job note: 2 changes refused: memory.max_calls_per_job",
    ]
    assert "oldest failure" not in text
    assert "… and 1 more; all of them: memchat jobs --user alice" in text
