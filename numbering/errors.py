"""Every error numbering raises.

One shallow tree rooted at :class:`NumberingError`::

    NumberingError
    ├── InvalidRequestError (also ValueError)   bad input, refused before anything is written
    │   ├── InvalidSequenceNameError
    │   ├── InvalidKeyError
    │   ├── InvalidCountError
    │   ├── InvalidValueError
    │   ├── PayloadTooLargeError
    │   ├── InvalidPolicyError                  a bad format, period, time zone or date
    │   ├── VoidError                           the number cannot be voided
    │   ├── SequenceNotFoundError (also LookupError)
    │   ├── SequenceExistsError
    │   ├── SequenceInUseError                  a sequence with numbers cannot be deleted
    │   └── KeyReusedError                      the key belongs to another request
    ├── ConfigurationError (also ValueError)    a NUMBERING_* setting is wrong
    ├── SequenceExhaustedError                  the next value would pass the maximum
    ├── SequenceFrozenError                     the sequence or period is frozen
    ├── DatabaseError                           the database failed; driver error in __cause__
    │   └── RetryableError                      safe to run the whole transaction again
    │       ├── ConflictError                   another transaction got in the way
    │       │   ├── SerializationConflict       SQLSTATE 40001
    │       │   ├── DeadlockConflict            SQLSTATE 40P01
    │       │   ├── LockNotAvailable            SQLSTATE 55P03, SQLite "database is locked"
    │       │   └── KeyRaceConflict             another transaction inserted the same key
    │       ├── ConnectionLost                  outcome unknown; resolved by key look-up
    │       │   └── ReplicationUnconfirmed      committed, but the standby did not confirm
    │       └── DatabaseUnavailable             could not connect; nothing was sent
    ├── RetriesExhaustedError                   retried until the bounds ran out
    ├── RequestTimeout (also TimeoutError)      no answer from a worker in time
    │   └── BrokerUnavailable                   the broker could not be reached: nothing sent
    └── QuarantinedError                        the request stopped the worker every time

An error's docstring is its default message.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "ConflictError",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnavailable",
    "DeadlockConflict",
    "InvalidCountError",
    "InvalidKeyError",
    "InvalidPolicyError",
    "InvalidRequestError",
    "InvalidSequenceNameError",
    "InvalidValueError",
    "KeyRaceConflict",
    "KeyReusedError",
    "LockNotAvailable",
    "NumberingError",
    "PayloadTooLargeError",
    "QuarantinedError",
    "ReplicationUnconfirmed",
    "RequestTimeout",
    "RetriesExhaustedError",
    "RetryableError",
    "SequenceExhaustedError",
    "SequenceExistsError",
    "SequenceFrozenError",
    "SequenceInUseError",
    "SequenceNotFoundError",
    "SerializationConflict",
    "VoidError",
]


class NumberingError(Exception):
    """A numbering operation failed."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        super().__init__(self.message)


# -- bad input -------------------------------------------------------------------------------


class InvalidRequestError(NumberingError, ValueError):
    """The request is invalid; nothing was written."""


class InvalidSequenceNameError(InvalidRequestError):
    """Invalid sequence name."""


class InvalidKeyError(InvalidRequestError):
    """Invalid request key."""


class InvalidCountError(InvalidRequestError):
    """Invalid count."""


class InvalidValueError(InvalidRequestError):
    """Invalid value."""


class PayloadTooLargeError(InvalidRequestError):
    """The reference payload is too large."""


class SequenceNotFoundError(InvalidRequestError, LookupError):
    """No such sequence."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"sequence {name!r} does not exist; create it first (numbering sequence create {name})"
        )


class SequenceExistsError(InvalidRequestError):
    """The sequence already exists."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"sequence {name!r} already exists")


class SequenceInUseError(InvalidRequestError):
    """The sequence has numbers in the ledger, so it cannot be deleted."""

    def __init__(self, name: str, assignments: int) -> None:
        self.name = name
        self.assignments = assignments
        super().__init__(
            f"sequence {name!r} has {assignments} assignment(s) in the ledger: its numbers "
            f"are records and stay, so it cannot be deleted; freeze it instead to refuse "
            f"new numbers (numbering sequence freeze {name})"
        )


class KeyReusedError(InvalidRequestError):
    """The request key already belongs to another request."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        super().__init__(f"request key {key!r} {detail}")


# -- settings --------------------------------------------------------------------------------


class InvalidPolicyError(InvalidRequestError):
    """A bad format, period, time zone or document date."""


class VoidError(InvalidRequestError):
    """The number cannot be voided (not assigned, already voided, part of a block)."""


class SequenceFrozenError(NumberingError):
    """The sequence, or the request's period, is frozen: nothing is assigned."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"sequence {name!r} is frozen: no numbers are given until it is unfrozen "
            f"(numbering sequence unfreeze ...)"
        )


