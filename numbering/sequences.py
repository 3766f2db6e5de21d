"""Creating sequences and reading their state, in the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Integer,
    MetaData,
    Table,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, NoSuchTableError
from sqlalchemy.orm import Session

from numbering.assignment import Bind
from numbering.backends import backend_for
from numbering.chaining import append_records, locked_chain, open_chain
from numbering.database import translate_error
from numbering.errors import (
    InvalidPolicyError,
    InvalidRequestError,
    InvalidSequenceNameError,
    SequenceExistsError,
    SequenceInUseError,
    SequenceNotFoundError,
)
from numbering.policies import (
    DateLike,
    check_format,
    check_period,
    check_period_key,
    check_timezone,
    document_date,
    period_key,
    period_name,
    render,
)
from numbering.schema import as_utc, chain_records, ledger, sequences
from numbering.validation import (
    MAX_INT64,
    MAX_NAME_LENGTH,
    check_sequence_bounds,
    check_sequence_name,
)

__all__ = [
    "SequenceInfo",
    "archive_all",
    "archive_sequence",
    "create_sequence",
    "get_sequence",
    "highest_existing",
    "last_value",
    "list_sequences",
    "current_counter",
    "delete_sequence",
    "period_date",
    "preview",
    "set_frozen",
]


@dataclass(frozen=True)
class SequenceInfo:
    """A sequence's definition and state."""

    name: str
    initial_value: int
    reset_value: int | None
    max_value: int | None
    last_value: int | None
    cycle: int
    created_at: datetime
    updated_at: datetime
    format: str | None = None
    period: str | None = None
    timezone: str | None = None
    frozen: bool = False
    #: For a period's counter: its period (``2026``, ...); None for a sequence itself.
    period_key: str | None = None

    def preview(self, day: DateLike = None) -> str | None:
        """The next value in this sequence's format, for a document dated ``day``
        (default today). Nothing is reserved. For a periodic sequence, call it on the
        period's counter (:func:`preview`) to account for that period's last value.
        None without a format, or when the sequence is exhausted."""
        value = self.next_value
        if self.format is None or value is None:
            return None
        when = document_date(day, self.timezone)
        key = period_key(self.period, when) if self.period else self.period_key
        return render(self.format, value, when, key)

    @property
    def exhausted(self) -> bool:
        """True when the sequence can give no more values (it does not loop and its last
        value is its maximum)."""
        if self.reset_value is not None or self.last_value is None:
            return False
        return self.last_value >= (MAX_INT64 if self.max_value is None else self.max_value)

    @property
    def next_value(self) -> int | None:
        """The value the next request would get (a preview: nothing is reserved); None
        when the sequence is exhausted. For a periodic sequence, each period's counter
        has its own (:func:`current_counter`)."""
        if self.last_value is None:
            return self.initial_value
        if self.reset_value is not None and self.last_value + 1 >= self.reset_value:
            return self.initial_value
        if self.exhausted:
            return None
        return self.last_value + 1

    @classmethod
    def _from_row(cls, row: Any) -> SequenceInfo:
        return cls(
            name=row.name,
            initial_value=row.initial_value,
            reset_value=row.reset_value,
            max_value=row.max_value,
            last_value=row.last_value,
            cycle=row.cycle,
            created_at=as_utc(row.created_at),
            updated_at=as_utc(row.updated_at),
            format=row.format,
            period=row.period,
            timezone=row.timezone,
            frozen=bool(row.frozen),
            period_key=row.period_key,
        )


_COLUMNS = (
    sequences.c.name,
    sequences.c.initial_value,
    sequences.c.reset_value,
    sequences.c.max_value,
    sequences.c.last_value,
    sequences.c.cycle,
    sequences.c.created_at,
    sequences.c.updated_at,
    sequences.c.format,
    sequences.c.period,
    sequences.c.timezone,
    sequences.c.frozen,
    sequences.c.period_key,
)


