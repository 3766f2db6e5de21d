"""MariaDB and MySQL (InnoDB): REPEATABLE READ by default, locking reads to see the present.

Counters are locked with ``SELECT ... FOR UPDATE`` as on PostgreSQL, but InnoDB's plain
reads at REPEATABLE READ come from the transaction's first snapshot: a transaction that
read anything before it waited for a counter's lock would not see a key committed by the
transaction it waited for (measured on MariaDB 10.11). So the key look-up is a locking
read (``LOCK IN SHARE MODE``), which reads the latest committed rows. Errors are told
apart by error number: 1213 deadlock, 1205 lock wait timeout (and MariaDB's answer to
NOWAIT), 3572 MySQL's NOWAIT, 1020 "record has changed since last read" (REPEATABLE READ
with ``innodb_snapshot_isolation=ON``), 1062 duplicate key (the key's name in the
message), 2006/2013 a lost connection. Keys compare byte-exact (``utf8mb4_bin``), so
``Invoice:1`` and ``invoice:1`` are two requests, as everywhere else.

MySQL 8.0 is handled from its documentation (NOWAIT answered with 3572); only MariaDB
10.11 is tested here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, Table
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from numbering import errors
from numbering.backends.base import (
    CHAIN_APPEND_ONLY,
    CHAIN_START_ALONE,
    Backend,
    Durability,
    SessionLock,
    SessionOptions,
    connected,
    driver_error,
    only_a_void_or_chaining,
)
from numbering.plan import Request
from numbering.schema import LEDGER_KEY_CONSTRAINT, SEQUENCE_NAME_CONSTRAINT
from numbering.store import CoreStore, plain_params

__all__ = ["MySQL", "NamedLock"]

log = logging.getLogger("numbering")

# Error numbers (the driver's ``args[0]``).
_DEADLOCK = 1213
_LOCK_WAIT_TIMEOUT = 1205  # also MariaDB's answer to NOWAIT
_NOWAIT = 3572  # MySQL 8.0's answer to NOWAIT
_RECORD_CHANGED = 1020  # REPEATABLE READ conflict with innodb_snapshot_isolation=ON
_DUPLICATE_KEY = 1062
_NO_SUCH_TABLE = 1146
_CONNECTION_LOST = (2006, 2013, 2055, 1927, 4031)  # gone away, lost, killed, timed out
_CANNOT_CONNECT = (2002, 2003, 2005, 1045, 1049)  # no server, refused, host, auth, no db

_DUPLICATE_KEY_NAME = re.compile(r"for key '(?:[^'.]*\.)?([^']+)'")

APPEND_ONLY = "numbering_ledger is append-only: rows are never deleted or changed, only voided"
_ONLY_A_VOID = (
    "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
    "AND NEW.voided_at IS NOT NULL AND NEW.id = OLD.id AND NEW.sequence_id = OLD.sequence_id "
    "AND NEW.cycle = OLD.cycle AND NEW.value = OLD.value AND NEW.count = OLD.count "
    "AND NEW.request_key = OLD.request_key AND NEW.assigned_at = OLD.assigned_at "
    "AND NEW.reference <=> OLD.reference AND NEW.formatted <=> OLD.formatted"
)


def _lock_name(kind: str, what: str = "''") -> str:
    """SQL for the name of numbering's ``kind`` of lock on ``what`` (SQL) in the
    session's database.

    GET_LOCK names are server-wide (PostgreSQL's advisory locks are per database), so
    the database is part of the name: two deployments on one server (a staging and a
    production database, say) never wait on each other's locks. A name is at most 64
    characters and queue names may be longer: a digest.
    """
    return (
        f"CONCAT('numbering-{kind}:', "
        f"LEFT(SHA2(CONCAT(IFNULL(DATABASE(), ''), '/', {what}), 256), 40))"
    )


#: The consumer lock of the queue bound as ``:queue``.
CONSUMER_LOCK = _lock_name("consumer", ":queue")
#: The lock ``init-db`` holds while it migrates.
MIGRATION_LOCK = _lock_name("migrations")


class NamedLock(SessionLock):
    """A named lock (``GET_LOCK``)."""

    def take(self, connection: Connection) -> bool:
        got = connection.execute(
            sa.text(f"SELECT GET_LOCK({CONSUMER_LOCK}, 0)"), {"queue": self.queue}
        ).scalar_one()
        return bool(got == 1)

    def holds(self, connection: Connection) -> bool:
        mine = connection.execute(
            sa.text(f"SELECT IS_USED_LOCK({CONSUMER_LOCK}) = CONNECTION_ID()"),
            {"queue": self.queue},
        ).scalar_one()
        return bool(mine)


#: Execution option: the isolation level for the connection's next transaction.
_LEVEL_OPTION = "numbering_isolation_level"


def _set_transaction_level(connection: Connection) -> None:
    """``begin`` event: before a transaction's first statement, ``SET TRANSACTION
    ISOLATION LEVEL`` (this transaction only) when :data:`_LEVEL_OPTION` asks for another
    level than the session's.

    SQLAlchemy's own ``isolation_level`` option would cost four round trips a
    transaction on MySQL (``SET SESSION`` and ``COMMIT`` at checkout, both again at
    check-in); this costs none at the session's level and one at another.
    The session's level is the engine's (``create_engine(isolation_level=...)``, which
    numbering's allocators pass: :meth:`MySQL.engine_options`) or else the server's,
    and SQLAlchemy reads it at first connect: SQLAlchemy puts it back after its own
    option, and SET TRANSACTION never changes it.
    """
    level = connection.get_execution_options().get(_LEVEL_OPTION)
    if level is None or level == connection.dialect.default_isolation_level:
        return
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
        finally:
            cursor.close()
    except connection.dialect.loaded_dbapi.Error as exc:
        # Raised before SQLAlchemy's own error handling: wrap it the same way.
        lost = driver_error(connection.dialect, exc)
        if lost.connection_invalidated:
            connection.invalidate(exc)
        raise lost from exc


def _json_table_type(kind: sa.types.TypeEngine[Any]) -> str | None:
    """The JSON_TABLE column type that reads ids of column type ``kind`` back exactly,
    None for types that cannot make the round trip through JSON (binary, dates, ...)."""
    if isinstance(kind, sa.Integer):
        return "BIGINT UNSIGNED" if getattr(kind, "unsigned", False) else "BIGINT"
    if isinstance(kind, sa.String) and not isinstance(kind, sa.Enum | sa.LargeBinary):
        return f"VARCHAR({kind.length})" if kind.length else "TEXT"
    return None


def _errno(orig: BaseException | None) -> int | None:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


# Backend.take_plain on MariaDB and MySQL (see PostgreSQL's TAKE_PLAIN). MySQL has no
# data-modifying CTE and no UPDATE ... RETURNING: the UPDATE keeps the new counter in
# session variables (its assignments run left to right unless SIMULTANEOUS_ASSIGNMENT,
# so cycle, which reads the old last_value, goes first: the same either way) and the
# INSERT reads them. Two round trips between lock and commit, as django-sequences'
# upsert and SELECT on MySQL. Every condition but the name's is inside one CASE, which
# no index serves: InnoDB locks every row its UPDATE reads through the index it picks,
# and with "parent_id IS NULL" in the WHERE it picked that index on a small table
# (seen in `make bench-mariadb`: every sequence locked, deadlocks); the name's unique
# index reads the one row.
_FIRST = "COALESCE(last_value + 1, initial_value)"
_WRAPS = f"reset_value IS NOT NULL AND {_FIRST} >= reset_value"
# Whether the counter is plain and has room for the block (see the comment above; a
# counter whose chain has not started, link 0, is not: its first number starts it).
_PLAIN = """\
CASE WHEN parent_id IS NOT NULL OR period IS NOT NULL OR format IS NOT NULL OR frozen
          OR chain_link = 0 THEN 0
     WHEN reset_value IS NULL
     THEN COALESCE(CAST(last_value AS DECIMAL(20)), CAST(initial_value AS DECIMAL(20)) - 1)
          + %(count)s <= COALESCE(max_value, 9223372036854775807)
     ELSE %(count)s = 1 END"""
# The row's chain, as on PostgreSQL: the counter's new head is the SHA-256 of its old
# head and the row's assign record, sent in pieces around the cycle, link and value
# (numbering.chaining.chain_parts); computed from the counter's old values, so the chain
# columns come first in the UPDATE (its assignments run left to right).
_CHAIN_HEAD = f"""\
SHA2(CONCAT(chain_head, CHAR(10 USING utf8mb4), %(chain_before_cycle)s,
            CASE WHEN {_WRAPS} THEN cycle + 1 ELSE cycle END, %(chain_before_link)s,
            chain_link + 1, %(chain_before_value)s,
            CASE WHEN {_WRAPS} THEN initial_value ELSE {_FIRST} END, %(chain_end)s), 256)"""
_TAKE_PLAIN_UPDATE = f"""\
UPDATE numbering_sequence
   SET chain_head = (@numbering_head := {_CHAIN_HEAD}),
       chain_link = (@numbering_link := chain_link + 1),
       cycle = (@numbering_cycle := CASE WHEN {_WRAPS} THEN cycle + 1 ELSE cycle END),
       last_value = (@numbering_last := CASE WHEN {_WRAPS} THEN initial_value
                                             ELSE {_FIRST} + (:count - 1) END),
       updated_at = :now
 WHERE name = :name
   AND {_PLAIN}""".replace("%(", ":").replace(")s", "")
_TAKE_PLAIN_INSERT = """\
INSERT INTO numbering_ledger
       (sequence_id, cycle, value, count, request_key, reference, status, assigned_at,
        formatted, link, fingerprint)
SELECT id, @numbering_cycle, @numbering_last - :count + 1, :count, :key, :reference,
       'assigned', :now, NULL, @numbering_link, @numbering_head
  FROM numbering_sequence WHERE name = :name"""
_NOW = sa.bindparam("now", type_=mysql.DATETIME(fsp=6))
_REFERENCE = sa.bindparam("reference", type_=sa.JSON())
_TAKE_PLAIN_MARIADB: list[Executable] = [
    sa.text(_TAKE_PLAIN_UPDATE).bindparams(_NOW),
    # MariaDB 10.5+ returns what it inserted.
    sa.text(f"{_TAKE_PLAIN_INSERT}\nRETURNING value, cycle").bindparams(_NOW, _REFERENCE),
]
_TAKE_PLAIN_MYSQL: list[Executable] = [
    _TAKE_PLAIN_MARIADB[0],
    sa.text(_TAKE_PLAIN_INSERT).bindparams(_NOW, _REFERENCE),
    sa.text("SELECT @numbering_last - :count + 1 AS value, @numbering_cycle AS cycle"),
]


# MariaDB through mysqlclient, one round trip: mysqlclient enables multi-statements by
# default (Django's MySQL connections too), so the INSERT, which reads and locks the
# counter (FOR UPDATE) and returns the block, travels with the counter's UPDATE. The
# INSERT leaves its key in a session variable, and the UPDATE changes the counter only
# when that is this request's key: a counter that is not plain gets no ledger row and
# no update (a stale variable from an earlier request holds another, fresh key).
# (ROW_COUNT() cannot be the guard: it is -1 after a statement that returned rows.)
_TAKE_PLAIN_ONE_TRIP = f"""\
INSERT INTO numbering_ledger
       (sequence_id, cycle, value, count, request_key, reference, status, assigned_at,
        formatted, link, fingerprint)
SELECT id, (@numbering_cycle := CASE WHEN {_WRAPS} THEN cycle + 1 ELSE cycle END),
       CASE WHEN {_WRAPS} THEN initial_value ELSE {_FIRST} END,
       %(count)s, (@numbering_key := %(key)s), %(reference)s, 'assigned', %(now)s, NULL,
       (@numbering_link := chain_link + 1), (@numbering_head := {_CHAIN_HEAD})
  FROM numbering_sequence
 WHERE name = %(name)s
   AND {_PLAIN}
   FOR UPDATE
RETURNING value, cycle;
UPDATE numbering_sequence
   SET cycle = @numbering_cycle,
       last_value = CASE WHEN {_WRAPS} THEN initial_value ELSE {_FIRST} + (%(count)s - 1) END,
       updated_at = %(now)s, chain_link = @numbering_link, chain_head = @numbering_head
 WHERE name = %(name)s AND @numbering_key = %(key)s"""


class MysqldbStore(CoreStore):
    """:class:`CoreStore`, with :meth:`take_plain` in one round trip (MariaDB through
    mysqlclient with multi-statements, its default)."""

    def take_plain(self, name: str, request: Request, now: datetime) -> tuple[int, int] | None:
        self.prepare()
        connection = self.bind.connection() if isinstance(self.bind, Session) else self.bind
        params = plain_params(name, request, now, json_text=True)
        result = connection.exec_driver_sql(_TAKE_PLAIN_ONE_TRIP, params)
        cursor = result.cursor
        try:
            rows = cursor.fetchall()  # the INSERT's: the block, or nothing
            cursor.nextset()  # the UPDATE's (raises if it failed)
            updated = cursor.rowcount
            while cursor.nextset():  # none: nothing may stay unread on the connection
                pass
        except connection.dialect.loaded_dbapi.Error as exc:
            raise driver_error(connection.dialect, exc) from exc
        finally:
            result.close()
        if not rows:
            return None
        if updated != 1:
            raise errors.DatabaseError(
                f"sequence {name!r}: a ledger row was written but its counter was not "
                "updated; roll the transaction back"
            )
        value, cycle = rows[0]
        return int(value), int(cycle)


class MySQL(Backend):
    name = "mysql"
    label = "MariaDB/MySQL"
    url_example = "mysql://user:password@host/dbname"
    #: Keys look up with a locking read: see the module doc.
    locking_look_up = True

    def queues_behind_commit(self, isolation_level: str) -> bool:
        # InnoDB's locking reads read the latest committed row at every level; at
        # SERIALIZABLE with innodb_snapshot_isolation on they fail with 1020 instead
        # (measured by the concurrency tests: retries there, none elsewhere).
        return isolation_level != "SERIALIZABLE"

    def normalize_url(self, url: URL) -> URL:
        if url.drivername in ("mysql", "mariadb"):
            # mysqlclient, numbering's MySQL driver (pip install 'numbering[mysql]').
            url = url.set(drivername=f"{url.drivername}+mysqldb")
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
        return url

    def create_engine(self, url: URL, sessions: SessionOptions, **kwargs: Any) -> Engine:
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("connect_timeout", 10)
        settings = []
        if sessions.idle_transaction_timeout is not None:
            # MariaDB ends a session idle inside a transaction this long (10.3+); MySQL has
            # no such variable and ignores the line below (see _session_setup).
            seconds = max(1, round(sessions.idle_transaction_timeout))
            settings.append(f"idle_transaction_timeout={seconds}")
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _session_setup(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                for setting in settings:
                    try:
                        cursor.execute(f"SET SESSION {setting}")
                    except dbapi_connection.OperationalError as exc:  # MySQL has no such one
                        log.debug("session setting %s refused: %s", setting, exc)
            finally:
                cursor.close()

        return engine

    def engine_options(self, isolation_level: str) -> dict[str, Any]:
        # Sessions start at the allocator's level (SET SESSION once per connection), so
        # its transactions need no SET TRANSACTION: see _set_transaction_level.
        return {"isolation_level": isolation_level}

    def transaction_options(
        self, engine: Engine, isolation_level: str, readonly: bool
    ) -> dict[str, Any]:
        if not sa.event.contains(engine, "begin", _set_transaction_level):
            sa.event.listen(engine, "begin", _set_transaction_level)  # a caller's engine
        return {_LEVEL_OPTION: isolation_level}

    def classify(self, exc: sa.exc.DBAPIError, detail: str) -> errors.NumberingError | None:
        orig = exc.orig
        if not type(orig).__module__.startswith(("MySQLdb", "pymysql")):
            return None
        number = _errno(orig)
        if number == _DEADLOCK:
            return errors.DeadlockConflict(f"deadlock detected (error 1213): {detail}")
        if number in (_LOCK_WAIT_TIMEOUT, _NOWAIT):
            return errors.LockNotAvailable(
                f"sequence is locked by another transaction (error {number}): {detail}"
            )
        if number == _RECORD_CHANGED:
            return errors.SerializationConflict(f"serialization failure (error 1020): {detail}")
        if number in _CONNECTION_LOST:
            return errors.ConnectionLost(f"database connection lost: {detail}")
        if number in _CANNOT_CONNECT:
            return errors.DatabaseUnavailable(f"cannot connect to the database: {detail}")
        if number == _DUPLICATE_KEY:
            found = _DUPLICATE_KEY_NAME.search(detail)
            key = found.group(1) if found else None
            if key == LEDGER_KEY_CONSTRAINT:
                return errors.KeyRaceConflict(
                    "another transaction assigned the same request key at the same time",
                    constraint=LEDGER_KEY_CONSTRAINT,
                )
            if key == SEQUENCE_NAME_CONSTRAINT:
                return errors.DatabaseError(
                    f"duplicate sequence name: {detail}", constraint=SEQUENCE_NAME_CONSTRAINT
                )
        if number == _NO_SUCH_TABLE and "numbering_" in detail:
            return errors.DatabaseError(
                f"numbering's tables are missing; run `numbering init-db` first ({detail})"
            )
        return errors.DatabaseError(f"database error: {detail}")

    def store(self, bind: Session | Connection) -> CoreStore:
        engine = bind.get_bind() if isinstance(bind, Session) else bind
        dialect = engine.dialect
        if getattr(dialect, "is_mariadb", False) and dialect.driver == "mysqldb":
            return MysqldbStore(bind, self)
        return super().store(bind)

    def take_plain(self, dialect: sa.Dialect) -> list[Executable] | None:
        return _TAKE_PLAIN_MARIADB if getattr(dialect, "is_mariadb", False) else _TAKE_PLAIN_MYSQL

    def insert_if_absent(
        self, table: Table, values: Mapping[str, Any], unique: Sequence[str] | None = None
    ) -> Executable:
        # ON DUPLICATE KEY UPDATE of a column to itself: nothing changes, and unlike
        # INSERT IGNORE no other error (a bad value, a failed check) becomes a warning.
        column = (unique or [next(iter(values))])[0]
        insert = mysql_insert(table).values(dict(values))
        return insert.on_duplicate_key_update({column: table.c[column]})

    def ledger_triggers(self, chain: bool = False) -> list[str]:
        allowed = only_a_void_or_chaining("<=>") if chain else _ONLY_A_VOID
        ddl = [
            "CREATE TRIGGER numbering_ledger_no_delete BEFORE DELETE ON numbering_ledger "
            f"FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY}'",
            "CREATE TRIGGER numbering_ledger_only_void BEFORE UPDATE ON numbering_ledger "
            f"FOR EACH ROW BEGIN IF NOT ({allowed}) THEN "
            f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY}'; END IF; END",
        ]
        if chain:
            ddl += [
                "CREATE TRIGGER numbering_chain_no_delete BEFORE DELETE ON numbering_chain "
                f"FOR EACH ROW BEGIN IF NOT ({CHAIN_START_ALONE}) THEN "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{CHAIN_APPEND_ONLY}'; END IF; END",
                "CREATE TRIGGER numbering_chain_no_update BEFORE UPDATE ON numbering_chain "
                f"FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{CHAIN_APPEND_ONLY}'",
            ]
        return ddl

    def drop_ledger_triggers(self, chain: bool = False) -> list[str]:
        ddl = [
            "DROP TRIGGER numbering_ledger_only_void",
            "DROP TRIGGER numbering_ledger_no_delete",
        ]
        if chain:
            ddl += [
                "DROP TRIGGER numbering_chain_no_update",
                "DROP TRIGGER numbering_chain_no_delete",
            ]
        return ddl

    def write_chunk(
        self,
        connection: Connection,
        table: Table,
        ident: sa.Column[Any],
        number: sa.Column[Any],
        ids: list[Any] | str,
        first: int,
    ) -> int:
        kind = _json_table_type(ident.type)
        if kind is None or isinstance(ids, str):
            return super().write_chunk(connection, table, ident, number, ids, first)
        # One statement, as on PostgreSQL: the ids go as one JSON array, and JSON_TABLE
        # (MariaDB 10.6+, MySQL 8.0) numbers each by its position. One UPDATE per row
        # through executemany was ten times slower (docs/benchmarks.md).
        quote = connection.dialect.identifier_preparer
        target = quote.format_table(table)
        statement = (
            f"UPDATE {target} JOIN JSON_TABLE(:ids, '$[*]' COLUMNS ("
            f"numbering_position FOR ORDINALITY, numbering_id {kind} PATH '$')) "
            "AS numbering_chunk "
            f"ON {target}.{quote.quote(ident.name)} = numbering_chunk.numbering_id "
            f"SET {target}.{quote.quote(number.name)} = "
            ":before + numbering_chunk.numbering_position"
        )
        result = connection.execute(
            sa.text(statement), {"ids": json.dumps(ids), "before": first - 1}
        )
        return int(result.rowcount)

    def consumer_lock(self, engine: Engine, queue: str) -> NamedLock:
        return NamedLock(engine, queue)

    def consumer_alive(self, database: Engine | Connection, queue: str) -> bool:
        # Looks without taking, as on PostgreSQL.
        with connected(database) as connection:
            holder = connection.execute(
                sa.text(f"SELECT IS_USED_LOCK({CONSUMER_LOCK})"), {"queue": queue}
            ).scalar_one()
        return holder is not None

    def migration_lock(self, connection: Connection) -> None:
        # DDL commits implicitly here, so a transaction-scoped lock would not hold: a
        # session lock, which a second `init-db` waits for; released by migration_unlock.
        got = connection.execute(sa.text(f"SELECT GET_LOCK({MIGRATION_LOCK}, 600)")).scalar_one()
        if got != 1:
            raise errors.DatabaseError(
                "timed out waiting for another `numbering init-db` to finish"
            )

    def migration_unlock(self, connection: Connection) -> None:
        connection.execute(sa.text(f"SELECT RELEASE_LOCK({MIGRATION_LOCK})"))

    def durability(self, engine: Engine, *, allow_async_standby: bool = False) -> Durability:
        with engine.connect() as connection:
            row = connection.execute(
                sa.text(
                    "SELECT VERSION(), @@innodb_flush_log_at_trx_commit, @@log_bin, @@sync_binlog"
                )
            ).one()
            # SQLAlchemy read it at connect from tx_isolation (MariaDB, MySQL 5.7) or
            # transaction_isolation (MySQL 8.0, which has no tx_isolation).
            isolation = connection.dialect.default_isolation_level
            engines = connection.execute(
                sa.text(
                    "SELECT table_name, engine FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name LIKE 'numbering%'"
                )
            ).all()
        version, flush, log_bin, sync_binlog = row
        found = Durability(facts=[f"{version}, server default isolation {isolation}"])
        if int(flush) != 1:
            found.problems.append(
                f"innodb_flush_log_at_trx_commit is {flush}: a crash can forget numbers "
                "already handed out; set it to 1"
            )
        if int(log_bin) and int(sync_binlog) != 1:
            found.problems.append(
                f"the binary log is on with sync_binlog={sync_binlog}: a crash can lose "
                "committed numbers from it (and from replicas); set sync_binlog=1"
            )
        for table, kind in engines:
            if str(kind).lower() != "innodb":
                found.problems.append(
                    f"table {table} uses the {kind} storage engine; numbering needs InnoDB "
                    f"(ALTER TABLE {table} ENGINE=InnoDB)"
                )
        return found
