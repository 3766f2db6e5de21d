"""Engines, transactions and the translation of driver errors into numbering's errors.

PostgreSQL is the production database. SQLite is supported for trying numbering out and
for embedded single-machine use; it is serializable by construction, and numbering starts
every SQLite transaction with ``BEGIN IMMEDIATE`` so that two writers queue on the busy
timeout instead of failing late with "database is locked".
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session

from numbering.errors import (
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    DeadlockConflict,
    KeyRaceConflict,
    LockNotAvailable,
    NumberingError,
    SerializationConflict,
)
from numbering.schema import LEDGER_KEY_CONSTRAINT, SEQUENCE_NAME_CONSTRAINT

__all__ = [
    "DEFAULT_SQLITE_BUSY_TIMEOUT",
    "SUPPORTED_BACKENDS",
    "begin",
    "create_engine",
    "is_sqlite",
    "translate_error",
]

SUPPORTED_BACKENDS = ("postgresql", "sqlite")
# Execution option that marks a connection's transactions as read-only.
READONLY_OPTION = "numbering_readonly"
# Seconds an SQLite writer waits for another one to commit before "database is locked".
DEFAULT_SQLITE_BUSY_TIMEOUT = 30.0

# SQLSTATEs after which the connection is gone and the outcome of a COMMIT is unknown.
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")
# SQLite result codes: SQLITE_BUSY, SQLITE_LOCKED and their extended forms.
_SQLITE_BUSY_CODES = {5, 6, 261, 262, 517, 773}


def create_engine(
    url: str | URL, *, idle_transaction_timeout: float | None = None, **kwargs: Any
) -> Engine:
    """Create an SQLAlchemy engine set up the way numbering needs it.

    On SQLite: a busy timeout, WAL journaling, foreign keys on, and ``BEGIN IMMEDIATE`` for
    every transaction. On PostgreSQL: ``application_name=numbering`` so that its sessions
    can be told apart in ``pg_stat_activity``, and with ``idle_transaction_timeout``
    (seconds) PostgreSQL ends a session left idle inside a transaction that long, so a
    frozen process cannot hold a sequence's lock for ever. Extra keyword arguments go to
    :func:`sqlalchemy.create_engine`.

    >>> engine = create_engine("sqlite:///numbering.db")
    """
    url = make_url(url)
    backend = url.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise DatabaseError(
            f"unsupported database {backend!r}; numbering supports "
            f"{' and '.join(SUPPORTED_BACKENDS)}"
        )
    if backend == "postgresql":
        if url.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; numbering ships with psycopg2.
            url = url.set(drivername="postgresql+psycopg2")
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("application_name", "numbering")
        connect_args.setdefault("connect_timeout", 10)
        # Notice a server that vanished without a word (partition, NAT drop) in about
        # 25 s instead of the system's default two hours.
        connect_args.setdefault("keepalives", 1)
        connect_args.setdefault("keepalives_idle", 10)
        connect_args.setdefault("keepalives_interval", 5)
        connect_args.setdefault("keepalives_count", 3)
        if idle_transaction_timeout is not None:
            milliseconds = max(1, round(idle_transaction_timeout * 1000))
            connect_args.setdefault(
                "options", f"-c idle_in_transaction_session_timeout={milliseconds}"
            )
        return sa.create_engine(url, connect_args=connect_args, **kwargs)

    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", DEFAULT_SQLITE_BUSY_TIMEOUT)
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop pysqlite from issuing its own BEGIN (it would start DEFERRED transactions,
        # late and only before writes); numbering issues BEGIN IMMEDIATE itself below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if url.database and url.database != ":memory:":
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front; read-only work (audits, exports) reads a
        # WAL snapshot without blocking them.
        readonly = connection.get_execution_options().get(READONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def is_sqlite(bind: Engine | Connection | Session) -> bool:
    """Whether ``bind`` (an engine, connection or ORM session) talks to SQLite."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "sqlite"


def begin(engine: Engine, isolation_level: str, *, readonly: bool = False) -> Connection:
    """Return a connection from ``engine`` set to ``isolation_level`` (a canonical level).

    SQLite has one level (serializable), so the level is only applied on PostgreSQL.
    ``readonly`` transactions take no write lock on SQLite and are READ ONLY on PostgreSQL.
    """
    connection = engine.connect()
    if is_sqlite(connection):
        return connection.execution_options(**{READONLY_OPTION: readonly})
    return connection.execution_options(
        isolation_level=isolation_level, postgresql_readonly=readonly
    )


def _sqlstate(orig: BaseException | None) -> str | None:
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _constraint(orig: BaseException | None) -> str | None:
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    return name if isinstance(name, str) else None


def translate_error(exc: sa.exc.DBAPIError) -> NumberingError:
    """Map a driver error to numbering's error tree; the caller raises it ``from exc``."""
    orig = exc.orig
    sqlstate = _sqlstate(orig)
    constraint = _constraint(orig)
    detail = str(orig).strip().splitlines()[0] if orig is not None else str(exc)

    if exc.connection_invalidated or (
        sqlstate is not None and sqlstate.startswith(_CONNECTION_SQLSTATES)
    ):
        return ConnectionLost(
            f"database connection lost: {detail}", sqlstate=sqlstate, constraint=constraint
        )
    if sqlstate == "40001":
        return SerializationConflict(
            f"serialization failure (SQLSTATE 40001): {detail}", sqlstate=sqlstate
        )
    if sqlstate == "40P01":
        return DeadlockConflict(f"deadlock detected (SQLSTATE 40P01): {detail}", sqlstate=sqlstate)
    if sqlstate == "55P03":
        return LockNotAvailable(
            f"sequence is locked by another transaction (SQLSTATE 55P03): {detail}",
            sqlstate=sqlstate,
        )
    if isinstance(orig, sqlite3.OperationalError) and (
        getattr(orig, "sqlite_errorcode", None) in _SQLITE_BUSY_CODES
        or "database is locked" in detail
    ):
        return LockNotAvailable(f"SQLite database is locked: {detail}")
    if constraint == LEDGER_KEY_CONSTRAINT or (
        isinstance(orig, sqlite3.IntegrityError) and "numbering_ledger.request_key" in detail
    ):
        return KeyRaceConflict(
            "another transaction assigned the same request key at the same time",
            sqlstate=sqlstate,
            constraint=LEDGER_KEY_CONSTRAINT,
        )
    if constraint == SEQUENCE_NAME_CONSTRAINT or (
        isinstance(orig, sqlite3.IntegrityError) and "numbering_sequence.name" in detail
    ):
        return DatabaseError(
            f"duplicate sequence name: {detail}",
            sqlstate=sqlstate,
            constraint=SEQUENCE_NAME_CONSTRAINT,
        )
    if sqlstate == "42P01" or (
        isinstance(orig, sqlite3.OperationalError) and "no such table: numbering_" in detail
    ):
        return DatabaseError(
            f"numbering's tables are missing; run `numbering init-db` first ({detail})",
            sqlstate=sqlstate,
        )
    if isinstance(exc, sa.exc.OperationalError) and not isinstance(orig, sqlite3.Error):
        # psycopg2 reports a refused connection without an SQLSTATE; a connection that
        # dropped mid-transaction was caught above as invalidated.
        return DatabaseUnavailable(f"cannot connect to the database: {detail}")
    return DatabaseError(f"database error: {detail}", sqlstate=sqlstate, constraint=constraint)
