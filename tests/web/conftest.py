"""The web tests reuse the app fixtures (tests/tui/conftest.py)."""

from tests.tui.conftest import make_app, tui_settings

__all__ = ["make_app", "tui_settings"]
