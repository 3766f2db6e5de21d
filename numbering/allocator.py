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
3. **Assign** the next values, update the counter and append to the ledger.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from datetime import date as _date
from typing import Any, overload

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from numbering.database import translate_error
from numbering.errors import (
    InvalidCountError,
    KeyReusedError,
    NumberingError,
    SequenceExhaustedError,
    SequenceFrozenError,
    SequenceNotFoundError,
)
from numbering.policies import document_date, period_key, period_name, render
from numbering.schema import STATUS_ASSIGNED
from numbering.store import CoreStore, CounterUpdate, Prior, store_for
from numbering.validation import (
    MAX_INT64,
    check_count,
    check_key,
    check_reference,
    check_sequence_name,
)

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


def new_key() -> str:
    """A fresh request key for a caller that gave none: ``auto:`` then the time in
    nanoseconds (hex, fixed width) and 64 random bits.

    Time-ordered, so new keys land at the right end of the ledger's unique key index
    instead of on a random page of it: with random keys (uuid4) the cost per number at
    10 million ledger rows was 2.2 times the cost on an empty ledger; with these, 1.03
    times (docs/benchmarks.md, growth).
    """
    return f"auto:{time.time_ns():016x}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Request:
    """One request for ``count`` consecutive values, identified by ``key``.

    Validated on construction, so an invalid request never reaches a transaction.
    """

    key: str
    count: int = 1
    reference: Any = None
    #: The document's date (ISO ``YYYY-MM-DD``): picks the period of a periodic sequence
    #: and the date parts of a format. None: today in the sequence's time zone.
    date: str | None = None

    def __post_init__(self) -> None:
        check_key(self.key)
        check_count(self.count)
        check_reference(self.reference)
        if self.date is not None:
            document_date(self.date, None)  # validates; the zone matters only for None


@dataclass(frozen=True)
class Assignment:
    """The block of values a request got: ``value .. value + count - 1`` of ``cycle``."""

    sequence: str
    key: str
    value: int
    count: int
    cycle: int
    #: True when the key already had this block (the request was a resend).
    resent: bool = False
    #: The first value in the sequence's display format (None without a format).
    formatted: str | None = None
    #: The period (``2026``, ``2026-03``, ...) of a periodic sequence, else None.
    period: str | None = None

    @property
    def values(self) -> range:
        """The assigned values as a range."""
        return range(self.value, self.value + self.count)

    @property
    def last(self) -> int:
        """The last value of the block."""
        return self.value + self.count - 1


#: What one request in a batch ends with: its block, or the error it alone failed with.
Outcome = Assignment | NumberingError


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


def _lock(bind: Bind, name: str, nowait: bool) -> Any:
    """Lock the counter row of sequence ``name`` (for the rest of the transaction)."""
    row = store_for(bind).lock(name, nowait)
    if row is None:
        raise SequenceNotFoundError(name)
    return row


