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
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, Table, event
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from numbering.backends.base import (
    CHAIN_APPEND_ONLY,
    CHAIN_START_ALONE,
    Backend,
    ChunkIds,
    Durability,
    Pipelined,
    SessionLock,
    SessionOptions,
    connected,
    only_a_void_or_chaining,
)
from numbering.errors import (
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    DeadlockConflict,
    KeyRaceConflict,
    LockNotAvailable,
    NumberingError,
    ReplicationUnconfirmed,
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
# "cannot execute ... in a read-only transaction": this connection reached a standby (the
# old primary, demoted after a failover, or a host listed first in a multi-host URL).
_READ_ONLY_SQLSTATE = "25006"
# Where a connection of numbering's own engines records the synchronous_commit level it
# was opened with (SQLAlchemy's per-DBAPI-connection info): prepare_assignment then has
# nothing to send.
_OWN_LEVEL = "numbering.synchronous_commit"
# The timeline the primary writes WAL on now (it starts a new one when it is a promoted
# standby): the first 8 hex digits of the current WAL file's name.
_TIMELINE = "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
# Where what the server said during a transaction is kept for commit_doubt, and how much.
_NOTICES = "numbering.notices"
_NOTICES_KEPT = 50
# synchronous_commit levels that acknowledge a COMMIT before a standby has it on disk.
_WEAK_LEVELS = ("off", "local", "remote_write")

_ONLY_A_VOID = (
    "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
    "AND NEW.voided_at IS NOT NULL AND NEW.id = OLD.id AND NEW.sequence_id = OLD.sequence_id "
    "AND NEW.cycle = OLD.cycle AND NEW.value = OLD.value AND NEW.count = OLD.count "
    "AND NEW.request_key = OLD.request_key AND NEW.assigned_at = OLD.assigned_at "
    "AND NEW.reference IS NOT DISTINCT FROM OLD.reference "
    "AND NEW.formatted IS NOT DISTINCT FROM OLD.formatted"
)
APPEND_ONLY = "numbering_ledger is append-only: rows are never deleted or changed, only voided"


def _durability(connection: Connection, allow_async_standby: bool) -> Durability:
    def show(setting: str) -> str:
        return str(connection.execute(sa.text(f"SHOW {setting}")).scalar_one())

    found = Durability()
    commit, fsync = show("synchronous_commit"), show("fsync")
    for setting, value in (("synchronous_commit", commit), ("fsync", fsync)):
        if value == "off":
            found.problems.append(
                f"PostgreSQL runs with {setting}={value}: a crash can forget numbers "
                f"already handed out; set {setting}=on for this database or role"
            )
    if connection.execute(sa.text("SELECT pg_is_in_recovery()")).scalar_one():
        found.facts.append("PostgreSQL standby (in recovery, read-only)")
        found.problems.append(
            "the database is a standby (pg_is_in_recovery() is true): numbers come from the "
            "primary only; point NUMBERING_DATABASE_URL at it, or list every server with "
            "?host=A&host=B&target_session_attrs=read-write"
        )
        return found
    names = show("synchronous_standby_names")
    timeline = connection.execute(sa.text(f"SELECT {_TIMELINE}")).scalar_one()
    standbys = connection.execute(
        sa.text(
            "SELECT application_name, state, sync_state FROM pg_stat_replication "
            "ORDER BY application_name"
        )
    ).all()
    streaming = [row for row in standbys if row.state == "streaming"]
    hidden = [row for row in standbys if row.state is None]
    synchronous = [row for row in streaming if row.sync_state in ("sync", "quorum")]
    listed = ", ".join(
        f"{row.application_name} ({row.state}, {row.sync_state})" for row in standbys
    )
    found.facts.append(f"PostgreSQL primary, timeline {timeline}")
    found.facts.append(
        f"synchronous_standby_names: {names!r}" if names else "synchronous_standby_names: none"
    )
    found.facts.append(f"standbys: {listed}" if standbys else "standbys: none connected")
    replicated = bool(names) or bool(standbys)
    if commit == "local" and replicated:
        found.problems.append(
            "PostgreSQL runs with synchronous_commit=local while standbys replicate this "
            "database: a COMMIT is acknowledged before a standby has it, so a failover can "
            "hand out answered numbers again; set synchronous_commit=on for this database "
            "or role (numbering's own sessions force it, other writers do not)"
        )
    if hidden:
        found.problems.append(
            f"this role cannot see the state of {len(hidden)} standby(s) in "
            "pg_stat_replication, so it cannot tell whether a failover could lose answered "
            "numbers; GRANT pg_monitor TO the role numbering connects as"
        )
    elif streaming and not synchronous and not names:
        risk = (
            "only asynchronous standbys replicate this database "
            f"({', '.join(row.application_name for row in streaming)}): a failover to one "
            "of them can hand out numbers that were already answered"
        )
        if allow_async_standby:
            found.warnings.append(
                f"{risk}; running anyway because NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER is set"
            )
        else:
            found.problems.append(
                f"{risk}; make one synchronous (synchronous_standby_names = 'ANY 1 (name)') "
                "or, if this database never fails over automatically, set "
                "NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER=true (docs/ha.md)"
            )
    if names and not synchronous and not hidden:
        found.warnings.append(
            f"synchronous_standby_names is {names!r} but no synchronous standby is connected: "
            "every COMMIT waits until one is (a promoted standby keeps its old primary's "
            "synchronous_standby_names: clear it there)"
        )
    return found


def _take_notices(connection: Connection) -> list[str]:
    """What psycopg2 holds of what the server said, emptied."""
    held = getattr(connection.connection.dbapi_connection, "notices", None)
    if not held:
        return []
    taken = list(held)
    del held[:]
    return taken


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


# Where the block starts and whether it loops back first (plan.next_block, in SQL).
_FIRST = "coalesce(last_value + 1, initial_value)"
_WRAPS = f"reset_value IS NOT NULL AND {_FIRST} >= reset_value"

#: Backend.take_plain on PostgreSQL, one statement: the counter's UPDATE takes its lock
#: and the ledger row goes in with it, so nothing runs between lock and write
#: (django-sequences' upsert holds its lock as briefly). A counter that is not plain is
#: not updated and nothing is inserted. The block's bounds are compared in numeric, so
#: that a counter at the end of bigint's range is refused by the general path, with
#: numbering's error, not by an overflow. The row is chained in the same UPDATE: the
#: counter's new head is the SHA-256 of its old head and the row's assign record
#: (numbering.chain), whose text the client sends in pieces around the values only the
#: UPDATE knows (``numbering.chaining.chain_parts``). A counter whose numbers predate
#: chains (NULL head) gets an unchained row, as on the general path; a counter's first
#: number (link 0: it starts the chain) takes the general path. pyformat (psycopg2's
#: style).
TAKE_PLAIN = f"""\
WITH counter AS (
  UPDATE numbering_sequence
     SET cycle = CASE WHEN {_WRAPS} THEN cycle + 1 ELSE cycle END,
         last_value = CASE WHEN {_WRAPS} THEN initial_value
                           ELSE {_FIRST} + (%(count)s - 1) END,
         updated_at = %(now)s,
         chain_link = chain_link + 1,
         chain_head = encode(sha256(convert_to(
             chain_head || chr(10) || %(chain_before_cycle)s
             || (CASE WHEN {_WRAPS} THEN cycle + 1 ELSE cycle END)::text
             || %(chain_before_link)s || (chain_link + 1)::text || %(chain_before_value)s
             || (CASE WHEN {_WRAPS} THEN initial_value ELSE {_FIRST} END)::text
             || %(chain_end)s, 'UTF8')), 'hex')
   WHERE name = %(name)s AND parent_id IS NULL AND period IS NULL AND format IS NULL
     AND NOT frozen AND coalesce(chain_link, 1) > 0
     AND CASE WHEN reset_value IS NULL
              THEN coalesce(last_value::numeric, initial_value::numeric - 1) + %(count)s
                   <= coalesce(max_value, 9223372036854775807)
              ELSE %(count)s = 1 END
  RETURNING id, cycle, last_value, chain_link, chain_head
)
INSERT INTO numbering_ledger
       (sequence_id, cycle, value, count, request_key, reference, status, assigned_at,
        formatted, link, fingerprint)
SELECT id, cycle, last_value - %(count)s + 1, CAST(%(count)s AS bigint),
       CAST(%(key)s AS text), CAST(%(reference)s AS jsonb), 'assigned',
       CAST(%(now)s AS timestamptz), NULL, chain_link, chain_head
  FROM counter
RETURNING value, cycle"""

# The same for other drivers, with SQLAlchemy's binding (and the columns' types).
_TAKE_PLAIN_TEXT = sa.text(re.sub(r"%\((\w+)\)s", r":\1", TAKE_PLAIN)).bindparams(
    sa.bindparam("now", type_=sa.DateTime(timezone=True)),
    sa.bindparam("reference", type_=JSONB()),
)


class AdvisoryLock(SessionLock):
    """A session advisory lock (``pg_try_advisory_lock``)."""

    def take(self, connection: Connection) -> bool:
        return bool(
            connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": _lock_key(self.queue)}
            ).scalar_one()
        )

    def holds(self, connection: Connection) -> bool:
        connection.execute(sa.text("SELECT 1"))  # the session is alive: it holds the lock
        return True


