"""Schema migrations (Alembic), run by ``numbering init-db`` or :func:`upgrade`.

numbering keeps its own Alembic version table, ``numbering_alembic_version``, so it can
live in the same database as an application that uses Alembic for its own tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from numbering.database import translate_error

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions: applications that only allocate numbers
# should not pay for loading it.

__all__ = ["VERSION_TABLE", "current_revision", "head_revision", "upgrade"]

VERSION_TABLE = "numbering_alembic_version"


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "numbering:migrations")
    return config


def head_revision() -> str:
    """The newest schema revision this version of numbering knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None before ``init-db``)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Create numbering's tables, or upgrade them to ``revision``; return the revision.

    Safe to run from several processes at once: on PostgreSQL the migration holds an
    advisory lock, so a second process waits and then finds nothing left to do.
    """
    from alembic import command

    config = _config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    current = current_revision(engine)
    assert current is not None
    return current