def create_sequence(
    bind: Bind,
    name: str,
    *,
    initial_value: int = 1,
    reset_value: int | None = None,
    max_value: int | None = None,
    exist_ok: bool = False,
    format: str | None = None,
    period: str | None = None,
    timezone: str | None = None,
) -> SequenceInfo:
    """Create a sequence in the caller's transaction.

    ``initial_value`` is the first value given. With ``reset_value`` the sequence loops:
    it gives ``initial_value .. reset_value - 1``, then starts again at ``initial_value``
    in a new cycle. With ``max_value`` it stops there with "sequence exhausted" (the
    default maximum is 2**63-1). With ``exist_ok=True`` an existing sequence with the same
    definition is returned instead of raising :class:`SequenceExistsError`.

    ``format`` is the display format (see :mod:`numbering.policies`); ``period``
    (``year``, ``month`` or ``day``) gives each period its own gapless counter, the period
    taken from each request's document date, "today" in ``timezone`` (default UTC).
    """
    name = check_sequence_name(name)
    initial, reset, maximum = check_sequence_bounds(initial_value, reset_value, max_value)
    format, period, timezone = check_format(format), check_period(period), check_timezone(timezone)
    if period is not None and len(name) > MAX_NAME_LENGTH - 11:
        raise InvalidSequenceNameError(
            f"a periodic sequence's name is at most {MAX_NAME_LENGTH - 11} characters (its "
            "period counters are named NAME/YYYY-MM-DD)"
        )
    policy = (format, period, timezone)
    existing = _find(bind, name)
    if existing is not None:
        return _existing(existing, initial, reset, maximum, exist_ok, policy)
    now = datetime.now(UTC)
    values = {
        "name": name,
        "initial_value": initial,
        "reset_value": reset,
        "max_value": maximum,
        "last_value": None,
        "cycle": 0,
        "created_at": now,
        "updated_at": now,
        "format": format,
        "period": period,
        "timezone": timezone,
        "frozen": False,
    }
    # ON CONFLICT DO NOTHING waits for a concurrent creator of the same name and then
    # skips, so a race ends with "exists" (or its definition under exist_ok), not an
    # aborted transaction. Under REPEATABLE READ PostgreSQL raises 40001 instead, which
    # the runner retries.
    try:
        result = bind.execute(
            backend_for(bind).insert_if_absent(sequences, values, unique=["name"])
        )
        inserted = cast(CursorResult[Any], result).rowcount
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    if not inserted:
        existing = _find(bind, name)
        if existing is None:  # pragma: no cover - only if the creator's row vanished
            raise SequenceExistsError(name)
        return _existing(existing, initial, reset, maximum, exist_ok, policy)
    if period is None:  # a periodic sequence's counters are its periods'
        _start_chain(bind, name, now)
    return SequenceInfo(name, initial, reset, maximum, None, 0, now, now, format, period, timezone)


def _start_chain(bind: Bind, name: str, now: datetime) -> None:
    """Start the hash chain of the counter this transaction has just created: the chain
    begins with the sequence (and its numbers take the one-step path from the first)."""
    from numbering.store import store_for

    row = store_for(bind).lock_sequence(name, nowait=False)
    chain = open_chain(row, now)  # link 0: starts it
    if chain is not None:
        append_records(bind.connection() if isinstance(bind, Session) else bind, chain)


def _existing(
    info: SequenceInfo,
    initial: int,
    reset: int | None,
    maximum: int | None,
    exist_ok: bool,
    policy: tuple[str | None, str | None, str | None],
) -> SequenceInfo:
    if not exist_ok:
        raise SequenceExistsError(info.name)
    wanted = (initial, reset, maximum)
    actual = (info.initial_value, info.reset_value, info.max_value)
    if policy != (info.format, info.period, info.timezone):
        raise SequenceExistsError(
            info.name,
            f"sequence {info.name!r} already exists with format={info.format!r}, "
            f"period={info.period!r}, timezone={info.timezone!r}",
        )
    if wanted != actual:
        raise SequenceExistsError(
            info.name,
            f"sequence {info.name!r} already exists with initial_value={actual[0]}, "
            f"reset_value={actual[1]}, max_value={actual[2]}; asked for "
            f"initial_value={wanted[0]}, reset_value={wanted[1]}, max_value={wanted[2]}",
        )
    return info


def _find(bind: Bind, name: str) -> SequenceInfo | None:
    try:
        row = bind.execute(select(*_COLUMNS).where(sequences.c.name == name)).one_or_none()
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return None if row is None else SequenceInfo._from_row(row)


def get_sequence(bind: Bind, name: str, period: str | None = None) -> SequenceInfo:
    """The definition and state of sequence ``name`` (or of its ``period``'s counter);
    raises if there is none. A period not used yet is shown as it would start."""
    info = _find(bind, check_sequence_name(name))
    if info is None:
        raise SequenceNotFoundError(name)
    if period is None:
        return info
    key = _period_of(info, period)
    counter = _find(bind, period_name(name, key))
    if counter is None:
        return replace(info, name=period_name(name, key), last_value=None, cycle=0, period_key=key)
    return replace(counter, format=info.format, period=info.period, timezone=info.timezone)


