"""numbering's tables as Django sees them: for the database routers and the admin.

``Counter`` and ``LedgerEntry`` are numbering's own tables, created and upgraded by
``manage.py migrate`` (which runs numbering's schema migrations); Django never alters
them (``managed = False``) and the admin only reads them: numbers are taken, frozen and
voided through numbering's functions, which keep the ledger append-only.
"""

from __future__ import annotations

from django.db import models


class Counter(models.Model):
    """A sequence, or a period's counter of a periodic sequence (numbering_sequence)."""

    name = models.CharField(max_length=100, unique=True)
    initial_value = models.BigIntegerField()
    reset_value = models.BigIntegerField(null=True, blank=True)
    max_value = models.BigIntegerField(null=True, blank=True)
    last_value = models.BigIntegerField(null=True, blank=True)
    cycle = models.BigIntegerField()
    format = models.CharField(max_length=200, null=True, blank=True)
    period = models.CharField(max_length=8, null=True, blank=True)
    timezone = models.CharField(max_length=64, null=True, blank=True)
    frozen = models.BooleanField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False
    )
    period_key = models.CharField(max_length=16, null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "numbering_sequence"
        ordering = ("name",)
        verbose_name = "sequence"

    def __str__(self) -> str:
        return str(self.name)


class LedgerEntry(models.Model):
    """One assignment: the block ``value .. value + count - 1`` of a counter's cycle,
    tied to its request key (numbering_ledger; append-only)."""

    sequence = models.ForeignKey(
        Counter, on_delete=models.DO_NOTHING, db_constraint=False, related_name="entries"
    )
    cycle = models.BigIntegerField()
    value = models.BigIntegerField()
    count = models.BigIntegerField()
    request_key = models.CharField(max_length=200, unique=True)
    reference = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16)
    void_reason = models.TextField(null=True, blank=True)
    assigned_at = models.DateTimeField()
    voided_at = models.DateTimeField(null=True, blank=True)
    formatted = models.CharField(max_length=255, null=True, blank=True)

    class Meta:
        managed = False
        db_table = "numbering_ledger"
        ordering = ("-id",)
        verbose_name = "ledger entry"
        verbose_name_plural = "ledger"

    def __str__(self) -> str:
        last = self.value + self.count - 1
        values = str(self.value) if self.count == 1 else f"{self.value}..{last}"
        return f"{values} ({self.request_key})"


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
