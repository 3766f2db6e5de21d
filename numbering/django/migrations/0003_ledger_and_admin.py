"""The ledger, as the admin reads it (numbering's table: nothing is created)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [
        ("numbering", "0002_takeover"),
    ]

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="LedgerEntry",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("cycle", models.BigIntegerField()),
                ("value", models.BigIntegerField()),
                ("count", models.BigIntegerField()),
                ("request_key", models.CharField(max_length=200, unique=True)),
                ("reference", models.JSONField(blank=True, null=True)),
                ("status", models.CharField(max_length=16)),
                ("void_reason", models.TextField(blank=True, null=True)),
                ("assigned_at", models.DateTimeField()),
                ("voided_at", models.DateTimeField(blank=True, null=True)),
                ("formatted", models.CharField(blank=True, max_length=255, null=True)),
            ],
            options={
                "verbose_name": "ledger entry",
                "verbose_name_plural": "ledger",
                "db_table": "numbering_ledger",
                "ordering": ("-id",),
                "managed": False,
            },
        ),
        migrations.AlterModelOptions(
            name="counter",
            options={"managed": False, "ordering": ("name",), "verbose_name": "sequence"},
        ),
    ]
