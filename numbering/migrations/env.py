"""Alembic environment: runs on the connection handed over by numbering.migrations."""

from __future__ import annotations

from alembic import context

from numbering.backends import backend_for
from numbering.migrations import VERSION_TABLE
from numbering.schema import metadata

# numbering.migrations.upgrade() hands over a connection that already holds the lock.
connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=backend_for(connection).alembic_batch_mode,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
