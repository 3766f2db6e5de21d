"""Gapless sequence numbers from a real database.

In your own transaction (the django-sequences model)::

    from numbering import allocate
    with Session(engine) as session, session.begin():
        invoice.number = allocate(session, "invoices", key=f"invoice:{invoice.id}")

In numbering's own short, retried transaction::

    from numbering import Allocator
    numbers = Allocator.from_env()
    numbers.next_value("invoices", key="invoice:42")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from numbering.allocator import Allocator
from numbering.assignment import (
    Assignment,
    Outcome,
    Request,
    allocate,
    assign,
    assign_many,
    new_key,
)
from numbering.database import create_engine
from numbering.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConflictError,
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    DeadlockConflict,
    InvalidCountError,
    InvalidKeyError,
    InvalidPolicyError,
    InvalidRequestError,
    InvalidSequenceNameError,
    InvalidValueError,
    KeyRaceConflict,
    KeyReusedError,
    LockNotAvailable,
    NumberingError,
    PayloadTooLargeError,
    QuarantinedError,
    ReplicationUnconfirmed,
    RequestTimeout,
    RetriesExhaustedError,
    RetryableError,
    SequenceExhaustedError,
    SequenceExistsError,
    SequenceFrozenError,
    SequenceInUseError,
    SequenceNotFoundError,
    SerializationConflict,
    VoidError,
)
from numbering.ledger import AuditReport, audit, export
from numbering.migrations import upgrade as init_db
from numbering.policies import DateLike
from numbering.retry import RetryPolicy
from numbering.routing import queue_for
from numbering.sequences import (
    SequenceInfo,
    create_sequence,
    get_sequence,
    last_value,
    list_sequences,
)
from numbering.settings import Settings

if TYPE_CHECKING:
    from numbering.client import Client

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    # The client brings in Celery; load it only for those who use it.
    if name == "Client":
        from numbering.client import Client

        return Client
    raise AttributeError(f"module 'numbering' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # enqueue and await
    "Client",
    "queue_for",
    # allocation in the caller's transaction
    "allocate",
    "assign",
    "assign_many",
    "new_key",
    "Request",
    "Assignment",
    "Outcome",
    "DateLike",
    # numbering's own retried transactions
    "Allocator",
    "RetryPolicy",
    "Settings",
    # sequences, schema and audit
    "create_sequence",
    "get_sequence",
    "last_value",
    "list_sequences",
    "SequenceInfo",
    "init_db",
    "create_engine",
    "audit",
    "export",
    "AuditReport",
    # errors (the tree is in numbering.errors)
    "NumberingError",
    "InvalidRequestError",
    "InvalidSequenceNameError",
    "InvalidKeyError",
    "InvalidCountError",
    "InvalidValueError",
    "PayloadTooLargeError",
    "InvalidPolicyError",
    "VoidError",
    "SequenceNotFoundError",
    "SequenceExistsError",
    "SequenceInUseError",
    "KeyReusedError",
    "SequenceExhaustedError",
    "SequenceFrozenError",
    "ConfigurationError",
    "DatabaseError",
    "RetryableError",
    "ConflictError",
    "SerializationConflict",
    "DeadlockConflict",
    "LockNotAvailable",
    "KeyRaceConflict",
    "ConnectionLost",
    "ReplicationUnconfirmed",
    "DatabaseUnavailable",
    "RetriesExhaustedError",
    "RequestTimeout",
    "BrokerUnavailable",
    "QuarantinedError",
]
