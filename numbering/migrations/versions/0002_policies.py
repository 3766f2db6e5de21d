"""Numbering policies (format, periods, freeze) and an append-only ledger in the database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The ledger is append-only: no DELETE, no TRUNCATE, and the only UPDATE allowed turns an
# assigned row into a voided one (with a reason), changing nothing else.
_ONLY_A_VOID = (
    "OLD.status = 'assigned' AND NEW.status = 'voided' AND NEW.void_reason IS NOT NULL "
    "AND NEW.voided_at IS NOT NULL AND NEW.id = OLD.id AND NEW.sequence_id = OLD.sequence_id "
    "AND NEW.cycle = OLD.cycle AND NEW.value = OLD.value AND NEW.count = OLD.count "
    "AND NEW.request_key = OLD.request_key AND NEW.assigned_at = OLD.assigned_at "
    "AND {same_reference} AND {same_formatted}"
)
APPEND_ONLY = "numbering_ledger is append-only: rows are never deleted or changed, only voided"

_PG = [
    f"""
    CREATE FUNCTION numbering_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND {
        _ONLY_A_VOID.format(
            same_reference="NEW.reference IS NOT DISTINCT FROM OLD.reference",
            same_formatted="NEW.formatted IS NOT DISTINCT FROM OLD.formatted",
        )
    } THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '{APPEND_ONLY}' USING ERRCODE = '55000';
    END $$
    """,
    "CREATE TRIGGER numbering_ledger_append_only BEFORE UPDATE OR DELETE ON numbering_ledger "
    "FOR EACH ROW EXECUTE FUNCTION numbering_ledger_append_only()",
    "CREATE TRIGGER numbering_ledger_no_truncate BEFORE TRUNCATE ON numbering_ledger "
    "FOR EACH STATEMENT EXECUTE FUNCTION numbering_ledger_append_only()",
]
_SQLITE = [
    f"""
    CREATE TRIGGER numbering_ledger_no_delete BEFORE DELETE ON numbering_ledger
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END
    """,
    f"""
    CREATE TRIGGER numbering_ledger_only_void BEFORE UPDATE ON numbering_ledger
    WHEN NOT ({
        _ONLY_A_VOID.format(
            same_reference="NEW.reference IS OLD.reference",
            same_formatted="NEW.formatted IS OLD.formatted",
        )
    })
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END
    """,
]


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
    if op.get_bind().dialect.name == "postgresql":  # SQLite cannot add a constraint later
        op.create_check_constraint(
            "period_known",
            "numbering_sequence",
            "period IS NULL OR period IN ('year', 'month', 'day')",
        )
    op.create_index("ix_numbering_sequence_parent_id", "numbering_sequence", ["parent_id"])
    op.add_column("numbering_ledger", sa.Column("formatted", sa.String(255), nullable=True))
    for statement in _PG if op.get_bind().dialect.name == "postgresql" else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER numbering_ledger_no_truncate ON numbering_ledger")
        op.execute("DROP TRIGGER numbering_ledger_append_only ON numbering_ledger")
        op.execute("DROP FUNCTION numbering_ledger_append_only()")
    else:
        op.execute("DROP TRIGGER numbering_ledger_no_delete")
        op.execute("DROP TRIGGER numbering_ledger_only_void")
    with op.batch_alter_table("numbering_ledger") as table:
        table.drop_column("formatted")
    op.drop_index("ix_numbering_sequence_parent_id", "numbering_sequence")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("ck_numbering_sequence_period_known", "numbering_sequence")
    with op.batch_alter_table("numbering_sequence") as table:
        for column in ("period_key", "parent_id", "frozen", "timezone", "period", "format"):
            table.drop_column(column)
