"""Alembic environment: runs on the connection handed over by numbering.migrations."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from numbering.migrations import VERSION_TABLE
from numbering.schema import metadata

# Any constant shared by every numbering process; it serialises concurrent init-db runs.
_MIGRATION_LOCK = 7_360_401_111

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