def _period_of(info: SequenceInfo, period: str) -> str:
    if info.period is None:
        raise InvalidPolicyError(f"sequence {info.name!r} has no periods")
    return check_period_key(info.period, period)


def period_date(info: SequenceInfo, period: str, day: DateLike = None) -> date:
    """A document date inside ``period`` of the periodic sequence ``info``: ``day`` if
    given (refused when it falls in another period), else today if today is in the
    period, else the period's first day. What a preview of that period is dated."""
    key = _period_of(info, period)
    if day is not None:
        when = document_date(day, info.timezone)
        if period_key(info.period or "", when) != key:
            raise InvalidPolicyError(
                f"the date {when.isoformat()} is not in period {key} of sequence "
                f"{info.name!r}; give one or the other, or a date inside the period"
            )
        return when
    today = document_date(None, info.timezone)
    if period_key(info.period or "", today) == key:
        return today
    padded = {"year": "-01-01", "month": "-01", "day": ""}[info.period or "day"]
    return date.fromisoformat(key + padded)


def current_counter(bind: Bind, name: str, day: DateLike = None) -> tuple[SequenceInfo, date]:
    """The counter a request on ``name`` dated ``day`` (default today) draws from: the
    sequence itself, or for a periodic sequence the counter of that date's period (as it
    would start, if not used yet); and the document date itself."""
    info = _find(bind, check_sequence_name(name))
    if info is None:
        raise SequenceNotFoundError(name)
    when = document_date(day, info.timezone)
    if info.period is not None:
        info = get_sequence(bind, name, period_key(info.period, when))
    return info, when


def preview(bind: Bind, name: str, day: DateLike = None) -> str | None:
    """The formatted number the next request dated ``day`` would get; reserves nothing."""
    info, when = current_counter(bind, name, day)
    return info.preview(when)


def set_frozen(bind: Bind, name: str, frozen: bool, period: str | None = None) -> SequenceInfo:
    """Freeze (or unfreeze) sequence ``name``, or one of its periods: while frozen, new
    requests are refused with :class:`SequenceFrozenError` and nothing is assigned. A
    period can be frozen before its first number (a closed or not yet opened period)."""
    from numbering.store import store_for

    store = store_for(bind)
    seq = store.lock_sequence(check_sequence_name(name), nowait=False)
    target = seq
    if period is not None:
        key = _period_of(get_sequence(bind, name), period)
        target = store.lock_period(seq, key, nowait=False, frozen=frozen)
    bind.execute(
        update(sequences)
        .where(sequences.c.id == target.id)
        .values(frozen=frozen, updated_at=datetime.now(UTC))
    )
    return get_sequence(bind, name, period)


def delete_sequence(bind: Bind, name: str) -> SequenceInfo:
    """Delete sequence ``name`` (and its unused period counters) if it has never given a
    number; raise :class:`SequenceInUseError` once its ledger holds any, since those
    numbers are records. For a sequence created by mistake (a typo in its name).

    Takes the sequence's lock first, so a request being assigned meanwhile either
    commits before (and the sequence is then refused as in use) or finds it gone; the
    ledger's foreign key refuses the delete in any case.
    """
    from numbering.store import store_for

    seq = store_for(bind).lock_sequence(check_sequence_name(name), nowait=False)
    info = SequenceInfo._from_row(seq)
    counters = select(sequences.c.id).where(
        (sequences.c.id == seq.id) | (sequences.c.parent_id == seq.id)
    )
    try:
        used = bind.execute(
            select(func.count()).where(ledger.c.sequence_id.in_(counters.scalar_subquery()))
        ).scalar_one()
        if used:
            raise SequenceInUseError(name, int(used))
        _delete_counters(bind, seq.id)
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return info


def _delete_counters(bind: Bind, sequence_id: int) -> None:
    """Delete a sequence that never gave a number: its period counters, the start of
    its chain (which holds nothing else), and its own row."""
    counters = select(sequences.c.id).where(
        (sequences.c.id == sequence_id) | (sequences.c.parent_id == sequence_id)
    )
    bind.execute(
        delete(chain_records).where(chain_records.c.sequence_id.in_(counters.scalar_subquery()))
    )
    bind.execute(delete(sequences).where(sequences.c.parent_id == sequence_id))
    bind.execute(delete(sequences).where(sequences.c.id == sequence_id))


