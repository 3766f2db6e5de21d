"""Check constraints named once: ``ck_numbering_ledger_count_positive``, not
``ck_numbering_ledger_ck_numbering_ledger_count_positive``.

Revision 0001 gave its check constraints their full names and the metadata's naming
convention prefixed them again. Revision 0001 now marks them final, so new databases get
the right names; this revision renames them in PostgreSQL databases made before. SQLite
cannot rename a constraint without rebuilding the table (and the ledger's triggers with
it), so an SQLite database made before keeps the doubled names, which nothing reads.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from numbering.backends import backend_for

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_CHECKS = {
    "numbering_sequence": (
        "reset_after_initial",
        "max_after_initial",
        "last_after_initial",
        "cycle_not_negative",
    ),
    "numbering_ledger": ("count_positive", "status_known"),
}


def _rename(doubled_to_single: bool) -> None:
    bind = op.get_bind()
    backend = backend_for(bind)
    if not backend.alters_constraints:
        return
    for table, names in _CHECKS.items():
        present = backend.constraint_names(bind, table)
        for name in names:
            single = f"ck_{table}_{name}"
            doubled = f"ck_{table}_{single}"
            old, new = (doubled, single) if doubled_to_single else (single, doubled)
            if old in present and new not in present:
                op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}"')


def upgrade() -> None:
    _rename(doubled_to_single=True)


def downgrade() -> None:
    _rename(doubled_to_single=False)
