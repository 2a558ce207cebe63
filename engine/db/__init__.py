"""PostgreSQL access: the pool, the embedded server, migrations."""

from engine.db.database import Database, DatabaseInfo, redact_dsn

__all__ = ["Database", "DatabaseInfo", "redact_dsn"]
