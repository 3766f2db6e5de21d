"""Creating sequences and reading their state, in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import CursorResult, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from numbering.allocator import Bind
from numbering.database import is_sqlite, translate_error
from numbering.errors import SequenceExistsError, SequenceNotFoundError
from numbering.schema import as_utc, ledger, sequences
from numbering.validation import check_sequence_bounds, check_sequence_name

__all__ = ["SequenceInfo", "create_sequence", "get_sequence", "last_value", "list_sequences"]


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

    @property
    def next_value(self) -> int:
        """The value the next request would get (a preview: nothing is reserved)."""
        if self.last_value is None:
            return self.initial_value
        if self.reset_value is not None and self.last_value + 1 >= self.reset_value:
            return self.initial_value
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
)


def create_sequence(
    bind: Bind,
    name: str,
    *,
    initial_value: int = 1,
    reset_value: int | None = None,
    max_value: int | None = None,
    exist_ok: bool = False,
) -> SequenceInfo:
    """Create a sequence in the caller's transaction.

    ``initial_value`` is the first value given. With ``reset_value`` the sequence loops:
    it gives ``initial_value .. reset_value - 1``, then starts again at ``initial_value``
    in a new cycle. With ``max_value`` it stops there with "sequence exhausted" (the
    default maximum is 2**63-1). With ``exist_ok=True`` an existing sequence with the same
    definition is returned instead of raising :class:`SequenceExistsError`.
    """
    name = check_sequence_name(name)
    initial, reset, maximum = check_sequence_bounds(initial_value, reset_value, max_value)
    existing = _find(bind, name)
    if existing is not None:
        return _existing(existing, initial, reset, maximum, exist_ok)
    now = datetime.now(timezone.utc)
    values = {
        "name": name,
        "initial_value": initial,
        "reset_value": reset,
        "max_value": maximum,
        "last_value": None,
        "cycle": 0,
        "created_at": now,
        "updated_at": now,
    }
    # ON CONFLICT DO NOTHING waits for a concurrent creator of the same name and then
    # skips, so a race ends with "exists" (or its definition under exist_ok), not an
    # aborted transaction. Under REPEATABLE READ PostgreSQL raises 40001 instead, which
    # the runner retries.
    dialect_insert = sqlite_insert if is_sqlite(bind) else postgresql_insert
    try:
        result = bind.execute(
            dialect_insert(sequences)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        inserted = cast(CursorResult[Any], result).rowcount
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    if not inserted:
        existing = _find(bind, name)
        if existing is None:  # pragma: no cover - only if the creator's row vanished
            raise SequenceExistsError(name)
        return _existing(existing, initial, reset, maximum, exist_ok)
    return SequenceInfo(name, initial, reset, maximum, None, 0, now, now)


def _existing(
    info: SequenceInfo, initial: int, reset: int | None, maximum: int | None, exist_ok: bool
) -> SequenceInfo:
    if not exist_ok:
        raise SequenceExistsError(info.name)
    wanted = (initial, reset, maximum)
    actual = (info.initial_value, info.reset_value, info.max_value)
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


def get_sequence(bind: Bind, name: str) -> SequenceInfo:
    """The definition and state of sequence ``name``; raises if there is none."""
    info = _find(bind, check_sequence_name(name))
    if info is None:
        raise SequenceNotFoundError(name)
    return info


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
