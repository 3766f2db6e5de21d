"""The queue path from Django: numbers assigned by a ``numbering worker``, for hot sequences.

A view that takes a number in its own transaction holds the sequence's lock until it
commits; every other caller of that sequence waits for it. For a hot sequence, save the
document first, then ask the worker for its number with the document's id as the key,
after the commit::

    from numbering.django.queue import number_on_commit

    def create_invoice(request):
        with transaction.atomic():
            invoice = Invoice.objects.create(...)
            number_on_commit(
                "invoices",
                key=f"invoice:{invoice.pk}",
                then=lambda block: Invoice.objects.filter(pk=invoice.pk).update(
                    number=block.value, formatted=block.formatted
                ),
            )

If the process dies before ``then`` runs, asking again with the same key returns the same
number: a repair job over documents without a number completes them.

Settings come from ``settings.NUMBERING`` (the ``NUMBERING_*`` names without the prefix:
``{"BROKER_URL": "redis://...", "RESULT_BACKEND": "redis://..."}``) over the
``NUMBERING_*`` environment variables. One :class:`numbering.Client` is shared by the
process (threads and asyncio; it survives ``fork()``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from numbering.assignment import Assignment
from numbering.client import Client
from numbering.errors import ConfigurationError
from numbering.policies import DateLike
from numbering.settings import Settings

__all__ = [
    "client",
    "next_block",
    "next_block_async",
    "next_value",
    "next_value_async",
    "number_on_commit",
    "settings",
]

_lock = threading.Lock()
_client: Client | None = None


def settings() -> Settings:
    """numbering's settings for this Django project: ``settings.NUMBERING`` over the
    environment. A bad value raises :class:`~numbering.errors.ConfigurationError` naming
    it (``manage.py check`` reports it too)."""
    from django.conf import settings as django_settings

    given = getattr(django_settings, "NUMBERING", {})
    if not isinstance(given, dict):
        raise ConfigurationError(
            f"settings.NUMBERING must be a dict of numbering settings, not {type(given).__name__}"
        )
    environ = {k: v for k, v in os.environ.items() if k.startswith("NUMBERING_")}
    for name, value in given.items():
        variable = name if name.startswith("NUMBERING_") else f"NUMBERING_{name}"
        environ[variable] = str(value)
    return Settings.from_env(environ)


def client() -> Client:
    """The process's shared :class:`numbering.Client`, built on first use."""
    global _client
    with _lock:
        if _client is None:
            _client = Client.from_settings(settings())
        return _client


def reset() -> None:
    """Forget the shared client (closing it): the next use builds it from the settings
    again (for tests that change ``settings.NUMBERING``)."""
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None


def next_block(sequence: str, *, key: str, **options: Any) -> Assignment:
    """The block a worker assigned to ``key`` (``Client.next_block``: ``count``,
    ``date``, ``reference``, ``timeout``)."""
    return client().next_block(sequence, key=key, **options)


def next_value(sequence: str, *, key: str, **options: Any) -> int:
    """The number a worker assigned to ``key``."""
    return client().next_value(sequence, key=key, **options)


async def next_block_async(sequence: str, *, key: str, **options: Any) -> Assignment:
    """:func:`next_block` for ``async`` views; the event loop is not blocked."""
    return await client().next_block_async(sequence, key=key, **options)


async def next_value_async(sequence: str, *, key: str, **options: Any) -> int:
    """:func:`next_value` for ``async`` views."""
    return await client().next_value_async(sequence, key=key, **options)


def number_on_commit(
    sequence: str,
    *,
    key: str,
    then: Callable[[Assignment], Any],
    using: str | None = None,
    date: DateLike = None,
    **options: Any,
) -> None:
    """When the current transaction on ``using`` commits, ask the worker for ``key``'s
    number and call ``then(block)`` with it (at once in autocommit mode). Nothing is
    asked if the transaction rolls back."""
    from django.db import transaction

    def ask() -> None:
        then(next_block(sequence, key=key, date=date, **options))

    transaction.on_commit(ask, using=using)
