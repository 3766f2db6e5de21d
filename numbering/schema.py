"""The two tables numbering keeps: the counters and the append-only ledger.

``numbering_sequence`` holds one row per sequence: its bounds and the last value given.
``numbering_ledger`` holds one row per *assignment*: the block ``value .. value + count - 1``
of a sequence's cycle given to one request key. A single number is a block of one; a batch
job's chunk of 10,000 documents is one row, so the ledger does not double the cost of
numbering documents in bulk (the documents themselves carry the individual numbers).

Every integer that holds a sequence value is 64-bit. On SQLite the primary keys are plain
INTEGER so that they alias the rowid and autoincrement.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.postgresql import JSONB

from numbering.chain import GENESIS
from numbering.validation import MAX_KEY_LENGTH, MAX_NAME_LENGTH

__all__ = [
    "as_utc",
    "CHAIN_LINK_CONSTRAINT",
    "LEDGER_LINK_CONSTRAINT",
    "chain_records",
    "LEDGER_KEY_CONSTRAINT",
    "LEDGER_VALUE_CONSTRAINT",
    "SEQUENCE_NAME_CONSTRAINT",
    "STATUS_ASSIGNED",
    "STATUS_VOIDED",
    "ledger",
    "metadata",
    "sequences",
]

STATUS_ASSIGNED = "assigned"
STATUS_VOIDED = "voided"

# Constraint names are part of the contract: errors are recognised by them.
SEQUENCE_NAME_CONSTRAINT = "uq_numbering_sequence_name"
LEDGER_KEY_CONSTRAINT = "uq_numbering_ledger_request_key"
LEDGER_VALUE_CONSTRAINT = "uq_numbering_ledger_value"
LEDGER_LINK_CONSTRAINT = "uq_numbering_ledger_link"
CHAIN_LINK_CONSTRAINT = "uq_numbering_chain_link"

_ID = BigInteger().with_variant(Integer, "sqlite")
# MySQL's DATETIME keeps whole seconds unless told otherwise.
_TIME = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# InnoDB, and strings that compare byte-exact: a request key "Invoice:1" is not "invoice:1".
_INNODB: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
_PAYLOAD = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

sequences = Table(
    "numbering_sequence",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("initial_value", BigInteger, nullable=False),
    # A looping sequence gives initial_value .. reset_value - 1, then starts a new cycle.
    Column("reset_value", BigInteger, nullable=True),
    # A non-looping sequence stops with "sequence exhausted" past max_value (default 2**63-1).
    Column("max_value", BigInteger, nullable=True),
    # NULL until the first value is given.
    Column("last_value", BigInteger, nullable=True),
    Column("cycle", BigInteger, nullable=False, server_default="0"),
    Column("created_at", _TIME, nullable=False),
    Column("updated_at", _TIME, nullable=False),
    # Display format, e.g. "INV-{year}-{number:06d}" (numbering.policies).
    Column("format", String(200), nullable=True),
    # A periodic sequence keeps one counter per year, month or day (a child row each).
    Column("period", String(8), nullable=True),
    # Time zone that decides "today" for requests that carry no document date.
    Column("timezone", String(64), nullable=True),
    # Frozen: requests are refused (year-end close of a sequence or one period).
    Column("frozen", Boolean, nullable=False, server_default=false()),
    # A period's counter points at its sequence and names its period ("2026", "2026-03").
    Column("parent_id", _ID, nullable=True, index=True),
    Column("period_key", String(16), nullable=True),
    # The counter's hash chain (numbering.chain): its last link and that record's
    # fingerprint; 0 and 64 zeros until its first number starts it. NULL for a counter
    # whose numbers predate chains, until ``numbering chain backfill`` starts its chain.
    Column("chain_link", BigInteger, nullable=True, server_default="0"),
    Column("chain_head", String(64), nullable=True, server_default=GENESIS),
    UniqueConstraint("name", name=SEQUENCE_NAME_CONSTRAINT),
    CheckConstraint("period IS NULL OR period IN ('year', 'month', 'day')", name="period_known"),
    CheckConstraint(
        "reset_value IS NULL OR reset_value > initial_value", name="reset_after_initial"
    ),
    CheckConstraint("max_value IS NULL OR max_value >= initial_value", name="max_after_initial"),
    CheckConstraint("last_value IS NULL OR last_value >= initial_value", name="last_after_initial"),
    CheckConstraint("cycle >= 0", name="cycle_not_negative"),
    **_INNODB,
)

ledger = Table(
    "numbering_ledger",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column(
        "sequence_id",
        _ID,
        ForeignKey("numbering_sequence.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    Column("cycle", BigInteger, nullable=False),
    # First value of the block; the block is value .. value + count - 1.
    Column("value", BigInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("request_key", String(MAX_KEY_LENGTH), nullable=False),
    Column("reference", _PAYLOAD, nullable=True),
    Column("status", String(16), nullable=False),
    Column("void_reason", Text, nullable=True),
    Column("assigned_at", _TIME, nullable=False),
    Column("voided_at", _TIME, nullable=True),
    # The first value as displayed, in the sequence's format (NULL without a format).
    Column("formatted", String(255), nullable=True),
    # The row's place in its counter's hash chain and its fingerprint (numbering.chain);
    # NULL for a row written before chains, until the back-fill chains it.
    Column("link", BigInteger, nullable=True),
    Column("fingerprint", String(64), nullable=True),
    # A request key names one request across all sequences: reusing it elsewhere is refused
    # by the database itself, not only by a look-up that a race could slip past.
    UniqueConstraint("request_key", name=LEDGER_KEY_CONSTRAINT),
    UniqueConstraint("sequence_id", "cycle", "value", name=LEDGER_VALUE_CONSTRAINT),
    CheckConstraint("count >= 1", name="count_positive"),
    CheckConstraint("status IN ('assigned', 'voided')", name="status_known"),
    # An index, not a constraint: SQLite can add one to a table that has rows.
    Index(LEDGER_LINK_CONSTRAINT, "sequence_id", "link", unique=True),
    **_INNODB,
)

#: The records of a counter's hash chain that are not ledger rows: the start of the
#: chain, voids, renames and changes of bounds (numbering.chain). Append-only, like the
#: ledger.
chain_records = Table(
    "numbering_chain",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column(
        "sequence_id",
        _ID,
        ForeignKey("numbering_sequence.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    Column("link", BigInteger, nullable=False),
    Column("kind", String(8), nullable=False),
    # The record itself, as numbering.chain.canonical wrote it.
    Column("record", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    UniqueConstraint("sequence_id", "link", name=CHAIN_LINK_CONSTRAINT),
    CheckConstraint("kind IN ('start', 'void', 'rename', 'bounds')", name="kind_known"),
    **_INNODB,
)


def as_utc(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite hands times back without a zone)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment
