"""How the allocator reads and writes the counters and the ledger, in the caller's transaction.

Two implementations of the same four steps (lock a counter and look the request keys up;
lock or create a period's counter; update counters and append ledger rows):

- :class:`CoreStore`, SQLAlchemy Core statements: SQLite, and PostgreSQL through any
  driver;
- :class:`Psycopg2Store`, for PostgreSQL through psycopg2 (numbering's own driver): the
  same statements as plain SQL, two to a round trip. Lock and look-up go together
  (``SELECT ... FOR UPDATE; SELECT ...``: the look-up is its own statement, so under READ
  COMMITTED it takes its snapshot *after* the lock is granted, exactly as when sent
  alone), and so do the counter updates and the ledger insert. A batch on one sequence
  costs BEGIN, two round trips and COMMIT instead of six round trips, and skips building
  and compiling Core statements, which cost the worker about 4 ms of CPU a batch on a
  2-core machine (docs/benchmarks.md).

Both go through SQLAlchemy's connection (``exec_driver_sql`` for the plain SQL), so
driver errors, lost connections and pool invalidation are handled the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from numbering.schema import ledger, sequences

__all__ = ["CoreStore", "CounterUpdate", "Prior", "Psycopg2Store", "store_for"]


class Prior(NamedTuple):
    """What the ledger already holds for a request key."""

    sequence_id: int
    cycle: int
    value: int
    size: int
    parent_id: int | None = None
    formatted: str | None = None
    period: str | None = None


class CounterUpdate(NamedTuple):
    """A counter's new state, written at the end of an assignment."""

    counter_id: int
    last_value: int | None
    cycle: int


class CoreStore:
    """SQLAlchemy Core statements: any database and driver numbering supports."""

    def __init__(self, bind: Session | Connection, sqlite: bool) -> None:
        self.bind = bind
        self.sqlite = sqlite

    def lock(self, name: str, nowait: bool) -> Any:
        """The counter row ``name``, locked until the transaction ends (None: no such row)."""
        if self.sqlite:
            # SQLite ignores FOR UPDATE; a write takes the database lock before we read.
            self.bind.execute(
                update(sequences).where(sequences.c.name == name).values(cycle=sequences.c.cycle)
            )
        return self.bind.execute(
            select(sequences).where(sequences.c.name == name).with_for_update(nowait=nowait)
        ).one_or_none()

    def lock_and_look_up(
        self, name: str, keys: Iterable[str], nowait: bool
    ) -> tuple[Any, dict[str, Prior]]:
        """Lock counter ``name``, then (after the lock is granted) look ``keys`` up."""
        row = self.lock(name, nowait)
        if row is None:
            return None, {}
        return row, self.look_up(keys)

    def look_up(self, keys: Iterable[str]) -> dict[str, Prior]:
        """The assignments the ledger already holds for ``keys``."""
        query = (
            select(
                ledger.c.request_key,
                ledger.c.sequence_id,
                ledger.c.cycle,
                ledger.c.value,
                ledger.c.count.label("block_count"),  # Row.count is tuple.count
                sequences.c.parent_id,
                ledger.c.formatted,
                sequences.c.period_key,
            )
            .join(sequences, sequences.c.id == ledger.c.sequence_id)
            .where(ledger.c.request_key.in_(list(keys)))
        )
        return {row.request_key: Prior(*row[1:]) for row in self.bind.execute(query)}

    def create_counter(self, values: dict[str, Any]) -> None:
        """Insert a counter row unless one of that name exists (a period's, on first use)."""
        dialect = sqlite_insert if self.sqlite else pg_insert
        self.bind.execute(dialect(sequences).values(values).on_conflict_do_nothing())

    def write(
        self, updates: Sequence[CounterUpdate], rows: Sequence[dict[str, Any]], now: datetime
    ) -> None:
        """Save the counters' new state and append ``rows`` to the ledger."""
        for counter_id, last, cycle in updates:
            self.bind.execute(
                update(sequences)
                .where(sequences.c.id == counter_id)
                .values(last_value=last, cycle=cycle, updated_at=now)
            )
        if rows:
            self.bind.execute(insert(ledger), list(rows))


