"""How the allocator reads and writes the counters and the ledger, in the caller's transaction.

The store is the executor of the allocator's four steps (lock the counters of a
transaction's sequences, in name order, and look the request keys up; lock or create a
period's counter; update counters and append ledger rows). The statements that differ
between engines come from the engine's :class:`~numbering.backends.base.Backend`; the
store runs them on the caller's SQLAlchemy ``Connection`` or ``Session`` and owns every
lock the allocator and the sequence commands take (periods included).

:class:`CoreStore` runs SQLAlchemy Core statements on any engine and driver;
:class:`~numbering.backends.psycopg2.Psycopg2Store` is the same steps as plain SQL, two
to a round trip, for PostgreSQL through psycopg2. :func:`store_for` picks the fastest one
that works on a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session

from numbering.chaining import chain_parts
from numbering.errors import SequenceNotFoundError
from numbering.plan import CounterUpdate, Prior, Request
from numbering.policies import period_name
from numbering.schema import chain_records, ledger, sequences

if TYPE_CHECKING:
    from numbering.backends.base import Backend

__all__ = ["CoreStore", "CounterUpdate", "Prior", "store_for"]


class CoreStore:
    """SQLAlchemy Core statements: any database and driver numbering supports."""

    def __init__(self, bind: Session | Connection, backend: Backend) -> None:
        self.bind = bind
        self.backend = backend

    def prepare(self) -> None:
        """Make the transaction as durable as an assignment needs (on PostgreSQL: its
        COMMIT waits for the synchronous standby); before its first statement."""
        self.backend.prepare_assignment(self.bind)

    def lock(self, name: str, nowait: bool) -> Any:
        """The counter row ``name``, locked until the transaction ends (None: no such row)."""
        *before, last = self.backend.lock_counter(name, nowait)
        for statement in before:
            self.bind.execute(statement)
        return self.bind.execute(last).one_or_none()

    def lock_sequence(self, name: str, nowait: bool) -> Any:
        """:meth:`lock`, raising :class:`SequenceNotFoundError` when there is no such row."""
        row = self.lock(name, nowait)
        if row is None:
            raise SequenceNotFoundError(name)
        return row

    def lock_period(self, parent: Any, key: str, nowait: bool, *, frozen: bool = False) -> Any:
        """Lock the counter of ``parent``'s period ``key``; create it on first use.

        Race-free: the parent row is locked first by everyone who assigns from it, and the
        insert does nothing if the row exists (a direct writer may have made it meanwhile).
        """
        name = period_name(parent.name, key)
        row = self.lock(name, nowait)
        if row is not None:
            return row
        now = datetime.now(timezone.utc)
        self.create_counter(
            {
                "name": name,
                "initial_value": parent.initial_value,
                "reset_value": parent.reset_value,
                "max_value": parent.max_value,
                "cycle": 0,
                "created_at": now,
                "updated_at": now,
                "frozen": frozen,
                "parent_id": parent.id,
                "period_key": key,
            }
        )
        return self.lock_sequence(name, nowait)

    def lock_and_look_up_many(
        self, names: Sequence[str], keys: Iterable[str], nowait: bool
    ) -> tuple[dict[str, Any], dict[str, Prior]]:
        """Lock the counters ``names`` (in the order given), then look ``keys`` up.

        Returns the locked rows by name (a name with no counter is missing) and what the
        ledger holds for ``keys``.
        """
        rows = {}
        for name in names:
            row = self.lock(name, nowait)
            if row is not None:
                rows[name] = row
        return rows, (self.look_up(keys) if rows else {})

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
        if self.backend.locking_look_up:
            query = query.with_for_update(read=True)
        return {row.request_key: Prior(*row[1:]) for row in self.bind.execute(query)}

    def take_plain(self, name: str, request: Request, now: datetime) -> tuple[int, int] | None:
        """Give ``request`` (its key fresh: nothing to look up) its block from counter
        ``name`` in one step when the counter is plain (see
        :meth:`~numbering.backends.base.Backend.take_plain`); the block's first value
        and cycle, or None when the general path must serve it (nothing was written)."""
        engine = self.bind.get_bind() if isinstance(self.bind, Session) else self.bind
        statements = self.backend.take_plain(engine.dialect)
        if statements is None:
            return None
        self.prepare()
        params = plain_params(name, request, now, json_text=False)
        *writes, last = statements
        for statement in writes:
            if self.bind.execute(statement, params).rowcount != 1:  # type: ignore[attr-defined]
                return None
        row = self.bind.execute(last, params).one_or_none()
        return None if row is None else (int(row.value), int(row.cycle))

    def create_counter(self, values: dict[str, Any]) -> None:
        """Insert a counter row unless one of that name exists (a period's, on first use)."""
        self.bind.execute(self.backend.insert_if_absent(sequences, values))

    def write(
        self,
        updates: Sequence[CounterUpdate],
        rows: Sequence[dict[str, Any]],
        now: datetime,
        records: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Save the counters' new state, append ``rows`` to the ledger and ``records``
        to the chains' own table (their starts, voids and renames)."""
        for counter_id, last, cycle, chain_link, chain_head in updates:
            self.bind.execute(
                update(sequences)
                .where(sequences.c.id == counter_id)
                .values(
                    last_value=last,
                    cycle=cycle,
                    updated_at=now,
                    chain_link=chain_link,
                    chain_head=chain_head,
                )
            )
        if records:
            self.bind.execute(insert(chain_records), list(records))
        if rows:
            self.bind.execute(insert(ledger), list(rows))


def plain_params(name: str, request: Request, now: datetime, *, json_text: bool) -> dict[str, Any]:
    """The parameters of the one-step statements (``Backend.take_plain``); the reference
    as JSON text when the statement binds it without the column's type."""
    reference = request.reference
    if json_text and reference is not None:
        reference = json.dumps(reference)
    return {
        "name": name,
        "count": request.count,
        "key": request.key,
        "reference": reference,
        "now": now,
        **chain_parts(request, now),
    }


def store_for(bind: Session | Connection) -> CoreStore:
    """The fastest store that works on ``bind``'s database and driver."""
    from numbering.backends import backend_for

    return backend_for(bind).store(bind)
