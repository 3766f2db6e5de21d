"""numbering for Django: a drop-in for django-sequences, in the caller's transaction.

Add ``"numbering.django"`` to ``INSTALLED_APPS`` (``manage.py migrate`` creates numbering's
tables in the database) and change one import::

    from sequences import get_next_value          # before
    from numbering.django import get_next_value   # after

The functions and the class keep django-sequences' names, signatures and behaviour: the
first call creates the sequence at ``initial_value``; a number is taken in the caller's
transaction (``transaction.atomic()``), so a second caller of the same sequence waits
until the first transaction ends and gets the next value if it committed, the same one
if it rolled back; ``nowait=True`` raises :class:`django.db.OperationalError` at once
when another transaction holds the sequence. Underneath, every number is also a row of
numbering's append-only ledger (``numbering audit`` checks it), and numbering's extras
are keyword-only: ``key=`` (the same key gets the same number again), ``date=`` (a
periodic sequence's period) and ``reference=`` (stored with the number).

What numbering does differently underneath (docs/django.md): the looping bounds
(``initial_value``, ``reset_value``) are stored with the sequence by its first call and
later calls follow them; :func:`delete` (and ``manage.py flush``, so Django's test
runner too) sets a sequence that gave numbers aside under another name, with its ledger
rows, and the next call starts the name afresh.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from numbering.policies import DateLike

__all__ = [
    "Sequence",
    "delete",
    "get_last_value",
    "get_next_value",
    "get_next_values",
]


def _database(using: str | None, write: bool) -> Any:
    """Django's connection for ``using`` (default: what the routers say for numbering's
    counters, as django-sequences asks them for its own model)."""
    from django.db import connections, router

    from numbering.django.models import Counter

    if using is None:
        using = router.db_for_write(Counter) if write else router.db_for_read(Counter)
    return using, connections[using]


def _check_bounds(initial_value: int, reset_value: int | None) -> None:
    if reset_value is not None and reset_value <= initial_value:
        raise ValueError("reset_value must be greater than initial_value")


def _take(
    sequence_name: str,
    initial_value: int,
    reset_value: int | None,
    count: int,
    nowait: bool,
    using: str | None,
    key: str | None,
    date: DateLike,
    reference: Any,
) -> int | range:
    from django.db import transaction

    from numbering.assignment import allocate
    from numbering.django.connection import borrowed
    from numbering.errors import SequenceNotFoundError
    from numbering.sequences import create_sequence

    alias, connection = _database(using, write=True)
    with (
        transaction.atomic(using=alias, savepoint=False),
        _django_errors(),
        borrowed(connection) as bind,
    ):
        if reset_value is not None:  # a looping call: its bounds must be the stored ones
            from numbering.django.bounds import agree

            agree(
                bind,
                sequence_name,
                initial_value,
                reset_value,
                lambda: _taken_over(alias, sequence_name),
                nowait,
            )
        arguments: dict[str, Any] = {
            "key": key,
            "count": count,
            "nowait": nowait,
            "date": date,
            "reference": reference,
        }
        try:
            taken: int | range = allocate(bind, sequence_name, **arguments)
            return taken
        except SequenceNotFoundError:
            # The first call creates it (a concurrent first caller's row is waited for
            # and then used as it is).
            create_sequence(
                bind,
                sequence_name,
                initial_value=initial_value,
                reset_value=reset_value,
                exist_ok=True,
            )
        taken = allocate(bind, sequence_name, **arguments)
        return taken


def _taken_over(alias: str, sequence_name: str) -> bool:
    from numbering.django.models import TakeOver

    return bool(TakeOver.objects.using(alias).filter(sequence_name=sequence_name).exists())


class _django_errors:
    """Database-level errors as Django's own exceptions (what django-sequences raises),
    numbering's error kept as the cause; numbering's other errors pass unchanged."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        from django import db

        from numbering import errors

        if isinstance(exc, errors.LockNotAvailable | errors.ConflictError):
            raise db.OperationalError(str(exc)) from exc
        if isinstance(exc, errors.ConnectionLost):
            raise db.OperationalError(str(exc)) from exc
        if type(exc) is errors.DatabaseError:
            raise db.DatabaseError(str(exc)) from exc


