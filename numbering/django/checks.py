"""``manage.py check``: numbering's settings and the databases it runs on."""

from __future__ import annotations

from typing import Any

import django
from django.core import checks


@checks.register()
def numbering_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """numbering.E001: ``settings.NUMBERING`` (over the ``NUMBERING_*`` environment) does
    not make valid settings. numbering.W001: an SQLite database without
    ``transaction_mode = IMMEDIATE``, where a transaction that reads before it takes a
    number fails with "database is locked" when another holds the sequence, instead of
    waiting for it (measured: one that takes the number first does wait)."""
    from django.conf import settings

    from numbering.django.queue import settings as numbering_settings
    from numbering.errors import NumberingError

    found: list[checks.CheckMessage] = []
    try:
        numbering_settings()
    except NumberingError as exc:
        found.append(
            checks.Error(
                str(exc),
                hint="fix settings.NUMBERING or the NUMBERING_* environment variables",
                id="numbering.E001",
            )
        )
    return found + sqlite_warnings(settings.DATABASES)


# Django 5.1 added the option; before it, sqlite3.connect() refuses it.
_IMMEDIATE_HINT = (
    'set DATABASES["{alias}"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"'
    if django.VERSION >= (5, 1)
    else 'upgrade to Django 5.1+ and set DATABASES["{alias}"]["OPTIONS"]'
    '["transaction_mode"] = "IMMEDIATE", or take the number before the transaction '
    "reads anything"
)


def sqlite_warnings(databases: dict[str, Any]) -> list[checks.CheckMessage]:
    """numbering.W001 for each SQLite database in ``databases`` (Django's setting)
    without ``transaction_mode = IMMEDIATE``."""
    found: list[checks.CheckMessage] = []
    for alias, database in databases.items():
        if not str(database.get("ENGINE", "")).endswith("sqlite3"):
            continue
        mode = str(database.get("OPTIONS", {}).get("transaction_mode", "")).upper()
        if mode != "IMMEDIATE":
            found.append(
                checks.Warning(
                    f"database {alias!r} (SQLite) does not start transactions IMMEDIATE: "
                    "a transaction that reads before it takes a number fails with "
                    "'database is locked' while another holds the sequence, instead of "
                    "waiting for it",
                    hint=_IMMEDIATE_HINT.format(alias=alias),
                    id="numbering.W001",
                )
            )
    return found