# Lock, then look up in a second statement of the same round trip (see the module doc).
_LOCK_AND_LOOK_UP = """\
SELECT 1 FROM numbering_sequence WHERE name = %(name)s FOR UPDATE{nowait};
SELECT s.*, (
    SELECT json_agg(json_build_array(
        l.request_key, l.sequence_id, l.cycle, l.value, l.count, o.parent_id, l.formatted,
        o.period_key))
      FROM numbering_ledger l JOIN numbering_sequence o ON o.id = l.sequence_id
     WHERE l.request_key = ANY(%(keys)s)
) AS numbering_priors
  FROM numbering_sequence s WHERE s.name = %(name)s"""

_UPDATE_COUNTER = (
    "UPDATE numbering_sequence SET last_value = %(last{i})s, cycle = %(cycle{i})s, "
    "updated_at = %(now)s WHERE id = %(id{i})s;"
)

# One INSERT for any number of ledger rows: one array per column.
_INSERT_LEDGER = """\
INSERT INTO numbering_ledger
       (sequence_id, cycle, value, count, request_key, reference, status, assigned_at,
        formatted)
SELECT sequence_id, cycle, value, count, request_key, reference, status, %(now)s, formatted
  FROM unnest(%(sequence_id)s::bigint[], %(cycle)s::bigint[], %(value)s::bigint[],
              %(count)s::bigint[], %(request_key)s::text[], %(reference)s::jsonb[],
              %(status)s::text[], %(formatted)s::text[])
       AS r(sequence_id, cycle, value, count, request_key, reference, status, formatted)"""

_LEDGER_ARRAYS = ("sequence_id", "cycle", "value", "count", "request_key", "status", "formatted")


class Psycopg2Store(CoreStore):
    """PostgreSQL through psycopg2: two statements to a round trip (see the module doc)."""

    def __init__(self, bind: Session | Connection) -> None:
        super().__init__(bind, sqlite=False)

    def lock_and_look_up(
        self, name: str, keys: Iterable[str], nowait: bool
    ) -> tuple[Any, dict[str, Prior]]:
        sql = _LOCK_AND_LOOK_UP.format(nowait=" NOWAIT" if nowait else "")
        row = self._execute(sql, {"name": name, "keys": list(keys)}).one_or_none()
        if row is None:
            return None, {}
        priors = {item[0]: Prior(*item[1:]) for item in row.numbering_priors or ()}
        return row, priors

    def write(
        self, updates: Sequence[CounterUpdate], rows: Sequence[dict[str, Any]], now: datetime
    ) -> None:
        statements: list[str] = []
        params: dict[str, Any] = {"now": now}
        for i, (counter_id, last, cycle) in enumerate(updates):
            statements.append(_UPDATE_COUNTER.format(i=i))
            params.update({f"id{i}": counter_id, f"last{i}": last, f"cycle{i}": cycle})
        if rows:
            statements.append(_INSERT_LEDGER)
            for column in _LEDGER_ARRAYS:
                params[column] = [row[column] for row in rows]
            params["reference"] = [
                None if row["reference"] is None else json.dumps(row["reference"]) for row in rows
            ]
        if statements:
            self._execute("\n".join(statements), params)

    def _execute(self, sql: str, params: dict[str, Any]) -> Any:
        if isinstance(self.bind, Session):
            return self.bind.connection().exec_driver_sql(sql, params)
        return self.bind.exec_driver_sql(sql, params)


def store_for(bind: Session | Connection) -> CoreStore:
    """The fastest store that works on ``bind``'s database and driver."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    dialect = engine.dialect
    if dialect.name == "sqlite":
        return CoreStore(bind, sqlite=True)
    if dialect.name == "postgresql" and dialect.driver == "psycopg2":
        return Psycopg2Store(bind)
    return CoreStore(bind, sqlite=False)
