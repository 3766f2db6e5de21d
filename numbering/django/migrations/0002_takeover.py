from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("numbering", "0001_initial")]
    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="TakeOver",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("sequence_name", models.CharField(max_length=100, unique=True)),
                ("last_value", models.BigIntegerField()),
                ("taken_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={"db_table": "numbering_django_takeover"},
        ),
    ]
