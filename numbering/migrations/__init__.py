"""Schema migrations (Alembic), run by ``numbering init-db`` or :func:`upgrade`.

numbering keeps its own Alembic version table, ``numbering_alembic_version``, so it can
live in the same database as an application that uses Alembic for its own tables.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from numbering.backends import backend_for
from numbering.database import translate_error

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions: applications that only allocate numbers
# should not pay for loading it.

__all__ = [
    "VERSION_TABLE",
    "SchemaUpgrade",
    "current_revision",
    "head_revision",
    "upgrade",
    "upgrade_on",
]

VERSION_TABLE = "numbering_alembic_version"

# Alembic's `context` is one global per process: two threads must not migrate at once.
# Across processes the advisory lock taken in upgrade() does the same job.
_UPGRADE_LOCK = threading.Lock()


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


@dataclass(frozen=True)
class SchemaUpgrade:
    """What :func:`upgrade` did: the revision before and after."""

    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def upgrade(engine: Engine, revision: str = "head") -> SchemaUpgrade:
    """Create numbering's tables, or upgrade them to ``revision``.

    Safe to run from several processes at once: the migration holds the engine's
    migration lock (:meth:`~numbering.backends.base.Backend.migration_lock`), so a second
    process waits and then finds nothing left to do (and says so: the revision before is
    read under the lock).
    """
    try:
        with _UPGRADE_LOCK, engine.begin() as connection:
            return _upgrade_locked(connection, revision)
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def upgrade_on(connection: Connection, revision: str = "head") -> SchemaUpgrade:
    """:func:`upgrade` on ``connection``, in its transaction as it is (the caller's: a
    Django migration's, for instance)."""
    try:
        with _UPGRADE_LOCK:
            return _upgrade_locked(connection, revision)
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def _upgrade_locked(connection: Connection, revision: str) -> SchemaUpgrade:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = _config()
    backend = backend_for(connection)
    backend.migration_lock(connection)
    try:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        before = context.get_current_revision()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        after = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
    finally:
        backend.migration_unlock(connection)
    assert after is not None
    return SchemaUpgrade(before, after)
