"""Counters and the append-only ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# MariaDB/MySQL (added with that engine; PostgreSQL's and SQLite's DDL is unchanged):
# fractional seconds, InnoDB, byte-exact strings.
_TIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_INNODB: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def upgrade() -> None:
    op.create_table(
        "numbering_sequence",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("initial_value", sa.BigInteger(), nullable=False),
        sa.Column("reset_value", sa.BigInteger(), nullable=True),
        sa.Column("max_value", sa.BigInteger(), nullable=True),
        sa.Column("last_value", sa.BigInteger(), nullable=True),
        sa.Column("cycle", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_numbering_sequence"),
        sa.UniqueConstraint("name", name="uq_numbering_sequence_name"),
        sa.CheckConstraint(
            "reset_value IS NULL OR reset_value > initial_value",
            name=op.f("ck_numbering_sequence_reset_after_initial"),
        ),
        sa.CheckConstraint(
            "max_value IS NULL OR max_value >= initial_value",
            name=op.f("ck_numbering_sequence_max_after_initial"),
        ),
        sa.CheckConstraint(
            "last_value IS NULL OR last_value >= initial_value",
            name=op.f("ck_numbering_sequence_last_after_initial"),
        ),
        sa.CheckConstraint("cycle >= 0", name=op.f("ck_numbering_sequence_cycle_not_negative")),
        **_INNODB,
    )
    op.create_table(
        "numbering_ledger",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("sequence_id", _ID, nullable=False),
        sa.Column("cycle", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("request_key", sa.String(200), nullable=False),
        sa.Column("reference", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("void_reason", sa.Text(), nullable=True),
        sa.Column("assigned_at", _TIME, nullable=False),
        sa.Column("voided_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_numbering_ledger"),
        sa.ForeignKeyConstraint(
            ["sequence_id"],
            ["numbering_sequence.id"],
            name="fk_numbering_ledger_sequence_id_numbering_sequence",
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("request_key", name="uq_numbering_ledger_request_key"),
        sa.UniqueConstraint("sequence_id", "cycle", "value", name="uq_numbering_ledger_value"),
        sa.CheckConstraint("count >= 1", name=op.f("ck_numbering_ledger_count_positive")),
        sa.CheckConstraint(
            "status IN ('assigned', 'voided')", name=op.f("ck_numbering_ledger_status_known")
        ),
        **_INNODB,
    )


def downgrade() -> None:
    op.drop_table("numbering_ledger")
    op.drop_table("numbering_sequence")
