"""memchat's Textual app: a client of the engine, never runs SQL itself."""
