"""Demo mode: type the seed scenario into the panes, at a human pace.

All users type at once, each user's messages in order, so a presenter can
show replies streaming side by side and memories appearing per user. It can
be paused (the typing stops at the next character) and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from engine.scenarios import SEED_SCRIPT

if TYPE_CHECKING:
    from tui.app import MemchatApp
    from tui.widgets.pane import UserPane

SCRIPTS = {"seed": SEED_SCRIPT}


class DemoPlayer:
    def __init__(self, app: MemchatApp, *, char_delay: float = 0.04) -> None:
        self.app = app
        self.char_delay = char_delay
        self._task: asyncio.Task[None] | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self.finished = asyncio.Event()
        # The demo that played in this app run (to its end or until stopped).
        # It plays once per run: playing again would type the whole script a
        # second time into the same titled sessions.
        self.played: str | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def start(self, name: str) -> None:
        if self.running:
            return
        script = SCRIPTS.get(name)
        if script is None:
            self.app.notify(
                f"No demo called {name!r}; try: {', '.join(SCRIPTS)}",
                severity="error",
                markup=False,
            )
            return
        if self.played is not None:
            self.app.notify(
                f"The “{self.played}” demo already ran in this app; its sessions are in "
                "the panes. It plays once per run: nothing was typed again.",
                severity="warning",
            )
            return
        self.played = name
        self.finished.clear()
        self._resume.set()
        self._task = asyncio.create_task(self._play(script))
        self.app.notify(f"Demo “{name}” playing: F4 pauses, shift+F4 stops.")

    def toggle_pause(self) -> None:
        if not self.running:
            return
        if self.paused:
            self._resume.set()
            self.app.notify("Demo resumed.")
        else:
            self._resume.clear()
            self.app.notify("Demo paused: F4 resumes.")

    def stop(self) -> None:
        if self.running and self._task is not None:
            self._task.cancel()
            self.app.notify("Demo stopped.")

    async def _play(self, script: dict[str, list[tuple[str, str]]]) -> None:
        try:
            panes = []
            for user_id in script:
                pane = await self.app.add_pane(user_id)
                if pane is not None:
                    panes.append((pane, script[user_id]))
            await asyncio.gather(*(pane.ready.wait() for pane, _ in panes))
            await asyncio.gather(*(self._type_user(pane, turns) for pane, turns in panes))
        finally:
            self.finished.set()

    async def _type_user(self, pane: UserPane, turns: list[tuple[str, str]]) -> None:
        for session_title, text in turns:
            await self._resume.wait()
            if pane.session is None or pane.session.title != session_title:
                await pane.switch_to_titled(session_title)
            try:
                for char in text:
                    await self._resume.wait()
                    pane.input.value += char
                    await asyncio.sleep(self.char_delay)
            except asyncio.CancelledError:
                # Stopped mid-line: the half-typed line was the demo's, not the user's.
                pane.input.take()
                raise
            worker = pane.send(pane.input.take())
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.wait()
