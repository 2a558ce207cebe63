"""Export a pane's session to a Markdown file, from the app (Enter on a message, then e)."""

from __future__ import annotations

import uuid
from pathlib import Path

from platformdirs import user_downloads_dir
from textual.app import App

from engine.errors import MemchatError
from engine.export import export_session, file_name, write_new_file
from engine.store import Store
from engine.terminal import terminal_safe


def export_directory() -> Path:
    """Downloads when it exists (as screenshots), else the current directory."""
    downloads = Path(user_downloads_dir())
    return downloads if downloads.is_dir() else Path.cwd()


async def export_to_file(
    app: App[object],
    store: Store,
    user_id: str,
    session_id: uuid.UUID,
    directory: Path | None = None,
) -> Path | None:
    """Write the session into a new file and say where, or say clearly why not."""
    target = directory or export_directory()
    try:
        exported = await export_session(store, user_id, session_id)
        path = write_new_file(target, file_name(exported.session), exported.markdown)
    except MemchatError as exc:
        app.notify(terminal_safe(exc.message), title=user_id, severity="error", markup=False)
        return None
    except OSError as exc:
        app.notify(
            f"Export not saved: {exc.strerror or exc} ({terminal_safe(str(target))})",
            title=user_id,
            severity="error",
            markup=False,
        )
        return None
    app.notify(
        f"Exported {exported.summary} to {terminal_safe(str(path))}",
        title=user_id,
        markup=False,
        timeout=10,
    )
    return path
