"""PostgreSQL access: the pool, the embedded server, migrations."""

from engine.db.database import Database, DatabaseInfo
from engine.db.dsn import redact_dsn, with_database

__all__ = ["Database", "DatabaseInfo", "redact_dsn", "with_database"]
