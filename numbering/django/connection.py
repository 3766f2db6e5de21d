"""numbering's statements on a Django connection, inside Django's transaction.

numbering's allocator runs SQLAlchemy statements on a SQLAlchemy ``Connection``. Here that
Connection borrows the DBAPI connection Django holds for a database alias, the way
SQLAlchemy runs its own first-connect checks on a raw DBAPI connection (an ad hoc pool
proxy): the statements run in the transaction Django has open, and everything
SQLAlchemy would do to the transaction (begin, commit, roll back, reset) is a no-op on
the engines used here, which never connect. Savepoints are real. So a number taken in a
view commits or rolls back with the view's ``transaction.atomic()``, like
django-sequences' counter row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import _AdhocProxiedConnection

__all__ = ["borrowed"]

# Django's vendor and the driver module of its DBAPI connection -> the SQLAlchemy URL
# whose dialect speaks the same SQL through the same driver.
_URLS = {
    ("postgresql", "psycopg2"): "postgresql+psycopg2://",
    ("postgresql", "psycopg"): "postgresql+psycopg://",
    ("sqlite", "sqlite3"): "sqlite+pysqlite://",
    ("mysql", "MySQLdb"): "mysql+mysqldb://",
    ("mysql", "pymysql"): "mysql+pymysql://",
}
_engines: dict[str, Engine] = {}
_initialized: set[str] = set()
_lock = threading.Lock()


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


class _Record:
    """What a pool entry offers the dialect and the proxy; nothing is pooled."""

    def __init__(self, dbapi_connection: Any) -> None:
        self.dbapi_connection = dbapi_connection
        self.driver_connection = dbapi_connection
        self.info: dict[str, Any] = {}
        self.record_info: dict[str, Any] = {}


class _DjangoSQLiteDateTime(sqlite.DATETIME):
    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        parse = super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            if value is None or isinstance(value, datetime) or parse is None:
                return value
            return parse(value)

        return process


def _decoded(json_type: Any) -> Any:
    """``json_type`` (a dialect's JSON type) with its values decoded when the driver
    gives them as text."""

    class _Decoded(json_type):
        def result_processor(self, dialect: Any, coltype: Any) -> Any:
            def process(value: Any) -> Any:
                return json.loads(value) if isinstance(value, str) else value

            return process

    return _Decoded


class _Proxy(_AdhocProxiedConnection):
    """SQLAlchemy's ad hoc proxy, with the per-connection ``info`` numbering's backends
    keep state in (for this borrowing only)."""

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._connection_record.info
        return info


def _driver(dbapi_connection: Any) -> str:
    module = type(dbapi_connection).__module__.split(".")[0]
    return {"_mysql": "MySQLdb", "_sqlite3": "sqlite3"}.get(module, module)


def _engine_for(vendor: str, driver: str) -> Engine:
    url = _URLS.get((vendor, driver))
    if url is None:
        raise NotImplementedError(
            f"numbering.django does not support Django's {vendor} backend through {driver} "
            "(supported: PostgreSQL through psycopg2 or psycopg, SQLite, MySQL/MariaDB "
            "through mysqlclient or PyMySQL)"
        )
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            if vendor == "sqlite":
                # Django's SQLite connections turn DATETIME columns into datetimes
                # themselves (detect_types): take them as they come.
                engine.dialect.colspecs = {
                    **engine.dialect.colspecs,
                    sa.DateTime: _DjangoSQLiteDateTime,
                }
            if vendor == "postgresql":
                # Django's PostgreSQL connections hand json and jsonb back as text (its
                # JSONField decodes them): decode them here, as SQLAlchemy's own
                # connections would have (a reference read back, its fingerprint).
                colspecs = engine.dialect.colspecs
                engine.dialect.colspecs = {
                    **colspecs,
                    sa.JSON: _decoded(colspecs.get(sa.JSON, sa.JSON)),
                    JSONB: _decoded(colspecs.get(JSONB, JSONB)),
                }
            # Django owns the transaction: SQLAlchemy's own begin, commit and rollback do
            # nothing on these engines (they never hold a connection of their own).
            for method in ("do_begin", "do_commit", "do_rollback", "do_close"):
                setattr(engine.dialect, method, _no_op)
            _engines[url] = engine
    return engine


@contextmanager
def borrowed(django_connection: Any) -> Iterator[Connection]:
    """A SQLAlchemy Connection on ``django_connection``'s DBAPI connection, for the
    duration of the block, in Django's transaction as it is."""
    django_connection.ensure_connection()
    dbapi_connection = django_connection.connection
    engine = _engine_for(django_connection.vendor, _driver(dbapi_connection))
    connection = Connection(
        engine,
        connection=_Proxy(dbapi_connection, _Record(dbapi_connection)),  # type: ignore[arg-type]
        _has_events=False,
        _allow_revalidate=False,
    )
    url = str(engine.url)
    if url not in _initialized:
        with _lock:
            if url not in _initialized:
                # What SQLAlchemy does on an engine's first connect (server version,
                # defaults), once per process and engine.
                engine.dialect.initialize(connection)
                _initialized.add(url)
    try:
        yield connection
    finally:
        # Never closed or reset by SQLAlchemy: the DBAPI connection stays Django's.
        connection._transaction = None
        connection._dbapi_connection = None