def _client_side_binding(bind: Session | Connection) -> bool:
    """Whether ``bind`` runs on psycopg 3 with client-side binding (Django's connections
    do), which sends several statements with parameters in one round trip as psycopg2
    does; psycopg 3's own default, server-side binding, cannot."""
    connection = bind.connection() if isinstance(bind, Session) else bind
    if connection.dialect.driver != "psycopg":
        return False
    dbapi = connection.connection.dbapi_connection
    factory = getattr(dbapi, "cursor_factory", None)
    try:
        from psycopg.client_cursor import ClientCursorMixin
    except ImportError:  # pragma: no cover - psycopg 3 is the driver here
        return False
    return isinstance(factory, type) and issubclass(factory, ClientCursorMixin)


class PostgreSQL(Backend):
    name = "postgresql"
    label = "PostgreSQL"
    url_example = "postgresql://user:password@host/dbname"
    # The spelling Heroku and others hand out.
    url_aliases: ClassVar[Mapping[str, str]] = {"postgres://": "postgresql://"}

    def queues_behind_commit(self, isolation_level: str) -> bool:
        # At READ COMMITTED a row lock that waited re-reads the committed row; at
        # REPEATABLE READ and SERIALIZABLE it fails ("could not serialize access").
        return isolation_level == "READ COMMITTED"

    def normalize_url(self, url: URL) -> URL:
        if url.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; numbering ships with psycopg2.
            return url.set(drivername="postgresql+psycopg2")
        return url

    def create_engine(self, url: URL, sessions: SessionOptions, **kwargs: Any) -> Engine:
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("application_name", "numbering")
        connect_args.setdefault("connect_timeout", 10)
        # Notice a server that vanished without a word (partition, NAT drop) in about
        # 25 s instead of the system's default two hours.
        connect_args.setdefault("keepalives", 1)
        connect_args.setdefault("keepalives_idle", 10)
        connect_args.setdefault("keepalives_interval", 5)
        connect_args.setdefault("keepalives_count", 3)
        options = [connect_args.get("options", "")]
        if sessions.idle_transaction_timeout is not None:
            milliseconds = max(1, round(sessions.idle_transaction_timeout * 1000))
            options.append(f"-c idle_in_transaction_session_timeout={milliseconds}")
        synchronous_commit = sessions.synchronous_commit
        if synchronous_commit is not None:
            # Set when the session starts: a role's or a database's default (ALTER ROLE
            # ... SET synchronous_commit = local) cannot weaken numbering's commits, and
            # it costs no statement per transaction.
            options.append(f"-c synchronous_commit={synchronous_commit}")
        if any(options):
            connect_args["options"] = " ".join(option for option in options if option)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def own(dbapi_connection: Any, record: Any) -> None:
            record.info[_OWN_LEVEL] = synchronous_commit

        @event.listens_for(engine, "after_cursor_execute")
        def keep_notices(conn: Connection, cursor: Any, *_: Any) -> None:
            # SQLAlchemy logs what the server said after each statement and empties
            # psycopg2's list; commit_doubt needs it, so it is kept first.
            said = getattr(cursor.connection, "notices", None)
            if said:
                kept = conn.info.setdefault(_NOTICES, [])
                kept.extend(said)
                del kept[:-_NOTICES_KEPT]  # a session outside numbering's transactions

        @event.listens_for(engine, "handle_error")
        def read_only(context: sa.engine.ExceptionContext) -> None:
            # A standby's session is no use: drop it (and the pool, which may hold more
            # of them), so that the retry connects again, through a multi-host URL's
            # target_session_attrs to whichever server is the primary now.
            if _sqlstate(context.original_exception) == _READ_ONLY_SQLSTATE:
                context.is_disconnect = True

        return engine

    def prepare_assignment(self, bind: Session | Connection) -> None:
        preamble = self.assignment_preamble(bind)
        if preamble is not None:
            bind.execute(sa.text(preamble))

    def assignment_preamble(self, bind: Session | Connection) -> str | None:
        """The statement :meth:`prepare_assignment` runs in a caller's own transaction
        (None in numbering's own, whose sessions start so): make its COMMIT wait for the
        synchronous standby too, unless its session already does (remote_apply is kept
        as it is). A store that sends several statements at once sends it with its
        first."""
        connection = bind.connection() if isinstance(bind, Session) else bind
        if connection.info.get(_OWN_LEVEL) is not None:
            return None
        weak = ", ".join(f"'{level}'" for level in _WEAK_LEVELS)
        return (
            "SELECT set_config('synchronous_commit', 'on', true) "
            f"WHERE current_setting('synchronous_commit') IN ({weak})"
        )

    def timeline(self, dbapi_connection: Any) -> int | None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE {_TIMELINE} END")
            (found,) = cursor.fetchone()
        except Exception as exc:  # a server that will not say: no failover watch, no harm
            log.debug("could not read the timeline: %s", exc)
            found = None
        finally:
            cursor.close()
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()
        return None if found is None else int(found)

    def forget_notices(self, connection: Connection) -> None:
        connection.info.pop(_NOTICES, None)
        _take_notices(connection)

    def commit_doubt(self, connection: Connection) -> NumberingError | None:
        # What the server said while it committed (notices were forgotten just before
        # the COMMIT was sent). The one thing PostgreSQL says there is "canceling wait for
        # synchronous replication ... committed locally, but might not have been
        # replicated to the standby": a COMMIT reported as done that a failover can undo.
        # Any notice counts, not only those words: a server set to another language
        # says them in it.
        # Kept from statements (the pipelined COMMIT is one), or left on the driver by
        # SQLAlchemy's own commit(), which runs no statement.
        notices = connection.info.pop(_NOTICES, []) + _take_notices(connection)
        if not notices:
            return None
        said = " ".join(" ".join(notice.split()) for notice in notices)
        return ReplicationUnconfirmed(
            "the database committed, but said so with a warning that it may not survive a "
            f"failover ({said}); the transaction is resolved by looking its keys up again"
        )

    def transaction_options(
        self, engine: Engine, isolation_level: str, readonly: bool
    ) -> dict[str, Any]:
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
        if sqlstate == _READ_ONLY_SQLSTATE:
            return ConnectionLost(
                f"the database server is read-only, a standby (after a failover?): {detail}; "
                "connecting again",
                sqlstate=sqlstate,
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

    def take_plain(self, dialect: sa.Dialect) -> list[Executable] | None:
        return [_TAKE_PLAIN_TEXT]

    def store(self, bind: Session | Connection) -> CoreStore:
        engine = bind.get_bind() if isinstance(bind, Session) else bind
        if engine.dialect.driver == "psycopg2" or _client_side_binding(bind):
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

    def consumer_alive(self, database: Engine | Connection, queue: str) -> bool:
        # Looks without taking: a probe that took the lock for a moment would make a
        # standby that asks at that moment wait a turn.
        key = _lock_key(queue) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows the key as two oids
        with connected(database) as connection:
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

    def ledger_triggers(self, chain: bool = False) -> list[str]:
        allowed = only_a_void_or_chaining("IS NOT DISTINCT FROM") if chain else _ONLY_A_VOID
        ddl = [
            f"""
    CREATE FUNCTION numbering_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND {allowed} THEN
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
        if chain:
            ddl += [
                f"""
    CREATE FUNCTION numbering_chain_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            IF {CHAIN_START_ALONE} THEN
                RETURN OLD;
            END IF;
        END IF;
        RAISE EXCEPTION '{CHAIN_APPEND_ONLY}' USING ERRCODE = '55000';
    END $$
    """,
                "CREATE TRIGGER numbering_chain_append_only BEFORE UPDATE OR DELETE ON "
                "numbering_chain FOR EACH ROW EXECUTE FUNCTION numbering_chain_append_only()",
                "CREATE TRIGGER numbering_chain_no_truncate BEFORE TRUNCATE ON numbering_chain "
                "FOR EACH STATEMENT EXECUTE FUNCTION numbering_chain_append_only()",
            ]
        return ddl

    def drop_ledger_triggers(self, chain: bool = False) -> list[str]:
        ddl = [
            "DROP TRIGGER numbering_ledger_no_truncate ON numbering_ledger",
            "DROP TRIGGER numbering_ledger_append_only ON numbering_ledger",
            "DROP FUNCTION numbering_ledger_append_only()",
        ]
        if chain:
            ddl += [
                "DROP TRIGGER numbering_chain_no_truncate ON numbering_chain",
                "DROP TRIGGER numbering_chain_append_only ON numbering_chain",
                "DROP FUNCTION numbering_chain_append_only()",
            ]
        return ddl

    def constraint_names(self, connection: Connection, table: str) -> set[str]:
        return set(
            connection.execute(
                sa.text("SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)"),
                {"t": table},
            ).scalars()
        )

    def durability(self, engine: Engine, *, allow_async_standby: bool = False) -> Durability:
        # Read on a session of its own, without numbering's synchronous_commit: what a
        # plain session of this role and database gets is what is checked.
        plain = sa.create_engine(
            engine.url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10}
        )
        try:
            with plain.connect() as connection:
                return _durability(connection, allow_async_standby)
        finally:
            plain.dispose()

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