class ConfigurationError(NumberingError, ValueError):
    """Invalid configuration."""


# -- the sequence itself ---------------------------------------------------------------------


class SequenceExhaustedError(NumberingError):
    """Sequence exhausted."""

    def __init__(self, name: str, last: int | None, maximum: int, count: int) -> None:
        self.name = name
        self.maximum = maximum
        super().__init__(
            f"sequence exhausted: {name!r} cannot give {count} more value(s) "
            f"after {last if last is not None else 'none'} without passing its maximum {maximum}"
        )


# -- database --------------------------------------------------------------------------------


class DatabaseError(NumberingError):
    """The database failed."""

    def __init__(
        self,
        message: str | None = None,
        *,
        sqlstate: str | None = None,
        constraint: str | None = None,
    ) -> None:
        self.sqlstate = sqlstate
        self.constraint = constraint
        super().__init__(message)


class RetryableError(DatabaseError):
    """The transaction failed in a way that makes running it again safe."""


class ConflictError(RetryableError):
    """The transaction conflicted with another one; retrying it is safe."""


class SerializationConflict(ConflictError):
    """Could not serialize access due to a concurrent update (SQLSTATE 40001)."""


class DeadlockConflict(ConflictError):
    """Deadlock detected (SQLSTATE 40P01)."""


class LockNotAvailable(ConflictError):
    """The sequence is locked by another transaction."""


class KeyRaceConflict(ConflictError):
    """Another transaction assigned the same request key at the same time."""


class ConnectionLost(RetryableError):
    """The database connection was lost; the outcome is resolved by looking the key up."""


class ReplicationUnconfirmed(ConnectionLost):
    """The database reported the COMMIT done, but its wait for the synchronous standby was
    cut short: a failover may undo it. Nothing is answered from it; the transaction is
    resolved by running it again, whose lock waits until the standby has it."""


class DatabaseUnavailable(RetryableError):
    """Could not connect to the database."""


class RetriesExhaustedError(NumberingError):
    """Gave up retrying a transaction."""

    def __init__(
        self, attempts: int, elapsed: float, last: BaseException, *, outcome_unknown: bool
    ) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        self.outcome_unknown = outcome_unknown
        if outcome_unknown:
            outcome = (
                "a connection was lost, so an attempt may have committed: send the request "
                "again with the same request key to get its number"
            )
        else:
            outcome = "every attempt was rolled back, nothing was written"
        super().__init__(
            f"gave up after {attempts} attempt(s) in {elapsed:.2f}s; last error: {last}; {outcome}"
        )


class RequestTimeout(NumberingError, TimeoutError):
    """No answer to the number request in time."""

    def __init__(
        self, key: str, sequence: str, timeout: float, *, detail: str | None = None
    ) -> None:
        self.key = key
        self.sequence = sequence
        self.timeout = timeout
        #: What is known of why no answer came (None: nothing more than the timeout).
        self.detail = detail
        why = detail or f"is a worker running? numbering worker --sequence {sequence}"
        super().__init__(
            f"no answer for request key {key!r} on sequence {sequence!r} within "
            f"{timeout:g}s ({why}); the request may still be assigned: ask again with "
            f"key={key!r} to get its number, never with a new key"
        )


class BrokerUnavailable(RequestTimeout):
    """The request could not be sent: the broker was unreachable the whole time.

    Nothing was sent, so nothing was assigned; asking again with the same key is safe.
    A :class:`RequestTimeout`, so code that resends on timeouts handles it as it is.
    """

    def __init__(
        self,
        key: str,
        sequence: str,
        timeout: float,
        broker: str,
        cause: BaseException | None,
        hint: str = "is the broker running? check NUMBERING_BROKER_URL",
    ) -> None:
        NumberingError.__init__(
            self,
            f"could not send request key {key!r} on sequence {sequence!r} to the broker at "
            f"{broker} within {timeout:g}s: {cause or 'no answer'}; nothing was sent, so "
            f"nothing was assigned ({hint})",
        )
        self.key = key
        self.sequence = sequence
        self.timeout = timeout
        self.detail = f"the broker at {broker} could not be reached"
        self.broker = broker


class QuarantinedError(NumberingError):
    """The request was set aside: every attempt to assign it stopped the worker."""