def get_next_value(
    sequence_name: str = "default",
    initial_value: int = 1,
    reset_value: int | None = None,
    *,
    nowait: bool = False,
    using: str | None = None,
    key: str | None = None,
    date: DateLike = None,
    reference: Any = None,
) -> int:
    """The next value of ``sequence_name``, taken in the caller's transaction.

    As django-sequences: created at ``initial_value`` by the first call; with
    ``reset_value`` it loops back to ``initial_value`` before reaching it. numbering's
    extras: ``key`` (the same key gets the same number again), ``date`` (the document's
    date, for a periodic sequence) and ``reference`` (stored in the ledger with it).
    """
    _check_bounds(initial_value, reset_value)
    value = _take(sequence_name, initial_value, reset_value, 1, nowait, using, key, date, reference)
    assert isinstance(value, int)
    return value


def get_next_values(
    batch_size: int,
    sequence_name: str = "default",
    initial_value: int = 1,
    *,
    nowait: bool = False,
    using: str | None = None,
    key: str | None = None,
    date: DateLike = None,
    reference: Any = None,
) -> range:
    """The next ``batch_size`` values of ``sequence_name``, contiguous, as a range (a
    batch of 0 is an empty range and takes nothing)."""
    if batch_size == 0:
        return range(0)
    values = _take(
        sequence_name, initial_value, None, batch_size, nowait, using, key, date, reference
    )
    return values if isinstance(values, range) else range(values, values + 1)


def get_last_value(sequence_name: str = "default", *, using: str | None = None) -> int | None:
    """The last value ``sequence_name`` gave, or None when it has given none (or does
    not exist)."""
    from numbering.django.connection import borrowed
    from numbering.errors import SequenceNotFoundError
    from numbering.sequences import last_value

    _, connection = _database(using, write=False)
    with _django_errors(), borrowed(connection) as bind:
        try:
            return last_value(bind, sequence_name)
        except SequenceNotFoundError:
            return None


def delete(sequence_name: str = "default", *, using: str | None = None) -> bool:
    """Delete ``sequence_name``: the next call starts it again at its ``initial_value``.
    True if the sequence existed.

    django-sequences deletes the counter row. numbering's ledger is append-only, so a
    sequence that gave numbers is set aside instead, renamed ``NAME:deleted:<UTC time>``
    with its ledger (``numbering sequence list`` and the audit show it); one that gave
    none is deleted.
    """
    from django.db import transaction

    from numbering.django.connection import borrowed
    from numbering.sequences import archive_sequence

    alias, connection = _database(using, write=True)
    with (
        transaction.atomic(using=alias, savepoint=False),
        _django_errors(),
        borrowed(connection) as bind,
    ):
        return archive_sequence(bind, sequence_name) is not None


class Sequence:
    """A gapless sequence of integer values (django-sequences' class, same API)."""

    def __init__(
        self,
        sequence_name: str = "default",
        initial_value: int = 1,
        reset_value: int | None = None,
        *,
        using: str | None = None,
    ) -> None:
        _check_bounds(initial_value, reset_value)
        self.sequence_name = sequence_name
        self.initial_value = initial_value
        self.reset_value = reset_value
        self.using = using

    def get_last_value(self) -> int | None:
        return get_last_value(self.sequence_name, using=self.using)

    def get_next_value(self, *, nowait: bool = False, **extras: Any) -> int:
        return get_next_value(
            self.sequence_name,
            self.initial_value,
            self.reset_value,
            nowait=nowait,
            using=self.using,
            **extras,
        )

    def get_next_values(self, batch_size: int, *, nowait: bool = False, **extras: Any) -> range:
        return get_next_values(
            batch_size,
            self.sequence_name,
            self.initial_value,
            nowait=nowait,
            using=self.using,
            **extras,
        )

    def delete(self) -> bool:
        return delete(self.sequence_name, using=self.using)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        return self.get_next_value()
