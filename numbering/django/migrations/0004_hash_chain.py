"""numbering's schema revision 0004 (the hash chain of each counter) in a project that
ran 0001 before it existed: ``manage.py migrate`` brings numbering's tables to the head
of numbering's own migrations again (a database there already is left as it is)."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from django.db import migrations

# The same step as 0001's (a module name that starts with a digit is imported by name).
upgrade_schema = importlib.import_module("numbering.django.migrations.0001_initial").upgrade_schema


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("numbering", "0003_ledger_and_admin")]
    operations: ClassVar[list[Any]] = [
        migrations.RunPython(upgrade_schema, migrations.RunPython.noop, elidable=False),
    ]
