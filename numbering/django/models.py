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
