"""numbering's counters as Django sees them: for the database routers (and the admin).

The tables are numbering's own (created and upgraded by ``manage.py migrate``, which runs
numbering's schema migrations); Django never alters them.
"""

from __future__ import annotations

from django.db import models


class Counter(models.Model):
    """A sequence (or a period's counter of a periodic sequence): numbering_sequence."""

    name = models.CharField(max_length=100, unique=True)
    initial_value = models.BigIntegerField()
    reset_value = models.BigIntegerField(null=True)
    last_value = models.BigIntegerField(null=True)
    cycle = models.BigIntegerField()

    class Meta:
        managed = False
        db_table = "numbering_sequence"

    def __str__(self) -> str:
        return str(self.name)


class TakeOver(models.Model):
    """A django-sequences counter taken over by ``manage.py numbering_takeover``: its
    values up to ``last_value`` were given by django-sequences and are not in the ledger,
    which starts after it."""

    sequence_name = models.CharField(max_length=100, unique=True)
    last_value = models.BigIntegerField()
    taken_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "numbering_django_takeover"

    def __str__(self) -> str:
        return f"{self.sequence_name} after {self.last_value}"
