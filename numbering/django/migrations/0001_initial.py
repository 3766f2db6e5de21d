"""numbering's schema in the Django database: numbering's own migrations (Alembic), run
on Django's connection, so that ``manage.py migrate`` creates or upgrades the tables a
``numbering worker`` uses too (one schema, one ledger)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations, models


def upgrade_schema(apps: Any, schema_editor: Any) -> None:
    from numbering.django.connection import borrowed
    from numbering.migrations import upgrade_on

    with borrowed(schema_editor.connection) as connection:
        upgrade_on(connection)


class Migration(migrations.Migration):
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[Any]] = [
        migrations.RunPython(upgrade_schema, migrations.RunPython.noop, elidable=False),
        migrations.CreateModel(
            name="Counter",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100, unique=True)),
                ("initial_value", models.BigIntegerField()),
                ("reset_value", models.BigIntegerField(null=True)),
                ("last_value", models.BigIntegerField(null=True)),
                ("cycle", models.BigIntegerField()),
            ],
            options={"db_table": "numbering_sequence", "managed": False},
        ),
    ]
