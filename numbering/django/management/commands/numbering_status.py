"""``manage.py numbering_status``: each sequence's counter and, with the queue path set
up, its queue and consumer (``numbering status`` on the Django database)."""

from __future__ import annotations

import json
import os
from typing import Any

from django.conf import settings as django_settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, transaction


def _queue_configured() -> bool:
    """Whether the project uses the queue path (a broker named in settings.NUMBERING or
    in the environment): only then are there queues to show."""
    given = getattr(django_settings, "NUMBERING", {})
    named = isinstance(given, dict) and any(
        key in ("BROKER_URL", "NUMBERING_BROKER_URL") for key in given
    )
    return named or "NUMBERING_BROKER_URL" in os.environ


class Command(BaseCommand):
    help = (
        "Show each sequence's last and next value and whether it is frozen; with the "
        "queue path set up (a BROKER_URL in settings.NUMBERING or NUMBERING_BROKER_URL), "
        "also its waiting, in-flight and quarantined requests and whether a worker is "
        "its active consumer. Changes nothing; --check exits with status 1 on a problem."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database", default="default", help="the database alias (default: default)"
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument(
            "--check",
            action="store_true",
            help="exit 1 if requests wait with no consumer, or any are quarantined",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from numbering.django.connection import borrowed
        from numbering.errors import NumberingError
        from numbering.sequences import current_counter, list_sequences

        alias = options["database"]
        connection = connections[alias]
        rows: list[dict[str, Any]] = []
        try:
            with transaction.atomic(using=alias), borrowed(connection) as bind:
                for info in list_sequences(bind):
                    if info.period_key is not None:
                        continue  # a period's counter: shown as its sequence's
                    # Today's period, for a periodic sequence.
                    counter, day = current_counter(bind, info.name)
                    rows.append(
                        {
                            "sequence": info.name,
                            "last_value": counter.last_value,
                            "period": counter.period_key,
                            "next_value": counter.next_value,
                            "next_number": counter.preview(day),
                            "frozen": counter.frozen or info.frozen,
                        }
                    )
                if _queue_configured():
                    from sqlalchemy import Engine, create_engine

                    from numbering.django.queue import settings
                    from numbering.tasks.status import collect

                    # SQLite's consumer lock is a file beside the database's: found from
                    # the file's name, which a borrowed connection does not carry.
                    database = (
                        create_engine(f"sqlite:///{connection.settings_dict['NAME']}")
                        if connection.vendor == "sqlite"
                        else bind
                    )
                    try:
                        statuses = collect(settings(), database)
                    finally:
                        if isinstance(database, Engine):
                            database.dispose()
                    queues = {status.sequence: status.to_json() for status in statuses}
                    for row in rows:
                        queue = queues.get(row["sequence"], {})
                        row.update(
                            {
                                name: queue.get(name)
                                for name in (
                                    "queue",
                                    "waiting",
                                    "in_flight",
                                    "quarantined",
                                    "consumer",
                                    "oldest_waiting_seconds",
                                    "problems",
                                )
                            }
                        )
        except NumberingError as exc:
            raise CommandError(str(exc)) from exc
        problems = [
            f"{row['sequence']}: {problem}" for row in rows for problem in row.get("problems") or []
        ]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2, default=str))
        elif not rows:
            self.stdout.write("no sequences yet")
        else:
            self._table(rows, _queue_configured())
            for problem in problems:
                self.stderr.write(f"problem: {problem}")
        if options["check"] and problems:
            raise CommandError(f"{len(problems)} problem(s)")

    def _table(self, rows: list[dict[str, Any]], with_queues: bool) -> None:
        def show(value: Any) -> str:
            return "-" if value is None else str(value)

        header = ["SEQUENCE", "LAST", "NEXT"]
        if with_queues:
            header += ["WAITING", "IN FLIGHT", "QUARANTINED", "CONSUMER", "OLDEST"]
        lines = [header]
        for row in rows:
            last = show(row["last_value"])
            if row["period"]:
                last += f" ({row['period']})"
            line = [
                row["sequence"] + (" (frozen)" if row["frozen"] else ""),
                last,
                show(row["next_number"] or row["next_value"]),
            ]
            if with_queues:
                oldest = row.get("oldest_waiting_seconds")
                line += [
                    show(row.get("waiting")),
                    show(row.get("in_flight")),
                    show(row.get("quarantined")),
                    (f"alive: {row['holder']}" if row.get("holder") else "alive")
                    if row.get("consumer")
                    else "NONE",
                    "-" if oldest is None else f"{oldest:.1f}s",
                ]
            lines.append(line)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(line, widths, strict=True)
                ).rstrip()
            )
