"""What a database engine must provide, and the defaults that SQLAlchemy Core gives.

A :class:`Backend` says *which SQL with what semantics* an engine needs: how to connect and
start a transaction, how to lock a counter, insert a row unless it exists, tell a
serialization failure from a lost connection, hold the one-consumer lock, serialise
migrations, keep the ledger append-only, check that a COMMIT is durable, and number a
chunk of rows in place. It runs nothing on its own initiative: whoever owns the
transaction (an *executor*) runs what it hands out. Today the executors are a SQLAlchemy
``Connection`` or ``Session`` (:class:`numbering.store.CoreStore`) and, on PostgreSQL
through psycopg2, the pipelined executor of :mod:`numbering.backends.psycopg2`; a Django
connection can be a third one without any change here.

The defaults below are the portable SQLAlchemy Core forms; an engine overrides what it
does differently. A new engine is one module with a subclass, listed in
:mod:`numbering.backends`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, Table
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from numbering.errors import NumberingError
from numbering.schema import sequences

if TYPE_CHECKING:
    from numbering.store import CoreStore

T = TypeVar("T")

_log = logging.getLogger("numbering.worker")

__all__ = [
    "SessionLock",
    "Backend",
    "ChunkIds",
    "ConsumerLock",
    "Durability",
    "Pipelined",
    "SessionOptions",
]


class Pipelined(Protocol):
    """Runs ``work(connection)`` as one pipelined transaction at ``isolation_level``."""

    def __call__(self, isolation_level: str, work: Callable[[Connection], T]) -> T: ...


class ConsumerLock(Protocol):
    """The lock that makes its holder the active consumer of a queue; the operating
    system or the database releases it the moment the holder's process dies."""

    queue: str

    @property
    def held(self) -> bool: ...

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process now holds it."""

    def still_held(self) -> bool:
        """False once the lock was lost (its database session died)."""

    def release(self) -> None: ...


@contextmanager
def connected(database: Engine | Connection) -> Iterator[Connection]:
    """``database`` itself when it is a connection, else a connection of its own."""
    if isinstance(database, Connection):
        yield database
        return
    with database.connect() as connection:
        yield connection


@dataclass(frozen=True)
class SessionOptions:
    """How numbering's sessions start (the keywords of :func:`numbering.create_engine`);
    an engine applies what it has."""

    #: Seconds a session may sit idle inside a transaction before the server ends it.
    idle_transaction_timeout: float | None = None
    #: The replication wait of every COMMIT (PostgreSQL's ``synchronous_commit``).
    synchronous_commit: str | None = "on"


@dataclass
class Durability:
    """What a worker's start-up check found out about the database's durability."""

    #: Why the worker must not start: a number it answers with could be handed out again
    #: (after a crash, or after a failover to a standby).
    problems: list[str] = field(default_factory=list)
    #: What the operator should know, without refusing to start.
    warnings: list[str] = field(default_factory=list)
    #: The state found, one line each (``numbering status`` shows them).
    facts: list[str] = field(default_factory=list)


# The ledger's columns that nothing may change once a row is written.
_KEPT = (
    "id", "sequence_id", "cycle", "value", "count", "request_key", "assigned_at", "reference",
    "formatted",
)  # fmt: skip


def only_a_void(same: str) -> str:
    """The one UPDATE of a ledger row revision 0002 allows (``same``: the engine's
    null-safe equality): assigned -> voided with a reason and a time, nothing else."""
    kept = " AND ".join(f"NEW.{column} {same} OLD.{column}" for column in _KEPT)
    return (
        "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
        f"AND NEW.voided_at IS NOT NULL AND {kept}"
    )


def only_a_void_or_chaining(same: str) -> str:
    """Revision 0004's: :func:`only_a_void` (keeping the row's place in the chain), or
    chaining a row written before chains, once (its link and fingerprint set, nothing
    else changed)."""
    kept = " AND ".join(f"NEW.{column} {same} OLD.{column}" for column in _KEPT)
    void = (
        f"{only_a_void(same)} AND NEW.link {same} OLD.link "
        f"AND NEW.fingerprint {same} OLD.fingerprint"
    )
    chaining = (
        "OLD.link IS NULL AND OLD.fingerprint IS NULL AND NEW.link IS NOT NULL "
        f"AND NEW.fingerprint IS NOT NULL AND {kept} AND NEW.status {same} OLD.status "
        f"AND NEW.void_reason {same} OLD.void_reason AND NEW.voided_at {same} OLD.voided_at"
    )
    return f"({void}) OR ({chaining})"


#: What the chain table's triggers say to an UPDATE or a DELETE.
CHAIN_APPEND_ONLY = "numbering_chain is append-only: its records are never deleted or changed"
#: The one DELETE the chain table takes: the start of a chain that holds nothing else,
#: with its counter (a sequence created by mistake and deleted before it gave a number).
CHAIN_START_ALONE = (
    "OLD.kind = 'start' AND OLD.link = 1 "
    "AND NOT EXISTS (SELECT 1 FROM numbering_ledger WHERE sequence_id = OLD.sequence_id) "
    "AND EXISTS (SELECT 1 FROM numbering_sequence WHERE id = OLD.sequence_id "
    "AND chain_link = 1)"
)


def driver_error(dialect: sa.Dialect, exc: Exception) -> sa.exc.DBAPIError:
    """``exc``, a driver's own error raised outside SQLAlchemy's statement handling (for
    example while a checked-out connection is being set up), wrapped as SQLAlchemy wraps
    a statement's error, so that :func:`numbering.database.translate_error` knows it."""
    wrapped = sa.exc.DBAPIError.instance(
        None,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=dialect.is_disconnect(exc, None, None),  # type: ignore[arg-type]
        dialect=dialect,
    )
    assert isinstance(wrapped, sa.exc.DBAPIError)  # exc is the driver's Error
    return wrapped


