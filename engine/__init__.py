"""memchat engine: everything that is not drawing. Never imports Textual."""
