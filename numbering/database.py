"""Engines, transactions and the translation of driver errors into numbering's errors.

What differs between engines (connection options, how a transaction starts, which error
means what) is each engine's backend (:mod:`numbering.backends`); this module is the
front door the rest of numbering uses.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from numbering.backends import UnsupportedDatabase, backend_for, classify, names
from numbering.backends.base import SessionOptions, driver_error
from numbering.backends.sqlite import DEFAULT_BUSY_TIMEOUT
from numbering.errors import ConnectionLost, DatabaseError, NumberingError
from numbering.validation import check_isolation_level

__all__ = [
    "DEFAULT_SQLITE_BUSY_TIMEOUT",
    "SUPPORTED_BACKENDS",
    "begin",
    "create_engine",
    "engine_options_for",
    "translate_error",
]

SUPPORTED_BACKENDS = names()
#: Seconds an SQLite writer waits for another one to commit before "database is locked".
DEFAULT_SQLITE_BUSY_TIMEOUT = DEFAULT_BUSY_TIMEOUT


def create_engine(
    url: str | URL,
    *,
    idle_transaction_timeout: float | None = None,
    synchronous_commit: str | None = "on",
    **kwargs: Any,
) -> Engine:
    """Create an SQLAlchemy engine set up the way numbering needs it.

    On SQLite: a busy timeout, WAL journaling, foreign keys on, and ``BEGIN IMMEDIATE`` for
    every transaction. On PostgreSQL: ``application_name=numbering`` so that its sessions
    can be told apart in ``pg_stat_activity``, and with ``idle_transaction_timeout``
    (seconds) PostgreSQL ends a session left idle inside a transaction that long, so a
    frozen process cannot hold a sequence's lock for ever. Every session starts with
    ``synchronous_commit`` (``on``; ``remote_apply`` where standbys are read; None: the
    server's, the role's or the database's default), so that no default can make a
    COMMIT return before the synchronous standby has it. Extra keyword arguments go to
    :func:`sqlalchemy.create_engine`.

    >>> engine = create_engine("sqlite:///numbering.db")
    """
    url = make_url(url)
    try:
        backend = backend_for(url)
    except UnsupportedDatabase as exc:
        raise DatabaseError(str(exc)) from None
    sessions = SessionOptions(idle_transaction_timeout, synchronous_commit)
    return backend.create_engine(backend.normalize_url(url), sessions, **kwargs)


def engine_options_for(url: str | URL, isolation_level: str) -> dict[str, Any]:
    """Options for an engine at ``url`` that runs transactions at ``isolation_level``
    (on MySQL its sessions start at that level); none for an unknown engine, whose
    error :func:`create_engine` gives."""
    try:
        backend = backend_for(make_url(url))
    except (UnsupportedDatabase, sa.exc.ArgumentError):
        return {}
    return backend.engine_options(check_isolation_level(isolation_level))


def begin(engine: Engine, isolation_level: str, *, readonly: bool = False) -> Connection:
    """Return a connection from ``engine`` set to ``isolation_level`` (a canonical level).

    Where an engine has one level (SQLite: serializable) the level is not applied.
    ``readonly`` transactions take no write lock on SQLite and are READ ONLY on PostgreSQL.
    """
    options = backend_for(engine).transaction_options(engine, isolation_level, readonly)
    connection = engine.connect()
    try:
        return connection.execution_options(**options)
    except engine.dialect.loaded_dbapi.Error as exc:
        # Setting a level may run a statement on the driver's connection directly, whose
        # error (a lost connection, say) is the driver's own: wrap it as any statement's
        # error is, and never hand the connection, its state unknown, back to the pool.
        connection.invalidate()
        connection.close()
        raise driver_error(engine.dialect, exc) from exc


def translate_error(exc: sa.exc.DBAPIError) -> NumberingError:
    """Map a driver error to numbering's error tree; the caller raises it ``from exc``."""
    orig = exc.orig
    detail = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    found = classify(exc, detail) or DatabaseError(f"database error: {detail}")
    if exc.connection_invalidated and not isinstance(found, ConnectionLost):
        return ConnectionLost(
            f"database connection lost: {detail}",
            sqlstate=getattr(found, "sqlstate", None),
            constraint=getattr(found, "constraint", None),
        )
    return found
