"""The psycopg2 executor: PostgreSQL's statements as plain SQL, two to a round trip.

An optimisation for PostgreSQL through psycopg2 (numbering's own driver), not a second
engine: the statements mean what :class:`numbering.store.CoreStore` runs on PostgreSQL.

- :class:`Psycopg2Store` sends lock and look-up together (``SELECT ... FOR UPDATE;
  SELECT ...``: the look-up is its own statement, so under READ COMMITTED it takes its
  snapshot *after* the lock is granted, exactly as when sent alone), and so the counter
  updates and the ledger insert. A batch on one sequence costs BEGIN, two round trips and
  COMMIT instead of six round trips, and skips building and compiling Core statements,
  which cost the worker about 4 ms of CPU a batch on a 2-core machine
  (docs/benchmarks.md).
- numbering's own transactions (the worker's batches, :meth:`Allocator.assign
  <numbering.allocator.Allocator.assign>`) go further with a :class:`Pipeline`: ``BEGIN``
  travels with the first statement and the writes with ``COMMIT``, so a batch on one
  sequence is two round trips to PostgreSQL in all (see :func:`run_pipelined`).

Both go through SQLAlchemy's connection (``exec_driver_sql`` for the plain SQL), so
driver errors, lost connections and pool invalidation are handled the same way.
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session

from numbering.backends.postgresql import TAKE_PLAIN
from numbering.errors import DatabaseError
from numbering.plan import CounterUpdate, Prior, Request
from numbering.store import CoreStore, plain_params

if TYPE_CHECKING:
    from numbering.backends.base import Backend, Pipelined

T = TypeVar("T")

__all__ = ["PIPELINE_OPTION", "Pipeline", "Psycopg2Store", "pipelined", "run_pipelined"]

#: Execution option that holds a connection's :class:`Pipeline`.
PIPELINE_OPTION = "numbering_pipeline"


# Lock (in name order, bytewise as Python sorts), then look up in a second statement of
# the same round trip (see the module doc). The look-up's result rides on the first row.
# The second statement returns only the counters the first one locked (their ids pass
# through a transaction-local setting): a counter committed by another transaction
# between the two statements would otherwise come back unlocked, and be assigned from
# without its lock (seen: two first callers of a sequence created meanwhile took the
# same value, refused by the ledger's unique index).
_LOCK_AND_LOOK_UP = """\
SELECT set_config('numbering.locked', coalesce(string_agg(id::text, ','), ''), true)
  FROM (SELECT id FROM numbering_sequence WHERE name = ANY(%(names)s)
         ORDER BY name COLLATE "C" FOR UPDATE{nowait}) AS locked;
SELECT s.*, CASE WHEN row_number() OVER () = 1 THEN (
    SELECT json_agg(json_build_array(
        l.request_key, l.sequence_id, l.cycle, l.value, l.count, o.parent_id, l.formatted,
        o.period_key))
      FROM numbering_ledger l JOIN numbering_sequence o ON o.id = l.sequence_id
     WHERE l.request_key = ANY(%(keys)s)
) END AS numbering_priors
  FROM numbering_sequence s
 WHERE s.id = ANY(string_to_array(current_setting('numbering.locked'), ',')::bigint[])"""

_UPDATE_COUNTER = (
    "UPDATE numbering_sequence SET last_value = %(counter_last)s, "
    "cycle = %(counter_cycle)s, updated_at = %(now)s, chain_link = %(counter_link)s, "
    "chain_head = %(counter_head)s WHERE id = %(counter_id)s;"
)

# The counters of several sequences in one statement: a transaction over 12 sequences
# spent about 0.3 ms more of the server's time on 12 single-row UPDATEs, each parsed and
# planned on its own (pgbench; docs/benchmarks.md). One counter keeps the plain UPDATE,
# which is cheaper to plan than the join.
_UPDATE_COUNTERS = """\
UPDATE numbering_sequence s
   SET last_value = c.last_value, cycle = c.cycle, updated_at = %(now)s,
       chain_link = c.chain_link, chain_head = c.chain_head
  FROM unnest(%(counter_ids)s::bigint[], %(counter_lasts)s::bigint[],
              %(counter_cycles)s::bigint[], %(counter_links)s::bigint[],
              %(counter_heads)s::text[])
       AS c(id, last_value, cycle, chain_link, chain_head)
 WHERE s.id = c.id;"""

# One INSERT for any number of ledger rows: one array per column.
_INSERT_LEDGER = """\
INSERT INTO numbering_ledger
       (sequence_id, cycle, value, count, request_key, reference, status, assigned_at,
        formatted, link, fingerprint)
