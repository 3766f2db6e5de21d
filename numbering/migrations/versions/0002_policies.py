"""Numbering policies (format, periods, freeze) and an append-only ledger in the database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from numbering.backends import backend_for

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The ledger is append-only: no DELETE, no TRUNCATE, and the only UPDATE allowed turns an
# assigned row into a voided one (with a reason), changing nothing else. Each engine's
# backend holds its triggers (Backend.ledger_triggers), frozen as this revision made them.


def upgrade() -> None:
    # Plain ADD COLUMNs: on SQLite, recreating numbering_sequence (batch mode) would fail
    # on the ledger's foreign key once there are rows.
    op.add_column("numbering_sequence", sa.Column("format", sa.String(200), nullable=True))
    op.add_column("numbering_sequence", sa.Column("period", sa.String(8), nullable=True))
    op.add_column("numbering_sequence", sa.Column("timezone", sa.String(64), nullable=True))
    op.add_column(
        "numbering_sequence",
        sa.Column("frozen", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("numbering_sequence", sa.Column("parent_id", _ID, nullable=True))
    op.add_column("numbering_sequence", sa.Column("period_key", sa.String(16), nullable=True))
    backend = backend_for(op.get_bind())
    if backend.alters_constraints:  # SQLite cannot add a constraint later
        op.create_check_constraint(
            "period_known",
            "numbering_sequence",
            "period IS NULL OR period IN ('year', 'month', 'day')",
        )
    op.create_index("ix_numbering_sequence_parent_id", "numbering_sequence", ["parent_id"])
    op.add_column("numbering_ledger", sa.Column("formatted", sa.String(255), nullable=True))
    for statement in backend.ledger_triggers():
        op.execute(statement)


def downgrade() -> None:
    backend = backend_for(op.get_bind())
    for statement in backend.drop_ledger_triggers():
        op.execute(statement)
    with op.batch_alter_table("numbering_ledger") as table:
        table.drop_column("formatted")
    op.drop_index("ix_numbering_sequence_parent_id", "numbering_sequence")
    if backend.alters_constraints:
        op.drop_constraint("ck_numbering_sequence_period_known", "numbering_sequence")
    with op.batch_alter_table("numbering_sequence") as table:
        for column in ("period_key", "parent_id", "frozen", "timezone", "period", "format"):
            table.drop_column(column)
