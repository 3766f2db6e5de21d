"""``manage.py numbering_takeover``: continue django-sequences' counters in numbering."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, transaction

from numbering.errors import NumberingError, SequenceNotFoundError

DJANGO_SEQUENCES_TABLE = "sequences_sequence"


class _DryRun(Exception):
    """Raised to roll the take-over back after a dry run."""


class Command(BaseCommand):
    help = (
        "Take over django-sequences' counters (the sequences_sequence table): each "
        "sequence continues in numbering right after its last value. Safe to run again; "
        "all or nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database", default="default", help="the database alias (default: default)"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="say what would be done; change nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias, dry_run = options["database"], options["dry_run"]
        connection = connections[alias]
        tables = connection.introspection.table_names()
        if DJANGO_SEQUENCES_TABLE not in tables:
            raise CommandError(
                f"no django-sequences table ({DJANGO_SEQUENCES_TABLE}) in database {alias!r}: "
                "nothing to take over"
            )
        if "numbering_sequence" not in tables:
            raise CommandError(
                f"numbering's tables are missing in database {alias!r}: run "
                f"`manage.py migrate numbering --database {alias}` first"
            )
        try:
            with transaction.atomic(using=alias):
                lines, problems = self._take_over(alias)
                for line in lines:
                    self.stdout.write(line)
                if problems:
                    raise CommandError(
                        "nothing was taken over:\n" + "\n".join(f"  {p}" for p in problems)
                    )
                if dry_run:
                    raise _DryRun
        except _DryRun:
            self.stdout.write("dry run: nothing was changed")
            return
        taken = sum("numbering gives" in line for line in lines)
        self.stdout.write(
            self.style.SUCCESS(
                f"took over {taken} sequence(s); {len(lines) - taken} already taken over"
            )
        )

    def _take_over(self, alias: str) -> tuple[list[str], list[str]]:
        from numbering.django.connection import borrowed
        from numbering.django.models import TakeOver
        from numbering.sequences import create_sequence, get_sequence
        from numbering.validation import check_sequence_name

        connection = connections[alias]
        table = connection.ops.quote_name(DJANGO_SEQUENCES_TABLE)
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        with connection.cursor() as cursor:
            # Locked until the take-over commits: old code still running waits for it.
            cursor.execute(f"SELECT name, last FROM {table} ORDER BY name{lock}")
            rows = cursor.fetchall()
        done = {t.sequence_name: t for t in TakeOver.objects.using(alias).all()}
        lines: list[str] = []
        problems: list[str] = []
        with borrowed(connection) as bind:
            for name, last in rows:
                try:
                    check_sequence_name(name)
                except NumberingError as exc:
                    problems.append(f"{name!r}: {exc} (rename it in both places first)")
                    continue
                earlier = done.get(name)
                if earlier is not None:
                    if last > earlier.last_value:
                        problems.append(
                            f"{name}: django-sequences gave values up to {last} after it was "
                            f"taken over at {earlier.last_value}: values "
                            f"{earlier.last_value + 1}..{last} may have been given twice; "
                            "stop every process still using django-sequences and check "
                            "those documents"
                        )
                    else:
                        lines.append(f"{name}: already taken over after {earlier.last_value}")
                    continue
                try:
                    existing = get_sequence(bind, name)
                except SequenceNotFoundError:
                    existing = None
                if existing is not None:
                    problems.append(
                        f"{name}: numbering already has a sequence of that name (last value "
                        f"{existing.last_value}); it was not taken over from django-sequences"
                    )
                    continue
                create_sequence(bind, name, initial_value=last + 1)
                TakeOver.objects.using(alias).create(sequence_name=name, last_value=last)
                lines.append(
                    f"{name}: django-sequences gave up to {last}; numbering gives {last + 1} next"
                )
        return lines, problems