def _period_counter(
    store: CoreStore, parent: Any, key: str, nowait: bool, *, frozen: bool = False
) -> Any:
    """Lock the counter of ``parent``'s period ``key``; create it on first use.

    Race-free: the parent row is locked first by everyone who assigns from it, and the
    insert does nothing if the row exists (a direct writer may have made it meanwhile).
    """
    name = period_name(parent.name, key)
    row = store.lock(name, nowait)
    if row is not None:
        return row
    now = datetime.now(timezone.utc)
    store.create_counter(
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
    row = store.lock(name, nowait)
    if row is None:
        raise SequenceNotFoundError(name)
    return row


def _next_block(name: str, seq: Any, last: int | None, cycle: int, count: int) -> tuple[int, int]:
    """The first value and cycle of the next block of ``count`` values."""
    first = seq.initial_value if last is None else last + 1
    if seq.reset_value is not None:
        span = seq.reset_value - seq.initial_value
        if count > span:
            raise InvalidCountError(
                f"a block of {count} values cannot fit in sequence {name!r}: it loops "
                f"every {span} values"
            )
        if first >= seq.reset_value:
            return seq.initial_value, cycle + 1
        if first + count > seq.reset_value:
            raise InvalidCountError(
                f"a block of {count} values does not fit in the {seq.reset_value - first} "
                f"value(s) left before sequence {name!r} loops; ask for at most that many"
            )
        return first, cycle
    maximum = MAX_INT64 if seq.max_value is None else seq.max_value
    if first + count - 1 > maximum:
        raise SequenceExhaustedError(name, last, maximum, count)
    return first, cycle


def _assign(
    bind: Bind, batches: dict[str, Sequence[Request]], nowait: bool
) -> dict[str, list[Outcome] | NumberingError]:
    store = store_for(bind)
    names = sorted(batches)  # one lock order for everyone
    keys = {request.key for requests in batches.values() for request in requests}
    found, prior = store.lock_and_look_up_many(names, keys, nowait)
    now = datetime.now(timezone.utc)
    rows: list[dict[str, Any]] = []
    updates: list[CounterUpdate] = []
    results: dict[str, list[Outcome] | NumberingError] = {}
    # Keys this pass has just assigned, by sequence: a later sequence asked for one of
    # them finds it taken, exactly as its look-up would after the earlier one's writes.
    taken: dict[str, str] = {}
    for name in names:
        seq = found.get(name)
        if seq is None:
            results[name] = SequenceNotFoundError(name)
            continue
        outcomes, new_rows, new_updates = _assign_one(
            store, name, seq, batches[name], prior, taken, nowait, now
        )
        rows += new_rows
        updates += new_updates
        results[name] = outcomes
        taken.update(
            (outcome.key, name)
            for outcome in outcomes
            if isinstance(outcome, Assignment) and not outcome.resent
        )
    store.write(updates, rows, now)
    return results


def _assign_one(
    store: CoreStore,
    name: str,
    seq: Any,
    requests: Sequence[Request],
    prior: dict[str, Prior],
    taken: dict[str, str],
    nowait: bool,
    now: datetime,
) -> tuple[list[Outcome], list[dict[str, Any]], list[CounterUpdate]]:
    """Assign ``requests`` from the locked sequence ``seq``: their outcomes, and the
    ledger rows and counter updates to write."""
    rows: list[dict[str, Any]] = []
    updates: list[CounterUpdate] = []
    outcomes: dict[int, Outcome] = {}
    # Requests grouped by the counter they draw from: the sequence, or one of its periods.
    groups: dict[str | None, list[tuple[int, Request, date]]] = {}
    first_copy: dict[str, int] = {}  # a key sent twice in one batch: the later copy waits
    copies: dict[int, int] = {}
    for index, request in enumerate(requests):
        known = prior.get(request.key)
        if known is not None:
            outcomes[index] = _resend(name, seq, request, known)
            continue
        if request.key in taken:
            outcomes[index] = KeyReusedError(request.key, "is already used on another sequence")
            continue
        if request.key in first_copy:
            copies[index] = first_copy[request.key]
            continue
        first_copy[request.key] = index
        if seq.frozen:
            outcomes[index] = SequenceFrozenError(name)
            continue
        try:
            day = document_date(request.date, seq.timezone)
        except NumberingError as error:
            outcomes[index] = error
            continue
        key = period_key(seq.period, day) if seq.period else None
        groups.setdefault(key, []).append((index, request, day))

    for key in sorted(groups, key=lambda k: k or ""):  # one lock order for everyone
        counter = seq if key is None else _period_counter(store, seq, key, nowait)
        if counter.frozen:
            for index, _, _ in groups[key]:
                outcomes[index] = SequenceFrozenError(counter.name)
            continue
        last: int | None = counter.last_value
        cycle: int = counter.cycle
        for index, request, day in groups[key]:
            try:
                first, cycle = _next_block(counter.name, counter, last, cycle, request.count)
            except NumberingError as error:
                outcomes[index] = error
                continue
            last = first + request.count - 1
            formatted = render(seq.format, first, day, key) if seq.format else None
            outcomes[index] = Assignment(
                name, request.key, first, request.count, cycle, False, formatted, key
            )
            rows.append(
                {
                    "sequence_id": counter.id,
                    "cycle": cycle,
                    "value": first,
                    "count": request.count,
                    "request_key": request.key,
                    "reference": request.reference,
                    "status": STATUS_ASSIGNED,
                    "assigned_at": now,
                    "formatted": formatted,
                }
            )
        if last != counter.last_value or cycle != counter.cycle:
            updates.append(CounterUpdate(counter.id, last, cycle))
    for index, original in copies.items():
        outcome = outcomes[original]
        if isinstance(outcome, Assignment):
            known = Prior(
                seq.id, outcome.cycle, outcome.value, outcome.count, None,
                outcome.formatted, outcome.period,
            )  # fmt: skip
            outcome = _resend(name, seq, requests[index], known)
        outcomes[index] = outcome
    return [outcomes[index] for index in range(len(requests))], rows, updates


def _resend(name: str, seq: Any, request: Request, known: Prior) -> Outcome:
    """The block a resent key already has, or the error for a resend that asks for
    something else than the first request did (another sequence, count or date): that
    is a caller's bug, and answering it with the first block would hide it."""
    if seq.id not in (known.sequence_id, known.parent_id):
        return KeyReusedError(request.key, "is already used on another sequence")
    if known.size != request.count:
        return KeyReusedError(
            request.key,
            f"was already used for a block of {known.size} value(s), not {request.count}",
        )
    disagreement = _date_disagreement(seq, request, known)
    if disagreement is not None:
        return KeyReusedError(request.key, disagreement)
    return Assignment(
        name,
        request.key,
        known.value,
        known.size,
        known.cycle,
        resent=True,
        formatted=known.formatted,
        period=known.period,
    )


def _date_disagreement(seq: Any, request: Request, known: Prior) -> str | None:
    """Why a resend's document date contradicts the block its key has (None if it does
    not). A resend without a date agrees: the caller left the date to the worker (and a
    copy resent after midnight must still find its block)."""
    if request.date is None or (seq.period is None and seq.format is None):
        return None
    try:
        day = document_date(request.date, seq.timezone)
    except NumberingError as error:
        return f"was already used, and this resend's date is invalid: {error}"
    key = period_key(seq.period, day) if seq.period else None
    if seq.period is not None and key != known.period:
        return f"was already used for a request in period {known.period}, not {key}"
    if seq.format is not None and known.formatted is not None:
        again = render(seq.format, known.value, day, key)
        if again != known.formatted:
            return (
                f"was already used for {known.formatted}, which a request dated "
                f"{day.isoformat()} would not get ({again})"
            )
    return None


@overload
def allocate(
    bind: Bind,
    sequence: str,
    *,
    key: str | None = ...,
    count: None = ...,
    reference: Any = ...,
    nowait: bool = ...,
    date: date | str | None = ...,
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
    date: date | str | None = ...,
) -> int | range: ...
def allocate(
    bind: Bind,
    sequence: str,
    *,
    key: str | None = None,
    count: int | None = None,
    reference: Any = None,
    nowait: bool = False,
    date: date | str | None = None,
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
    [outcome] = assign(bind, sequence, [request], nowait=nowait)
    if isinstance(outcome, NumberingError):
        raise outcome
    return outcome.value if count is None or count == 1 else outcome.values
