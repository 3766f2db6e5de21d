"""PostgreSQL: the production database.

Counters are locked with ``SELECT ... FOR UPDATE`` (NOWAIT answered with SQLSTATE 55P03),
a period's counter is created with ``INSERT ... ON CONFLICT DO NOTHING``, errors are told
apart by SQLSTATE, the one-consumer lock is a session advisory lock on a dedicated
connection, migrations serialise on a transaction advisory lock, and the ledger is kept
append-only by a PL/pgSQL trigger. Through psycopg2 (numbering's own driver) the
allocator's transactions are pipelined (:mod:`numbering.backends.psycopg2`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, Table
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from numbering.backends.base import Backend, ChunkIds, Pipelined
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

if TYPE_CHECKING:
    from numbering.store import CoreStore

__all__ = ["AdvisoryLock", "PostgreSQL"]

log = logging.getLogger("numbering.worker")

#: Any constant shared by every numbering process; it serialises concurrent migrations.
MIGRATION_LOCK_KEY = 7_360_401_111
# SQLSTATEs after which the connection is gone and the outcome of a COMMIT is unknown.
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")

_ONLY_A_VOID = (
    "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
    "AND NEW.voided_at IS NOT NULL AND NEW.id = OLD.id AND NEW.sequence_id = OLD.sequence_id "
    "AND NEW.cycle = OLD.cycle AND NEW.value = OLD.value AND NEW.count = OLD.count "
    "AND NEW.request_key = OLD.request_key AND NEW.assigned_at = OLD.assigned_at "
    "AND NEW.reference IS NOT DISTINCT FROM OLD.reference "
    "AND NEW.formatted IS NOT DISTINCT FROM OLD.formatted"
)
APPEND_ONLY = "numbering_ledger is append-only: rows are never deleted or changed, only voided"


def _lock_key(queue: str) -> int:
    digest = hashlib.sha256(f"numbering-consumer:{queue}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _sqlstate(orig: BaseException | None) -> str | None:
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _constraint(orig: BaseException | None) -> str | None:
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    return name if isinstance(name, str) else None


class AdvisoryLock:
    """A session advisory lock held on a connection of its own (autocommit)."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self.engine = engine
        self.queue = queue
        self._connection: Connection | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None

    def try_acquire(self) -> bool:
        if self._connection is not None:
            return True
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": _lock_key(self.queue)}
            ).scalar_one()
        except Exception:
            connection.close()
            raise
        if got:
            self._connection = connection
            return True
        connection.close()
        return False

    def still_held(self) -> bool:
        if self._connection is None:
            return False
        try:
            self._connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError:
            log.warning("lost the consumer lock's database session for %s", self.queue)
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._connection is not None:
            # Invalidate, not close: a closed connection goes back to the pool with its
            # session, and the session would keep holding the advisory lock.
            try:
                self._connection.invalidate()
                self._connection.close()
            except sa.exc.DBAPIError:  # already gone; the server dropped the lock with it
                pass
            self._connection = None


