"""Assigning gapless values inside a transaction: lock, look the keys up, assign.

Everything here runs in the transaction it is given and never commits: the values become
real when, and only when, the caller's transaction commits. A rolled-back transaction
consumes nothing.

The order of the three steps is what makes resent requests safe:

1. **Lock** the sequence row (``SELECT ... FOR UPDATE``; on SQLite, the database write
   lock). Every transaction that assigns from this sequence now waits for us.
2. **Look the request keys up** in the ledger. A key that already has a block gets that
   same block back. Because the look-up runs *after* the lock is granted, a copy of the
   same request that committed while we waited is seen, even when both arrived at once.
3. **Assign** the next values, update the counter and append to the ledger. What each
   request gets is decided by :mod:`numbering.plan` (pure functions over the locked
   rows); the store (:mod:`numbering.store`) runs the statements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date as _date
from datetime import datetime, timezone
from typing import Any, overload

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from numbering import plan
from numbering.database import translate_error
from numbering.errors import NumberingError, SequenceNotFoundError
from numbering.plan import Assignment, CounterUpdate, Outcome, Request, new_key
from numbering.policies import DateLike
from numbering.store import store_for
from numbering.validation import check_sequence_name

__all__ = [
    "Assignment",
    "Bind",
    "Outcome",
    "Request",
    "allocate",
    "assign",
    "assign_many",
    "new_key",
]

Bind = Session | Connection


def assign(
    bind: Bind, sequence: str, requests: Sequence[Request], *, nowait: bool = False
) -> list[Outcome]:
    """Assign blocks to ``requests`` from ``sequence`` in the caller's transaction.

    Returns one outcome per request, in order: an :class:`Assignment`, or the
    :class:`NumberingError` that request alone failed with (its key belongs to another
    request, the sequence is exhausted, ...). The other requests are still assigned.
    Raises for what fails them all: an unknown sequence, a database error.

    With ``nowait=True`` a sequence locked by another transaction raises
    :class:`~numbering.errors.LockNotAvailable` at once instead of waiting (PostgreSQL).
    """
    check_bind(bind, "assign")
    name = check_sequence_name(sequence)
    if not requests:
        return []
    outcome = _assign_all(bind, {name: requests}, nowait)[name]
    if isinstance(outcome, NumberingError):
        raise outcome
    return outcome


def assign_many(
    bind: Bind, batches: Mapping[str, Sequence[Request]], *, nowait: bool = False
) -> dict[str, list[Outcome]]:
    """:func:`assign` for several sequences at once, in the caller's transaction.

    The sequences are locked in name order by one statement and every request key is
    looked up by one statement, whatever the number of sequences; the counters and the
    ledger rows are written together. Returns each sequence's outcomes, in the order of
    its requests. What would fail a whole sequence in :func:`assign` (an unknown or
    invalid name) fails that sequence's requests alone here. A key asked for on two
    sequences goes to the first by name; the other request fails with
    :class:`~numbering.errors.KeyReusedError`, as if the two had been sent one after
    the other. Raises only for a database error.
    """
    check_bind(bind, "assign_many")
    results: dict[str, list[Outcome]] = {}
    valid: dict[str, Sequence[Request]] = {}
    for sequence, requests in batches.items():
        try:
            valid[check_sequence_name(sequence)] = requests
        except NumberingError as error:
            results[sequence] = [error] * len(requests)
    valid = {name: requests for name, requests in valid.items() if requests}
    for name, outcome in (_assign_all(bind, valid, nowait) if valid else {}).items():
        if isinstance(outcome, NumberingError):  # fails that sequence's requests alone
            outcome = [outcome] * len(valid[name])
        results[name] = outcome
    return {sequence: results.get(sequence, []) for sequence in batches}


def check_bind(bind: object, function: str = "allocate") -> None:
    """Raise a TypeError that says what to pass when ``bind`` is not a Session or a
    Connection (an Engine, a URL or an Allocator are the usual mistakes)."""
    if isinstance(bind, (Session, Connection)):
        return
    how = (
        f"{function}() runs in your transaction: pass the SQLAlchemy Session or Connection "
        f"that will commit the document, e.g. `with engine.begin() as conn: "
        f"{function}(conn, ...)` or `with Session(engine) as session, session.begin(): "
        f"{function}(session, ...)`"
    )
    if isinstance(bind, Engine):
        raise TypeError(f"{how}; an Engine has no transaction of its own")
    if isinstance(bind, str):
        raise TypeError(f"{how}, not a URL; numbering.create_engine(url) builds the engine")
    if type(bind).__name__ == "Allocator":
        raise TypeError(
            f"{how}; for numbering's own short transaction call the Allocator's methods "
            "instead (allocator.next_value(...), allocator.next_values(...))"
        )
    raise TypeError(f"{how}; got {type(bind).__name__}")


def _assign_all(
    bind: Bind, batches: dict[str, Sequence[Request]], nowait: bool
) -> dict[str, list[Outcome] | NumberingError]:
    try:
        return _assign(bind, batches, nowait)
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def _assign(
    bind: Bind, batches: dict[str, Sequence[Request]], nowait: bool
) -> dict[str, list[Outcome] | NumberingError]:
    store = store_for(bind)
    store.prepare()
    names = sorted(batches)  # one lock order for everyone
    keys = {request.key for requests in batches.values() for request in requests}
    found, prior = store.lock_and_look_up_many(names, keys, nowait)
    now = datetime.now(timezone.utc)
    rows: list[dict[str, Any]] = []
    updates: list[CounterUpdate] = []
    records: list[dict[str, Any]] = []  # the chains' records besides the rows
    results: dict[str, list[Outcome] | NumberingError] = {}
    # Keys this pass has just assigned, by sequence: a later sequence asked for one of
    # them finds it taken, exactly as its look-up would after the earlier one's writes.
    taken: dict[str, str] = {}
    for name in names:
        seq = found.get(name)
        if seq is None:
            results[name] = SequenceNotFoundError(name)
            continue
        requests = batches[name]
        done = plan.sort_requests(name, seq, requests, prior, taken)
        # The periods' counters, locked (or made) in period order: one order for everyone.
        counters = {key: store.lock_period(seq, key, nowait) for key in done.periods}
        planned = plan.assign_groups(name, seq, requests, done, counters, now)
        rows += planned.rows
        updates += planned.updates
        records += planned.records
        results[name] = outcomes = planned.outcomes
        taken.update(
            (outcome.key, name)
            for outcome in outcomes
            if isinstance(outcome, Assignment) and not outcome.resent
        )
    store.write(updates, rows, now, records)
    return results


@overload
def allocate(
    bind: Bind,
    sequence: str,
    *,
    key: str | None = ...,
    count: None = ...,
    reference: Any = ...,
    nowait: bool = ...,
    date: DateLike = ...,
) -> int: ...
@overload
def allocate(
    bind: Bind,
    sequence: str,
    *,
    key: str | None = ...,
    count: int,
    reference: Any = ...,
    nowait: bool = ...,
    date: DateLike = ...,
) -> int | range: ...
def allocate(
    bind: Bind,
    sequence: str,
    *,
    key: str | None = None,
    count: int | None = None,
    reference: Any = None,
    nowait: bool = False,
    date: DateLike = None,
) -> int | range:
    """Take the next value of ``sequence`` in the caller's transaction; never commits.

    Returns an int, or a contiguous ``range`` when ``count`` is more than 1. Pass the
    document's id as ``key``: calling again with the same key returns the same value
    instead of taking a new one. ``date`` is the document's date (a date or
    ``YYYY-MM-DD``; default today in the sequence's time zone): it picks the period of a
    periodic sequence. **The value is only yours if the transaction that
    allocated it commits, together with the document that uses it.**

    >>> with Session(engine) as session, session.begin():
    ...     number = allocate(session, "invoices", key=f"invoice:{invoice.id}")
    ...     invoice.number = number
    """
    check_bind(bind)
    day = date.isoformat() if isinstance(date, _date) else date
    request = Request(
        new_key() if key is None else key, 1 if count is None else count, reference, day
    )
    if key is None and not nowait:
        # A fresh key has nothing to look up: a plain counter takes the one-step path,
        # with nothing between its lock and the writes (the caller's transaction holds
        # that lock until it ends, so this is the lock time every caller waits on).
        name = check_sequence_name(sequence)
        try:
            taken = store_for(bind).take_plain(name, request, datetime.now(timezone.utc))
        except DBAPIError as exc:
            raise translate_error(exc) from exc
        if taken is not None:
            first = taken[0]
            return first if count is None or count == 1 else range(first, first + count)
    [outcome] = assign(bind, sequence, [request], nowait=nowait)
    if isinstance(outcome, NumberingError):
        raise outcome
    return outcome.value if count is None or count == 1 else outcome.values
