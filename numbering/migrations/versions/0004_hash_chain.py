"""A hash chain per counter: each ledger row's place in it and fingerprint, the chain's
other records (start, void, rename, bounds) in ``numbering_chain``, and triggers that let a row
written before chains be chained once (``numbering chain backfill``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from numbering.backends import backend_for

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_INNODB: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def upgrade() -> None:
    backend = backend_for(op.get_bind())
    # Every counter's chain is ready to start with its next number (link 0, the genesis
    # head), except those that gave numbers already: NULL, until the back-fill.
    op.add_column(
        "numbering_sequence",
        sa.Column("chain_link", sa.BigInteger(), nullable=True, server_default="0"),
    )
    op.add_column(
        "numbering_sequence",
        sa.Column("chain_head", sa.String(64), nullable=True, server_default="0" * 64),
    )
    op.execute(
        "UPDATE numbering_sequence SET chain_link = NULL, chain_head = NULL "
        "WHERE last_value IS NOT NULL"
    )
    op.add_column("numbering_ledger", sa.Column("link", sa.BigInteger(), nullable=True))
    op.add_column("numbering_ledger", sa.Column("fingerprint", sa.String(64), nullable=True))
    op.create_index(
        "uq_numbering_ledger_link", "numbering_ledger", ["sequence_id", "link"], unique=True
    )
    op.create_table(
        "numbering_chain",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("sequence_id", _ID, nullable=False),
        sa.Column("link", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_numbering_chain"),
        sa.ForeignKeyConstraint(
            ["sequence_id"],
            ["numbering_sequence.id"],
            name="fk_numbering_chain_sequence_id_numbering_sequence",
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("sequence_id", "link", name="uq_numbering_chain_link"),
        sa.CheckConstraint(
            "kind IN ('start', 'void', 'rename', 'bounds')",
            name=op.f("ck_numbering_chain_kind_known"),
        ),
        **_INNODB,
    )
    for statement in backend.drop_ledger_triggers():
        op.execute(statement)
    for statement in backend.ledger_triggers(chain=True):
        op.execute(statement)


def downgrade() -> None:
    backend = backend_for(op.get_bind())
    for statement in backend.drop_ledger_triggers(chain=True):
        op.execute(statement)
    op.drop_table("numbering_chain")
    op.drop_index("uq_numbering_ledger_link", "numbering_ledger")
    with op.batch_alter_table("numbering_ledger") as table:
        table.drop_column("fingerprint")
        table.drop_column("link")
    with op.batch_alter_table("numbering_sequence") as table:
        table.drop_column("chain_head")
        table.drop_column("chain_link")
    for statement in backend.ledger_triggers():  # revision 0002's, last
        op.execute(statement)