class SessionLock:
    """A lock the database holds for a session: the session is a connection of its own
    (autocommit), kept while the lock is held, and the server drops the lock the moment
    the session ends. An engine says how to take the lock (:meth:`take`) and how to
    tell it still holds it (:meth:`holds`)."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self.engine = engine
        self.queue = queue
        self._connection: Connection | None = None

    def take(self, connection: Connection) -> bool:
        """Try to take the lock on ``connection``, without waiting."""
        raise NotImplementedError

    def holds(self, connection: Connection) -> bool:
        """Whether ``connection``'s session still holds the lock (raises if it is gone)."""
        raise NotImplementedError

    @property
    def held(self) -> bool:
        return self._connection is not None

    def try_acquire(self) -> bool:
        if self._connection is not None:
            return True
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = self.take(connection)
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
            mine = self.holds(self._connection)
        except sa.exc.DBAPIError:
            mine = False
        if not mine:
            _log.warning("lost the consumer lock's database session for %s", self.queue)
            self.release()
        return mine

    def release(self) -> None:
        if self._connection is not None:
            # Invalidate, not close: a closed connection goes back to the pool with its
            # session, and the session would keep holding the lock.
            try:
                self._connection.invalidate()
                self._connection.close()
            except sa.exc.DBAPIError:  # already gone; the server dropped the lock with it
                pass
            self._connection = None


#: The rows locked for one chunk of a batch job: how many, the first and last id in
#: numbering order, and the ids (a list, or an engine's own array text).
ChunkIds = tuple[int, Any, Any, "list[Any] | str"]


