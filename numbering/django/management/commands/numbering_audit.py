"""``manage.py numbering_audit [NAME]``: ``numbering audit`` on the Django database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, transaction


class Command(BaseCommand):
    help = (
        "Check that every sequence's ledger (or NAME's) is gapless and agrees with its "
        "counter, as `numbering audit` does; exits with status 1 on a problem."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", nargs="?", help="one sequence (default: all)")
        parser.add_argument(
            "--database", default="default", help="the database alias (default: default)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from numbering.django.connection import borrowed
        from numbering.errors import NumberingError
        from numbering.ledger import audit, describe

        alias = options["database"]
        connection = connections[alias]
        try:
            with transaction.atomic(using=alias):
                if connection.vendor in ("postgresql", "mysql"):
                    # One snapshot for the counters and the ledger (SQLite: serializable).
                    with connection.cursor() as cursor:
                        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                with borrowed(connection) as bind:
                    reports = audit(bind, options["name"])
        except NumberingError as exc:
            raise CommandError(str(exc)) from exc
        if not reports:
            self.stdout.write("no sequences to audit")
            return
        for report in reports:
            for line in describe(report):
                self.stdout.write(line)
        bad = sum(not report.ok for report in reports)
        if bad:
            raise CommandError(f"{bad} of {len(reports)} sequence(s) failed the audit")