SELECT sequence_id, cycle, value, count, request_key, reference, status, %(now)s, formatted,
       link, fingerprint
  FROM unnest(%(sequence_id)s::bigint[], %(cycle)s::bigint[], %(value)s::bigint[],
              %(count)s::bigint[], %(request_key)s::text[], %(reference)s::jsonb[],
              %(status)s::text[], %(formatted)s::text[], %(link)s::bigint[],
              %(fingerprint)s::text[])
       AS r(sequence_id, cycle, value, count, request_key, reference, status, formatted,
            link, fingerprint)"""

_LEDGER_ARRAYS = (
    "sequence_id", "cycle", "value", "count", "request_key", "status", "formatted", "link",
    "fingerprint",
)  # fmt: skip

# A chain's records besides the ledger rows (its start, voids, renames).
_INSERT_CHAIN = """\
INSERT INTO numbering_chain (sequence_id, link, kind, record, fingerprint)
SELECT * FROM unnest(%(chain_counters)s::bigint[], %(chain_links)s::bigint[],
                     %(chain_kinds)s::text[], %(chain_records)s::text[],
                     %(chain_fingerprints)s::text[]);"""


class Psycopg2Store(CoreStore):
    """PostgreSQL through psycopg2 (or psycopg 3 with client-side binding, as Django's
    connections have it): two statements to a round trip (see the module doc)."""

    def __init__(self, bind: Session | Connection, backend: Backend) -> None:
        super().__init__(bind, backend)
        self._preamble: str | None = None

    def prepare(self) -> None:
        # Sent in front of the lock, in its round trip.
        self._preamble = self.backend.assignment_preamble(self.bind)

    def lock_and_look_up_many(
        self, names: Sequence[str], keys: Iterable[str], nowait: bool
    ) -> tuple[dict[str, Any], dict[str, Prior]]:
        sql = _LOCK_AND_LOOK_UP.format(nowait=" NOWAIT" if nowait else "")
        if self._preamble is not None:
            sql, self._preamble = f"{self._preamble};\n{sql}", None
        result = self._execute(sql, {"names": list(names), "keys": list(keys)})
        found = self._rows(result)
        rows = {row.name: row for row in found}
        held = found[0].numbering_priors if found else None
        priors = {item[0]: Prior(*item[1:]) for item in held or ()}
        return rows, priors

    def take_plain(self, name: str, request: Request, now: datetime) -> tuple[int, int] | None:
        sql = TAKE_PLAIN
        preamble = self.backend.assignment_preamble(self.bind)
        if preamble is not None:
            sql = f"{preamble};\n{sql}"
        params = plain_params(name, request, now, json_text=True)
        found = self._rows(self._execute(sql, params))
        return (found[0].value, found[0].cycle) if found else None

    def write(
        self,
        updates: Sequence[CounterUpdate],
        rows: Sequence[dict[str, Any]],
        now: datetime,
        records: Sequence[dict[str, Any]] = (),
    ) -> None:
        statements: list[str] = []
        params: dict[str, Any] = {"now": now}
        # One row per counter, its last state winning, as when each was its own UPDATE
        # (a joined UPDATE would apply an arbitrary one of two rows for the same counter).
        counters = list({update.counter_id: update for update in updates}.values())
        if len(counters) == 1:
            [(counter_id, last, cycle, link, head)] = counters
            statements.append(_UPDATE_COUNTER)
            params.update(
                counter_id=counter_id,
                counter_last=last,
                counter_cycle=cycle,
                counter_link=link,
                counter_head=head,
            )
        elif counters:
            statements.append(_UPDATE_COUNTERS)
            params["counter_ids"] = [counter.counter_id for counter in counters]
            params["counter_lasts"] = [counter.last_value for counter in counters]
            params["counter_cycles"] = [counter.cycle for counter in counters]
            params["counter_links"] = [counter.chain_link for counter in counters]
            params["counter_heads"] = [counter.chain_head for counter in counters]
        if records:
            statements.append(_INSERT_CHAIN)
            params["chain_counters"] = [r["sequence_id"] for r in records]
            params["chain_links"] = [r["link"] for r in records]
            params["chain_kinds"] = [r["kind"] for r in records]
            params["chain_records"] = [r["record"] for r in records]
            params["chain_fingerprints"] = [r["fingerprint"] for r in records]
        if rows:
            statements.append(_INSERT_LEDGER)
            for column in _LEDGER_ARRAYS:
                params[column] = [row[column] for row in rows]
            params["reference"] = [
                None if row["reference"] is None else json.dumps(row["reference"]) for row in rows
            ]
        if not statements:
            return
        sql = "\n".join(statements)
        pipeline = _pipeline_of(self.bind)
        if pipeline is None:
            self._execute(sql, params)
        else:  # held back, to go with the next statement or with COMMIT
            assert isinstance(self.bind, Connection)
            pipeline.hold(_mogrify(self.bind, sql, params))

    def _rows(self, result: Any) -> list[Any]:
        """The rows of the last statement of ``result`` (psycopg2 gives those; psycopg 3
        starts at the first statement's)."""
        engine = self.bind.get_bind() if isinstance(self.bind, Session) else self.bind
        if engine.dialect.driver == "psycopg2":
            return list(result.all())
        return _last_result(result)

    def _execute(self, sql: str, params: dict[str, Any]) -> Any:
        if isinstance(self.bind, Session):
            return self.bind.connection().exec_driver_sql(sql, params)
        return self.bind.exec_driver_sql(sql, params)


def _last_result(result: Any) -> list[Any]:
    """The rows of the last statement of a multi-statement ``result`` on psycopg 3 (with
    client-side binding), which starts at the first statement's, where psycopg2 gives
    the last one's."""
    cursor = result.cursor
    while cursor.nextset():
        pass
    row = _row_type(tuple(column.name for column in cursor.description))
    return [row(*values) for values in cursor.fetchall()]


@functools.lru_cache(maxsize=16)
def _row_type(columns: tuple[str, ...]) -> Any:
    return collections.namedtuple("row", columns)


class Pipeline:
    """SQL held back to travel in front of a connection's next statement.

    One round trip carries several statements (psycopg2 sends a query string as it is;
    PostgreSQL runs its statements in order and stops at the first error, which is
    raised as the error of the statement that carried them). What is held back is
    already bound to its parameters, so nothing can be sent out of order: every
    statement on the connection, numbering's or SQLAlchemy's, takes it along.
    """

    def __init__(self, first: str) -> None:
        self._held: list[str] = [first]

    def hold(self, sql: str) -> None:
        """Send ``sql`` (complete, parameters bound) with the next statement."""
        self._held.append(sql)

    def take(self) -> str:
        """What is held back, as a prefix for the next statement; empties the pipeline."""
        text = "".join(f"{sql};\n" for sql in self._held)
        self._held.clear()
        return text

    def clear(self) -> None:
        """Forget what is held back (the transaction failed; it will not be sent)."""
        self._held.clear()


def _pipeline_of(bind: Session | Connection) -> Pipeline | None:
    if isinstance(bind, Session):
        return None
    pipeline = bind.get_execution_options().get(PIPELINE_OPTION)
    return pipeline if isinstance(pipeline, Pipeline) else None


def _mogrify(connection: Connection, sql: str, params: Any) -> str:
    """``sql`` with ``params`` bound exactly as psycopg2 would send it."""
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        return cursor.mogrify(sql, params).decode(_python_encoding(dbapi))  # type: ignore[no-any-return]
    finally:
        cursor.close()


def _python_encoding(dbapi: Any) -> str:
    from psycopg2.extensions import encodings

    return str(encodings.get(dbapi.encoding, "utf-8"))


def _send_held_first(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> tuple[str, Any]:
    """``before_cursor_execute``: put what the connection's pipeline holds in front."""
    pipeline = connection.get_execution_options().get(PIPELINE_OPTION)
    if not isinstance(pipeline, Pipeline):
        return statement, parameters
    prefix = pipeline.take()
    if not prefix:
        return statement, parameters
    if executemany:  # cannot share a round trip with executemany: send it first, alone
        cursor.execute(prefix)
        return statement, parameters
    # Bind this statement's parameters as psycopg2 would (no parameters at all for raw SQL
    # sent without them, so its % signs stay as they are), then send the lot unbound.
    own = parameters if parameters or not context.no_parameters else None
    text = cursor.mogrify(statement, own).decode(_python_encoding(cursor.connection))
    return prefix + text, None


def pipelined(engine: Engine) -> Pipelined:
    """Let ``engine`` (PostgreSQL through psycopg2) run pipelined transactions; return
    the runner: ``run(isolation_level, work)`` is :func:`run_pipelined` on ``engine``."""
    if not event.contains(engine, "before_cursor_execute", _send_held_first):
        event.listen(engine, "before_cursor_execute", _send_held_first, retval=True)

    def run(isolation_level: str, work: Callable[[Connection], T]) -> T:
        return run_pipelined(engine, isolation_level, work)

    return run


def run_pipelined(engine: Engine, isolation_level: str, work: Callable[[Connection], T]) -> T:
    """Run ``work(connection)`` in one transaction on ``engine`` (see
    :func:`enable_pipelining`), with ``BEGIN`` sent along with its first statement and
    whatever the store held back sent along with ``COMMIT``.

    The connection is in driver autocommit mode and the transaction is numbering's own
    SQL: ``work`` must not begin, commit or roll back itself. On any failure the
    transaction is rolled back; a connection whose state is then in doubt is invalidated
    (closed), never handed to the next user of the pool inside a transaction.
    """
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    from numbering.backends import backend_for

    backend = backend_for(engine)
    pipeline = Pipeline(f"BEGIN ISOLATION LEVEL {isolation_level}")
    with engine.connect() as connection:
        connection.execution_options(**{PIPELINE_OPTION: pipeline})
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        # Set on the driver directly: through SQLAlchemy's isolation_level option, handing
        # the connection back to the pool would cost a round trip (SET
        # default_transaction_isolation).
        dbapi.autocommit = True
        try:
            result = work(connection)
            backend.forget_notices(connection)
            done = connection.exec_driver_sql("COMMIT", execution_options={"no_parameters": True})
            status = done.context.cursor.statusmessage
            if status != "COMMIT":
                # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, no error.
                raise DatabaseError(f"the transaction ended with {status}, not COMMIT")
            # Done, but maybe not on the synchronous standby: no answer from it (the
            # retry's lock waits until the standby has it, then finds the keys).
            doubt = backend.commit_doubt(connection)
            if doubt is not None:
                raise doubt
            return result
        except BaseException:
            pipeline.clear()
            if not connection.invalidated:
                try:
                    if dbapi.info.transaction_status != TRANSACTION_STATUS_IDLE:
                        connection.exec_driver_sql(
                            "ROLLBACK", execution_options={"no_parameters": True}
                        )
                except Exception:
                    connection.invalidate()
            raise
        finally:
            if not connection.invalidated:
                try:
                    dbapi.autocommit = False
                except Exception:
                    connection.invalidate()