class Backend:
    """One database engine; see the module doc. Instances hold no state."""

    #: SQLAlchemy's backend name (``URL.get_backend_name()``).
    name: ClassVar[str]
    #: How people write it.
    label: ClassVar[str]
    #: An example URL, for error messages.
    url_example: ClassVar[str]
    #: Other spellings of the URL's scheme, rewritten before parsing.
    url_aliases: ClassVar[Mapping[str, str]] = {}
    #: Alembic's batch mode (copy-and-move tables) for ALTERs the engine cannot do.
    alembic_batch_mode: ClassVar[bool] = False
    #: Whether constraints can be added and renamed in place (revisions 0002, 0003).
    alters_constraints: ClassVar[bool] = True
    #: Whether the key look-up after the counter's lock must be a locking read to see
    #: what the transaction it waited for committed (InnoDB at REPEATABLE READ).
    locking_look_up: ClassVar[bool] = False
    #: Whether several transactions can write at once (SQLite: one writer at a time, so
    #: a worker keeps one batch in flight).
    concurrent_writers: ClassVar[bool] = True

    # -- connections and transactions -----------------------------------------------------

    def queues_behind_commit(self, isolation_level: str) -> bool:
        """Whether a transaction at ``isolation_level`` may ask for a counter's lock while
        the holder's COMMIT is on its way, and then go on with the row the holder
        committed. False where it would fail on that row instead (a serialization
        failure, retried at a cost): the next batch then waits for the commit first."""
        return False

    def normalize_url(self, url: URL) -> URL:
        """``url`` with the driver numbering uses when it names none."""
        return url

    def create_engine(self, url: URL, sessions: SessionOptions, **kwargs: Any) -> Engine:
        """An engine set up the way numbering needs it (see :func:`numbering.create_engine`)."""
        return sa.create_engine(url, **kwargs)

    def assignment_preamble(self, bind: Session | Connection) -> str | None:
        """The statement :meth:`prepare_assignment` would run, for stores that send it
        together with their first statement (None: nothing to run)."""
        return None

    def prepare_assignment(self, bind: Session | Connection) -> None:
        """Make the transaction of ``bind`` (numbering's, or a caller's) as durable as an
        assignment needs, before its first statement; runs nothing where the engine's
        connections are already set up so."""

    def forget_notices(self, connection: Connection) -> None:
        """Drop what the server said on ``connection`` before a transaction starts."""

    def commit_doubt(self, connection: Connection) -> NumberingError | None:
        """After a COMMIT the server answered with success: the error to raise when it
        said, on the way, that the commit may not survive a failover (the transaction is
        then resolved like a lost connection: by looking its keys up again)."""
        return None

    def engine_options(self, isolation_level: str) -> dict[str, Any]:
        """Options for an engine numbering creates for transactions at ``isolation_level``
        (where the engine's sessions are better started at that level)."""
        return {}

    def transaction_options(
        self, engine: Engine, isolation_level: str, readonly: bool
    ) -> dict[str, Any]:
        """Execution options that start a connection's transactions on ``engine`` as
        asked."""
        return {"isolation_level": isolation_level}

    def database_absent(self, url: URL) -> bool:
        """True when connecting would create an empty database (a missing file)."""
        return False

    def location(self, url: URL) -> str:
        """Where the database is, for people: host and database name."""
        return f"{url.host}/{url.database}"

    # -- errors -----------------------------------------------------------------------------

    def classify(self, exc: sa.exc.DBAPIError, detail: str) -> NumberingError | None:
        """numbering's error for a driver error this engine raised, or None when the error
        is not this engine's (:func:`numbering.database.translate_error` asks each)."""
        return None

    # -- the allocator's statements ---------------------------------------------------------

    def lock_counter(self, name: str, nowait: bool) -> list[Executable]:
        """Statements that lock counter row ``name`` until the transaction ends; the last
        one returns the row (none: no such counter)."""
        return [sa.select(sequences).where(sequences.c.name == name).with_for_update(nowait=nowait)]

    def take_plain(self, dialect: sa.Dialect) -> list[Executable] | None:
        """Statements that give one request with a fresh key its block from a *plain*
        counter (a sequence with no period, format or freeze, and room for the block
        before its maximum; looping ones for one value at a time), writing the counter
        and the ledger row with no planning between the counter's lock and the writes.

        Parameters: ``name``, ``count``, ``key``, ``reference`` and ``now``. Every
        statement but the last changes the counter row (no row: the counter is not
        plain or not there, and nothing was written); the last returns the block's
        ``value`` and ``cycle`` (no row: as before). None: the engine has no such path
        and every request takes the general one (lock, look up, plan, write).
        """
        return None

    def insert_if_absent(
        self, table: Table, values: Mapping[str, Any], unique: Sequence[str] | None = None
    ) -> Executable:
        """An INSERT of ``values`` that does nothing when a row with the same ``unique``
        columns exists (any unique key when None), waiting for a concurrent inserter."""
        raise NotImplementedError(f"{self.label}: insert_if_absent")

    def store(self, bind: Session | Connection) -> CoreStore:
        """The fastest store (executor) that works on ``bind``'s driver."""
        from numbering.store import CoreStore

        return CoreStore(bind, self)

    def pipelined(self, engine: Engine) -> Pipelined | None:
        """A runner of pipelined transactions on ``engine``, where its driver has one."""
        return None

    def lock_table_shared(self, bind: Session | Connection, table: Table) -> None:
        """Keep other transactions from writing ``table`` until this one ends (the import
        of numbers already in a table reads its maximum under this lock)."""

    # -- one consumer per queue ----------------------------------------------------------------

    def consumer_lock(self, engine: Engine, queue: str) -> ConsumerLock:
        raise NotImplementedError(f"{self.label}: consumer_lock")

    def consumer_alive(self, database: Engine | Connection, queue: str) -> bool:
        """True when some process holds ``queue``'s consumer lock (asked on a connection
        of ``database``'s own, or on ``database`` itself when it is a connection)."""
        engine = database.engine if isinstance(database, Connection) else database
        probe = self.consumer_lock(engine, queue)
        if probe.try_acquire():  # free: nobody consumes
            probe.release()
            return False
        return True

    # -- schema -------------------------------------------------------------------------------

    def migration_lock(self, connection: Connection) -> None:
        """Serialise concurrent ``init-db`` runs for the rest of ``connection``'s
        transaction (nothing to do where the first DDL already does)."""

    def migration_unlock(self, connection: Connection) -> None:
        """Release what :meth:`migration_lock` took, where the transaction's end does not."""

    def ledger_triggers(self, chain: bool = False) -> list[str]:
        """DDL that makes the ledger append-only, as revision 0002 creates it, or with
        ``chain`` as revision 0004 does (a row may also be chained once, and the chain's
        own table takes no UPDATE or DELETE at all). Changing it takes a new revision: a
        revision's DDL never changes once released."""
        raise NotImplementedError(f"{self.label}: ledger_triggers")

    def drop_ledger_triggers(self, chain: bool = False) -> list[str]:
        """DDL that undoes :meth:`ledger_triggers` (revision 0002's or 0004's downgrade)."""
        raise NotImplementedError(f"{self.label}: drop_ledger_triggers")

    def constraint_names(self, connection: Connection, table: str) -> set[str]:
        """The names of ``table``'s constraints."""
        return {
            check["name"]
            for check in sa.inspect(connection).get_check_constraints(table)
            if check["name"]
        }

    # -- the worker's start-up checks --------------------------------------------------------

    def timeline(self, dbapi_connection: Any) -> int | None:
        """The history the server is on, from a new DBAPI connection: a number that
        changes when a standby is promoted (None: the engine has no such thing, or the
        server is a standby)."""
        return None

    def durability(self, engine: Engine, *, allow_async_standby: bool = False) -> Durability:
        """Settings under which the database may forget a COMMIT it acknowledged, or a
        failover may bring back a state from before it (``allow_async_standby``: the
        operator accepts that risk of asynchronous standbys, which is then a warning)."""
        return Durability()

    # -- batch jobs -------------------------------------------------------------------------

    def lock_chunk(
        self, connection: Connection, locked: sa.Select[Any], ident: str, order: Sequence[str]
    ) -> ChunkIds | None:
        """Run ``locked`` (a SELECT ... FOR UPDATE of ids, then the ``order`` columns) and
        return the chunk it locked, None when it locked nothing."""
        found = list(connection.execute(locked).scalars())
        return (len(found), found[0], found[-1], found) if found else None

    def write_chunk(
        self,
        connection: Connection,
        table: Table,
        ident: sa.Column[Any],
        number: sa.Column[Any],
        ids: list[Any] | str,
        first: int,
    ) -> int:
        """Give the rows ``ids`` (as :meth:`lock_chunk` returned them) the numbers
        ``first``, ``first + 1``, ... in order; return how many rows were written."""
        result = connection.execute(
            sa.update(table)
            .where(ident == sa.bindparam("_id"))
            .values({number: sa.bindparam("_n")}),
            [{"_id": row_id, "_n": first + i} for i, row_id in enumerate(ids)],
        )
        return int(result.rowcount)
