"""`memchat serve`: the app in browsers, one private link per user (docs/security.md, "The web").

No Textual import here (the engine's contract): the app runs in its own
process per tab, started through textual-serve's AppService (which imports
aiohttp and rich only) as ``python -m tui.launch --as-user USER``.
"""