class PostgreSQL(Backend):
    name = "postgresql"
    label = "PostgreSQL"
    url_example = "postgresql://user:password@host/dbname"
    # The spelling Heroku and others hand out.
    url_aliases: ClassVar[Mapping[str, str]] = {"postgres://": "postgresql://"}

    def normalize_url(self, url: URL) -> URL:
        if url.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; numbering ships with psycopg2.
            return url.set(drivername="postgresql+psycopg2")
        return url

    def create_engine(
        self, url: URL, *, idle_transaction_timeout: float | None, **kwargs: Any
    ) -> Engine:
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

    def transaction_options(self, isolation_level: str, readonly: bool) -> dict[str, Any]:
        return {"isolation_level": isolation_level, "postgresql_readonly": readonly}

    def classify(self, exc: sa.exc.DBAPIError, detail: str) -> NumberingError | None:
        orig = exc.orig
        sqlstate, constraint = _sqlstate(orig), _constraint(orig)
        if sqlstate is None and not type(orig).__module__.startswith("psycopg"):
            return None
        if sqlstate is not None and sqlstate.startswith(_CONNECTION_SQLSTATES):
            return ConnectionLost(
                f"database connection lost: {detail}", sqlstate=sqlstate, constraint=constraint
            )
        if sqlstate == "40001":
            return SerializationConflict(
                f"serialization failure (SQLSTATE 40001): {detail}", sqlstate=sqlstate
            )
        if sqlstate == "40P01":
            return DeadlockConflict(
                f"deadlock detected (SQLSTATE 40P01): {detail}", sqlstate=sqlstate
            )
        if sqlstate == "55P03":
            return LockNotAvailable(
                f"sequence is locked by another transaction (SQLSTATE 55P03): {detail}",
                sqlstate=sqlstate,
            )
        if constraint == LEDGER_KEY_CONSTRAINT:
            return KeyRaceConflict(
                "another transaction assigned the same request key at the same time",
                sqlstate=sqlstate,
                constraint=LEDGER_KEY_CONSTRAINT,
            )
        if constraint == SEQUENCE_NAME_CONSTRAINT:
            return DatabaseError(
                f"duplicate sequence name: {detail}",
                sqlstate=sqlstate,
                constraint=SEQUENCE_NAME_CONSTRAINT,
            )
        if sqlstate == "42P01":
            return DatabaseError(
                f"numbering's tables are missing; run `numbering init-db` first ({detail})",
                sqlstate=sqlstate,
            )
        if sqlstate is None and isinstance(exc, sa.exc.OperationalError):
            # psycopg2 reports a refused connection without an SQLSTATE; a connection
            # that dropped mid-transaction was caught as invalidated before this.
            return DatabaseUnavailable(f"cannot connect to the database: {detail}")
        return DatabaseError(f"database error: {detail}", sqlstate=sqlstate, constraint=constraint)

    def insert_if_absent(
        self, table: Table, values: Mapping[str, Any], unique: Sequence[str] | None = None
    ) -> Executable:
        return pg_insert(table).values(dict(values)).on_conflict_do_nothing(index_elements=unique)

    def store(self, bind: Session | Connection) -> CoreStore:
        engine = bind.get_bind() if isinstance(bind, Session) else bind
        if engine.dialect.driver == "psycopg2":
            from numbering.backends.psycopg2 import Psycopg2Store

            return Psycopg2Store(bind, self)
        return super().store(bind)

    def pipelined(self, engine: Engine) -> Pipelined | None:
        if engine.dialect.driver != "psycopg2":
            return None
        from numbering.backends.psycopg2 import pipelined

        return pipelined(engine)

    def lock_table_shared(self, bind: Session | Connection, table: Table) -> None:
        connection = bind.connection() if isinstance(bind, Session) else bind
        quoted = connection.dialect.identifier_preparer.format_table(table)
        bind.execute(sa.text(f"LOCK TABLE {quoted} IN SHARE MODE"))

    def consumer_lock(self, engine: Engine, queue: str) -> AdvisoryLock:
        return AdvisoryLock(engine, queue)

    def consumer_alive(self, engine: Engine, queue: str) -> bool:
        # Looks without taking: a probe that took the lock for a moment would make a
        # standby that asks at that moment wait a turn.
        key = _lock_key(queue) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows the key as two oids
        with engine.connect() as connection:
            found = connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :high AND objid = :low AND objsubid = 1 AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"high": key >> 32, "low": key & 0xFFFFFFFF},
            ).scalar_one()
        return bool(found)

    def migration_lock(self, connection: Connection) -> None:
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )

    def ledger_triggers(self) -> list[str]:
        return [
            f"""
    CREATE FUNCTION numbering_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND {_ONLY_A_VOID} THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '{APPEND_ONLY}' USING ERRCODE = '55000';
    END $$
    """,
            "CREATE TRIGGER numbering_ledger_append_only BEFORE UPDATE OR DELETE ON "
            "numbering_ledger FOR EACH ROW EXECUTE FUNCTION numbering_ledger_append_only()",
            "CREATE TRIGGER numbering_ledger_no_truncate BEFORE TRUNCATE ON numbering_ledger "
            "FOR EACH STATEMENT EXECUTE FUNCTION numbering_ledger_append_only()",
        ]

    def drop_ledger_triggers(self) -> list[str]:
        return [
            "DROP TRIGGER numbering_ledger_no_truncate ON numbering_ledger",
            "DROP TRIGGER numbering_ledger_append_only ON numbering_ledger",
            "DROP FUNCTION numbering_ledger_append_only()",
        ]

    def constraint_names(self, connection: Connection, table: str) -> set[str]:
        return set(
            connection.execute(
                sa.text("SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)"),
                {"t": table},
            ).scalars()
        )

    def durability_problems(self, connection: Connection) -> list[str]:
        problems = []
        for setting, unsafe in (("synchronous_commit", "off"), ("fsync", "off")):
            value = connection.execute(sa.text(f"SHOW {setting}")).scalar_one()
            if value == unsafe:
                problems.append(
                    f"PostgreSQL runs with {setting}={value}: a crash can forget numbers "
                    f"already handed out; set {setting}=on for this database or role"
                )
        return problems

    def lock_chunk(
        self, connection: Connection, locked: sa.Select[Any], ident: str, order: Sequence[str]
    ) -> ChunkIds | None:
        # The ids come back as the server's own array text and are sent back as they
        # came: a 10,000-element ARRAY[...] built by the driver cost the server about
        # 50 ms a chunk to parse, more than the update itself.
        rows = locked.subquery("chunk")
        in_order = [rows.c[column] for column in (*order, ident)]
        ids = sa.func.array_agg(aggregate_order_by(rows.c[ident], *in_order))
        count, first, last, literal = connection.execute(
            sa.select(
                sa.func.count(), ids[1], ids[sa.func.count()], sa.cast(ids, sa.Text)
            ).select_from(rows)
        ).one()
        return (count, first, last, literal) if count else None

    def write_chunk(
        self,
        connection: Connection,
        table: Table,
        ident: sa.Column[Any],
        number: sa.Column[Any],
        ids: list[Any] | str,
        first: int,
    ) -> int:
        if not isinstance(ids, str):
            return super().write_chunk(connection, table, ident, number, ids, first)
        # One statement; PostgreSQL computes each number from the id's position.
        ordered = (
            sa.func.unnest(sa.cast(sa.bindparam("ids", type_=sa.Text), sa.ARRAY(ident.type)))
            .table_valued("id", with_ordinality="ordinality")
            .render_derived(name="chunk")
        )
        result = connection.execute(
            sa.update(table)
            .values({number: first - 1 + ordered.c.ordinality})
            .where(ident == ordered.c.id),
            {"ids": ids},
        )
        return int(result.rowcount)
