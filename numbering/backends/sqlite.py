"""SQLite: for trying numbering out and for embedded single-machine use.

SQLite is serializable by construction: one writer at a time holds the database's write
lock. numbering starts every writing transaction with ``BEGIN IMMEDIATE``, so two writers
queue on the busy timeout instead of failing late with "database is locked", and takes
that lock before reading a counter (SQLite has no ``FOR UPDATE``). Read-only work
(audits, exports) reads a WAL snapshot without blocking writers. The one-consumer lock is
an ``flock`` on a file next to the database.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, Table, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.sql import Executable

from numbering.backends.base import (
    CHAIN_APPEND_ONLY,
    CHAIN_START_ALONE,
    Backend,
    Durability,
    SessionOptions,
    only_a_void_or_chaining,
)
from numbering.errors import DatabaseError, KeyRaceConflict, LockNotAvailable, NumberingError
from numbering.schema import LEDGER_KEY_CONSTRAINT, SEQUENCE_NAME_CONSTRAINT, sequences

__all__ = ["DEFAULT_BUSY_TIMEOUT", "FileLock", "SQLite"]

#: Seconds a writer waits for another one to commit before "database is locked".
DEFAULT_BUSY_TIMEOUT = 30.0
#: Execution option that marks a connection's transactions as read-only.
READONLY_OPTION = "numbering_readonly"
# SQLite result codes: SQLITE_BUSY, SQLITE_LOCKED and their extended forms.
_BUSY_CODES = {5, 6, 261, 262, 517, 773}

_ONLY_A_VOID = (
    "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
    "AND NEW.voided_at IS NOT NULL AND NEW.id = OLD.id AND NEW.sequence_id = OLD.sequence_id "
    "AND NEW.cycle = OLD.cycle AND NEW.value = OLD.value AND NEW.count = OLD.count "
    "AND NEW.request_key = OLD.request_key AND NEW.assigned_at = OLD.assigned_at "
    "AND NEW.reference IS OLD.reference AND NEW.formatted IS OLD.formatted"
)
APPEND_ONLY = "numbering_ledger is append-only: rows are never deleted or changed, only voided"


class FileLock:
    """An exclusive ``flock`` on ``<database>.<queue>.lock``, next to the database."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self.queue = queue
        self._path = Path(f"{engine.url.database or 'numbering'}.{queue}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SQLite(Backend):
    name = "sqlite"
    label = "SQLite"
    url_example = "sqlite:///numbering.db"
    alembic_batch_mode = True
    alters_constraints = False
    concurrent_writers = False

    def create_engine(self, url: URL, sessions: SessionOptions, **kwargs: Any) -> Engine:
        # One file, no replication: synchronous_commit has no meaning here.
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("timeout", DEFAULT_BUSY_TIMEOUT)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Stop pysqlite from issuing its own BEGIN (it would start DEFERRED
            # transactions, late and only before writes); numbering issues BEGIN
            # IMMEDIATE itself below.
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
            # Writers take the write lock up front; read-only work reads a WAL snapshot
            # without blocking them.
            readonly = connection.get_execution_options().get(READONLY_OPTION, False)
            connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine

    def transaction_options(
        self, engine: Engine, isolation_level: str, readonly: bool
    ) -> dict[str, Any]:
        # One level (serializable): only whether the transaction writes matters.
        return {READONLY_OPTION: readonly}

    def database_absent(self, url: URL) -> bool:
        database = url.database or ""
        return database in ("", ":memory:") or not os.path.exists(database)

    def location(self, url: URL) -> str:
        return url.database or ""

    def classify(self, exc: sa.exc.DBAPIError, detail: str) -> NumberingError | None:
        orig = exc.orig
        if not isinstance(orig, sqlite3.Error):
            return None
        if isinstance(orig, sqlite3.OperationalError) and (
            getattr(orig, "sqlite_errorcode", None) in _BUSY_CODES or "database is locked" in detail
        ):
            return LockNotAvailable(f"SQLite database is locked: {detail}")
        if isinstance(orig, sqlite3.IntegrityError) and "numbering_ledger.request_key" in detail:
            return KeyRaceConflict(
                "another transaction assigned the same request key at the same time",
                constraint=LEDGER_KEY_CONSTRAINT,
            )
        if isinstance(orig, sqlite3.IntegrityError) and "numbering_sequence.name" in detail:
            return DatabaseError(
                f"duplicate sequence name: {detail}", constraint=SEQUENCE_NAME_CONSTRAINT
            )
        if isinstance(orig, sqlite3.OperationalError) and "no such table: numbering_" in detail:
            return DatabaseError(
                f"numbering's tables are missing; run `numbering init-db` first ({detail})"
            )
        return DatabaseError(f"database error: {detail}")

    def lock_counter(self, name: str, nowait: bool) -> list[Executable]:
        # No FOR UPDATE: a write takes the database's write lock (if BEGIN IMMEDIATE has
        # not already) before the counter is read.
        touch = sa.update(sequences).where(sequences.c.name == name).values(cycle=sequences.c.cycle)
        return [touch, sa.select(sequences).where(sequences.c.name == name)]

    def insert_if_absent(
        self, table: Table, values: Mapping[str, Any], unique: Sequence[str] | None = None
    ) -> Executable:
        return (
            sqlite_insert(table).values(dict(values)).on_conflict_do_nothing(index_elements=unique)
        )

    def consumer_lock(self, engine: Engine, queue: str) -> FileLock:
        return FileLock(engine, queue)

    def ledger_triggers(self, chain: bool = False) -> list[str]:
        allowed = only_a_void_or_chaining("IS") if chain else _ONLY_A_VOID
        ddl = [
            f"""
    CREATE TRIGGER numbering_ledger_no_delete BEFORE DELETE ON numbering_ledger
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END
    """,
            f"""
    CREATE TRIGGER numbering_ledger_only_void BEFORE UPDATE ON numbering_ledger
    WHEN NOT ({allowed})
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END
    """,
        ]
        if chain:
            ddl += [
                f"""
    CREATE TRIGGER numbering_chain_no_delete BEFORE DELETE ON numbering_chain
    WHEN NOT ({CHAIN_START_ALONE})
    BEGIN SELECT RAISE(ABORT, '{CHAIN_APPEND_ONLY}'); END
    """,
                f"""
    CREATE TRIGGER numbering_chain_no_update BEFORE UPDATE ON numbering_chain
    BEGIN SELECT RAISE(ABORT, '{CHAIN_APPEND_ONLY}'); END
    """,
            ]
        return ddl

    def drop_ledger_triggers(self, chain: bool = False) -> list[str]:
        ddl = [
            "DROP TRIGGER numbering_ledger_no_delete",
            "DROP TRIGGER numbering_ledger_only_void",
        ]
        if chain:
            ddl += [
                "DROP TRIGGER numbering_chain_no_delete",
                "DROP TRIGGER numbering_chain_no_update",
            ]
        return ddl

    def durability(self, engine: Engine, *, allow_async_standby: bool = False) -> Durability:
        with engine.connect() as connection:
            level = connection.execute(sa.text("PRAGMA synchronous")).scalar_one()
        named = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, str(level))
        found = Durability(facts=[f"SQLite file {engine.url.database}, synchronous={named}"])
        if level < 2:  # 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
            found.problems.append(
                f"SQLite runs with synchronous={level}: a crash can forget numbers already "
                "handed out; use FULL (2) or EXTRA (3)"
            )
        return found
