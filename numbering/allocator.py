"""The :class:`Allocator`: numbering's own short transactions, retried when safe.

:class:`Allocator` opens one short transaction per call at the configured isolation
level, assigns (:mod:`numbering.assignment`: what runs inside a transaction, the
caller's or this one's), commits, and runs the whole transaction again on a serialization
failure, a deadlock, a locked sequence or a lost connection. A request key is fixed
*before* the first attempt, so every attempt asks for the same key: an attempt whose
COMMIT reply was lost is resolved by the next attempt, which locks the sequence (waiting
for the lost transaction to finish either way) and finds the key if it committed.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from numbering import assignment, ledger, sequences
from numbering.assignment import Assignment, Outcome, Request, new_key
from numbering.backends import backend_for
from numbering.database import begin, create_engine, engine_options_for, translate_error
from numbering.errors import NumberingError
from numbering.ledger import AuditReport
from numbering.policies import DateLike
from numbering.retry import RetryPolicy, RetryStats
from numbering.sequences import SequenceInfo
from numbering.settings import DEFAULT_ISOLATION_LEVEL, Settings, mask_url
from numbering.validation import check_count, check_isolation_level

__all__ = ["Allocator"]


T = TypeVar("T")


class Allocator:
    """Gapless numbers from a database, each call in its own retried transaction.

    >>> numbers = Allocator("postgresql://localhost/app", isolation_level="REPEATABLE READ")
    >>> numbers.create_sequence("invoices", exist_ok=True)
    >>> numbers.next_value("invoices", key="invoice:42")
    1
    >>> numbers.next_value("invoices", key="invoice:42")   # same key, same number
    1
    """

    def __init__(
        self,
        database: Engine | str | URL,
        *,
        isolation_level: str = DEFAULT_ISOLATION_LEVEL,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.isolation_level = check_isolation_level(isolation_level)
        if not isinstance(database, Engine):
            database = create_engine(database, **engine_options_for(database, isolation_level))
        self.engine = database
        self.retry = retry or RetryPolicy()
        #: Retries so far, by error class (``stats.total`` for all of them).
        self.stats = RetryStats()
        self._backend = backend_for(self.engine)
        self._pipelined = self._backend.pipelined(self.engine)
        #: Whether a worker may keep two batches in flight (the engine takes concurrent
        #: writers), and whether the second may queue for the counters' locks behind
        #: the first one's COMMIT (see :meth:`Backend.queues_behind_commit`).
        self.concurrent_writers = self._backend.concurrent_writers
        self.queues_behind_commit = self._backend.queues_behind_commit(self.isolation_level)

    @classmethod
    def from_settings(cls, settings: Settings, **engine_options: Any) -> Allocator:
        """An allocator for ``settings.database_url`` with the settings' level and retries
        (``engine_options`` go to :func:`numbering.create_engine`, e.g. ``pool_size``)."""
        options = {
            **engine_options_for(settings.database_url, settings.isolation_level),
            **engine_options,
        }
        return cls(
            create_engine(
                settings.database_url,
                idle_transaction_timeout=settings.idle_transaction_timeout,
                synchronous_commit=settings.synchronous_commit,
                **options,
            ),
            isolation_level=settings.isolation_level,
            retry=settings.retry_policy(),
        )

    @classmethod
    def from_env(cls) -> Allocator:
        """An allocator configured from ``NUMBERING_*`` environment variables."""
        return cls.from_settings(Settings.from_env())

    def __repr__(self) -> str:
        url = mask_url(self.engine.url.render_as_string(hide_password=False))
        return f"<Allocator {url} {self.isolation_level}>"

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    def run(
        self,
        work: Callable[[Connection], T],
        *,
        describe: str = "transaction",
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> T:
        """Run ``work(connection)`` in one transaction; commit; retry the whole on conflict.

        ``work`` may run more than once, so it must do nothing outside the transaction
        (no e-mails, no appends to outside lists) that would be wrong to repeat. Use it
        to allocate a number and write the document that carries it in one transaction::

            def create(conn):
                number = allocate(conn, "invoices", key=f"invoice:{invoice_id}")
                conn.execute(invoices.insert().values(id=invoice_id, number=number))
                return number

            number = numbers.run(create)
        """

        level = self.isolation_level if isolation_level is None else isolation_level
        backend = self._backend

        def attempt() -> T:
            try:
                with begin(self.engine, level, readonly=readonly) as connection:
                    with connection.begin():
                        result = work(connection)
                        backend.forget_notices(connection)
                    # A COMMIT reported done that a failover may undo is no answer: the
                    # retry's lock waits until the standby has it, then finds the keys.
                    doubt = None if readonly else backend.commit_doubt(connection)
                    if doubt is not None:
                        raise doubt
                    return result
            except DBAPIError as exc:
                raise translate_error(exc) from exc

        return self.retry.call(attempt, stats=self.stats, describe=describe)

    def run_assignment(self, work: Callable[[Connection], T], *, describe: str) -> T:
        """:meth:`run` for numbering's own assignments (``work`` calls
        :func:`numbering.assignment.assign` and nothing that begins or ends a transaction).

        On PostgreSQL through psycopg2 the transaction is pipelined: ``BEGIN`` goes with
        the lock and the ledger writes go with ``COMMIT``, two round trips for a batch on
        one sequence instead of four (:func:`numbering.backends.psycopg2.run_pipelined`).
        """
        pipelined = self._pipelined
        if pipelined is None:
            return self.run(work, describe=describe)

        def attempt() -> T:
            try:
                return pipelined(self.isolation_level, work)
            except DBAPIError as exc:
                raise translate_error(exc) from exc

        return self.retry.call(attempt, stats=self.stats, describe=describe)

    # -- sequences ---------------------------------------------------------------------------

    def create_sequence(
        self,
        name: str,
        *,
        initial_value: int = 1,
        reset_value: int | None = None,
        max_value: int | None = None,
        exist_ok: bool = False,
        format: str | None = None,
        period: str | None = None,
        timezone: str | None = None,
        start_after: tuple[str, str] | None = None,
        allowed_tables: Sequence[str] = (),
    ) -> SequenceInfo:
        """Create a sequence (see :func:`numbering.sequences.create_sequence`).

        ``start_after=(table, column)`` imports existing numbering: the sequence starts
        after the highest number already in that column (the table must be in
        ``allowed_tables``, normally ``NUMBERING_BATCH_TABLES``), read under a lock in the
        same transaction that creates the sequence.
        """

        def create(connection: Connection) -> SequenceInfo:
            initial = initial_value
            if start_after is not None:
                highest = sequences.highest_existing(connection, *start_after, allowed_tables)
                if highest is not None:
                    initial = max(initial_value, highest + 1)
            return sequences.create_sequence(
                connection,
                name,
                initial_value=initial,
                reset_value=reset_value,
                max_value=max_value,
                exist_ok=exist_ok,
                format=format,
                period=period,
                timezone=timezone,
            )

        return self.run(create, describe=f"create sequence {name!r}")

    def sequence(self, name: str, period: str | None = None) -> SequenceInfo:
        """The definition and state of sequence ``name`` (or of one of its periods)."""
        return self.run(lambda c: sequences.get_sequence(c, name, period), readonly=True)

    def preview(self, name: str, date: DateLike = None) -> str | None:
        """The formatted number the next request dated ``date`` would get (nothing is
        reserved; None for a sequence without a format)."""
        return self.run(lambda c: sequences.preview(c, name, date), readonly=True)

    def freeze(self, name: str, period: str | None = None) -> SequenceInfo:
        """Refuse new requests on ``name`` (or on one period of it) until unfrozen."""
        return self.run(
            lambda c: sequences.set_frozen(c, name, True, period), describe=f"freeze {name!r}"
        )

    def unfreeze(self, name: str, period: str | None = None) -> SequenceInfo:
        """Accept requests on ``name`` (or one period of it) again."""
        return self.run(
            lambda c: sequences.set_frozen(c, name, False, period),
            describe=f"unfreeze {name!r}",
        )

    def void(
        self,
        name: str,
        *,
        reason: str,
        key: str | None = None,
        value: int | None = None,
        period: str | None = None,
        cycle: int | None = None,
    ) -> ledger.Voided:
        """Void an assignment (see :func:`numbering.ledger.void`)."""
        return self.run(
            lambda c: ledger.void(
                c, name, reason=reason, key=key, value=value, period=period, cycle=cycle
            ),
            describe=f"void on {name!r}",
        )

    def delete_sequence(self, name: str) -> SequenceInfo:
        """Delete a sequence that has never given a number (one created by mistake);
        refused with :class:`~numbering.errors.SequenceInUseError` once it has."""
        return self.run(
            lambda c: sequences.delete_sequence(c, name), describe=f"delete sequence {name!r}"
        )

    def sequences(self) -> list[SequenceInfo]:
        """Every sequence, by name."""
        return self.run(sequences.list_sequences, readonly=True)

    def last_value(self, name: str) -> int | None:
        """The last value given by sequence ``name`` (None before the first)."""
        return self.run(lambda c: sequences.last_value(c, name), readonly=True)

    # -- allocation --------------------------------------------------------------------------

    def assign(self, sequence: str, requests: Sequence[Request]) -> list[Outcome]:
        """Assign a batch of requests in one transaction; one outcome per request."""
        return self.run_assignment(
            lambda c: assignment.assign(c, sequence, requests),
            describe=f"assignment of {len(requests)} request(s) on {sequence!r}",
        )

    def assign_many(self, batches: Mapping[str, Sequence[Request]]) -> dict[str, list[Outcome]]:
        """Assign batches on several sequences in one transaction (see
        :func:`numbering.assignment.assign_many`); each sequence's outcomes, in order."""
        return self.run_assignment(
            lambda c: assignment.assign_many(c, batches),
            describe=f"assignment of {sum(map(len, batches.values()))} request(s) on "
            f"{len(batches)} sequence(s)",
        )

    def next_block(
        self,
        sequence: str,
        *,
        count: int = 1,
        key: str | None = None,
        reference: Any = None,
        date: DateLike = None,
    ) -> Assignment:
        """Take ``count`` consecutive values; the full :class:`Assignment` with its key,
        formatted number and period. ``date``: the document's date (default today)."""
        day = date.isoformat() if isinstance(date, datetime.date) else date
        request = Request(new_key() if key is None else key, check_count(count), reference, day)
        [outcome] = self.assign(sequence, [request])
        if isinstance(outcome, NumberingError):
            raise outcome
        return outcome

    def next_value(
        self,
        sequence: str,
        *,
        key: str | None = None,
        reference: Any = None,
        date: DateLike = None,
    ) -> int:
        """Take the next value of ``sequence``; the same ``key`` always gets the same value."""
        return self.next_block(sequence, key=key, reference=reference, date=date).value

    def next_values(
        self,
        sequence: str,
        count: int,
        *,
        key: str | None = None,
        reference: Any = None,
        date: DateLike = None,
    ) -> range:
        """Take ``count`` consecutive values as a range."""
        return self.next_block(
            sequence, count=count, key=key, reference=reference, date=date
        ).values

    # -- audit -------------------------------------------------------------------------------

    def audit(self, name: str | None = None) -> list[AuditReport]:
        """Audit one sequence or all (see :func:`numbering.ledger.audit`)."""
        # One snapshot for counters and ledger, or a busy sequence would look inconsistent.
        return self.run(
            lambda c: ledger.audit(c, name),
            describe="audit",
            readonly=True,
            isolation_level="REPEATABLE READ",
        )

    def export_chain(self, name: str, period: str | None = None) -> Iterator[dict[str, Any]]:
        """Stream the hash chain of sequence ``name``'s counters (or one ``period``'s), in
        link order, from one consistent snapshot (see :func:`numbering.ledger.export_chain`)."""
        with (
            begin(self.engine, "REPEATABLE READ", readonly=True) as connection,
            connection.begin(),
        ):
            yield from ledger.export_chain(connection, name, period)

    def chain_heads(self, name: str | None = None) -> list[dict[str, Any]]:
        """The head of each counter's hash chain (see :func:`numbering.ledger.chain_heads`)."""
        return self.run(lambda c: ledger.chain_heads(c, name), readonly=True)

    def backfill_chains(
        self,
        chunk: int = 10_000,
        progress: Callable[[ledger.Backfilled], None] | None = None,
    ) -> int:
        """Chain every ledger row written before hash chains, counter by counter, in
        transactions of up to ``chunk`` rows (each under the counter's lock, so the
        worker carries on meanwhile). Resumable: a run stopped half-way carries on where
        it stopped. Returns the number of rows chained."""
        total = 0
        for counter in self.run(ledger.unchained_counters, readonly=True):
            while True:
                step = self.run(
                    functools.partial(ledger.backfill_step, counter=counter, chunk=chunk),
                    describe=f"chain back-fill of {counter!r}",
                )
                total += step.chained
                if progress is not None:
                    progress(step)
                if not step.left or not step.chained:
                    break
        return total

    def export(self, name: str, period: str | None = None) -> Iterator[dict[str, Any]]:
        """Stream sequence ``name``'s ledger (or one ``period``'s) in value order, from
        one consistent snapshot."""
        with (
            begin(self.engine, "REPEATABLE READ", readonly=True) as connection,
            connection.begin(),
        ):
            yield from ledger.export(connection, name, period)
