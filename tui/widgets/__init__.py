"""memchat's widgets. None of them runs SQL: they call the engine."""