def archive_sequence(bind: Bind, name: str) -> str | None:
    """Set sequence ``name`` aside so that the name starts afresh: renamed
    ``NAME:deleted:<UTC time>`` (its period counters with it) with its counters and
    ledger rows as they are (they stay records, and pass the audit under the new name);
    a sequence that never gave a number is deleted instead. Returns the new name
    (``name`` itself when deleted), None when there is no such sequence. In the
    caller's transaction, under the sequence's lock.
    """
    from numbering.store import store_for

    name = check_sequence_name(name)
    seq = store_for(bind).lock(name, nowait=False)
    if seq is None:
        return None
    counters = (sequences.c.id == seq.id) | (sequences.c.parent_id == seq.id)
    try:
        used = bind.execute(
            select(func.count()).where(
                ledger.c.sequence_id.in_(select(sequences.c.id).where(counters).scalar_subquery())
            )
        ).scalar_one()
        if not used:
            _delete_counters(bind, seq.id)
            return name
        now = datetime.now(UTC)
        suffix = f":deleted:{now:%Y%m%dT%H%M%S%f}"
        # Room for the period counters' "/YYYY-MM-DD" after the new name.
        room = MAX_NAME_LENGTH - len(suffix) - (11 if seq.period is not None else 0)
        archived = name[:room] + suffix
        children = bind.execute(
            select(sequences.c.id, sequences.c.name).where(sequences.c.parent_id == seq.id)
        ).all()
        renamed = {child.id: archived + child.name[len(name) :] for child in children}
        renamed[seq.id] = archived
        connection = bind.connection() if isinstance(bind, Session) else bind
        for counter_id, new_name in renamed.items():
            bind.execute(
                update(sequences)
                .where(sequences.c.id == counter_id)
                .values(name=new_name, updated_at=now)
            )
            chain = locked_chain(connection, counter_id)
            if chain is not None:  # the chain says when its counter's name changed
                chain.append("rename", counter=new_name, at=now)
                append_records(connection, chain)
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return archived


def archive_all(bind: Bind) -> list[str]:
    """:func:`archive_sequence` for every sequence not archived yet; the names set aside.
    What a Django ``flush`` does to numbering's tables (the ledger is append-only)."""
    try:
        names = (
            bind.execute(
                select(sequences.c.name)
                .where(sequences.c.parent_id.is_(None))
                .where(~sequences.c.name.contains(":deleted:"))
                .order_by(sequences.c.name)
            )
            .scalars()
            .all()
        )
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return [name for name in names if archive_sequence(bind, name) is not None]


def highest_existing(bind: Bind, table: str, column: str, allowed: Sequence[str]) -> int | None:
    """The highest number already in ``table.column`` (a table on the allow-list), read
    while the table is locked against writers (PostgreSQL SHARE lock) so no number can
    slip in between the read and the sequence's creation in the same transaction."""
    if table not in allowed:
        raise InvalidRequestError(
            f"table {table!r} is not in NUMBERING_BATCH_TABLES; add it to import from it"
        )
    try:
        connection = bind.connection() if isinstance(bind, Session) else bind
        reflected = Table(table, MetaData(), autoload_with=connection)
    except NoSuchTableError:
        raise InvalidRequestError(f"table {table!r} does not exist") from None
    if column not in reflected.c:
        raise InvalidRequestError(f"table {table!r} has no column {column!r}")
    if not isinstance(reflected.c[column].type, Integer):
        raise InvalidRequestError(
            f"column {table}.{column} is {reflected.c[column].type}, not an integer column"
        )
    backend_for(bind).lock_table_shared(bind, reflected)
    highest = bind.execute(select(func.max(reflected.c[column]))).scalar_one()
    return None if highest is None else int(highest)


def last_value(bind: Bind, name: str) -> int | None:
    """The last value given by ``name`` (None before the first one)."""
    return get_sequence(bind, name).last_value


def list_sequences(bind: Bind) -> list[SequenceInfo]:
    """Every sequence, by name."""
    try:
        rows = bind.execute(select(*_COLUMNS).order_by(sequences.c.name)).all()
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return [SequenceInfo._from_row(row) for row in rows]


def count_assignments(bind: Bind, name: str) -> int:
    """How many ledger rows (assignments) sequence ``name`` has."""
    try:
        return int(
            bind.execute(
                select(func.count())
                .select_from(ledger.join(sequences))
                .where(sequences.c.name == check_sequence_name(name))
            ).scalar_one()
        )
    except DBAPIError as exc:
        raise translate_error(exc) from exc
