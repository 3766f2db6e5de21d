"""The Django app: ``INSTALLED_APPS = [..., "numbering.django"]``."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class NumberingConfig(AppConfig):
    name = "numbering.django"
    label = "numbering"
    verbose_name = "numbering"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from numbering.django import checks  # noqa: F401  (registers the checks)

        post_migrate.connect(_after_flush, sender=self, dispatch_uid="numbering-flush")


def _after_flush(sender: Any, using: str, plan: Any = None, **kwargs: Any) -> None:
    """``flush`` (and Django's test runner between ``TransactionTestCase`` tests) empties
    every table, then sends post_migrate without a plan. numbering's ledger is
    append-only, so its sequences are set aside instead (renamed with their ledger
    rows, :func:`numbering.sequences.archive_all`): every name starts afresh, as in an
    empty database. A migration (post_migrate with a plan) changes nothing."""
    if plan is not None:
        return
    from django.db import connections, router, transaction

    from numbering.django.connection import borrowed
    from numbering.sequences import archive_all

    if not router.allow_migrate(using, "numbering"):
        return
    connection = connections[using]
    if "numbering_sequence" not in connection.introspection.table_names():
        return
    with transaction.atomic(using=using), borrowed(connection) as bind:
        archive_all(bind)
