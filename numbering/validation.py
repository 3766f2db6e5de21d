"""Input rules shared by the Python API, the CLI and (later) task payloads.

Everything a caller hands us is checked here, before a transaction starts, so that bad
input is refused with a clear message and nothing is written.
"""

from __future__ import annotations

import json
import math
from typing import Any

from numbering.errors import (
    InvalidCountError,
    InvalidKeyError,
    InvalidRequestError,
    InvalidSequenceNameError,
    InvalidValueError,
    PayloadTooLargeError,
)

__all__ = [
    "ISOLATION_LEVELS",
    "MAX_COUNT",
    "MAX_INT64",
    "MAX_KEY_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_REFERENCE_BYTES",
    "PERIOD_SEPARATOR",
    "check_count",
    "check_int64",
    "check_isolation_level",
    "check_key",
    "check_reference",
    "check_sequence_name",
    "check_sequence_bounds",
]

# Largest value a BIGINT column (and so a sequence) can hold.
MAX_INT64 = 2**63 - 1
# django-sequences' limit (its name column is 100 characters); names become queue names.
MAX_NAME_LENGTH = 100
# Request keys are usually document ids or UUIDs; 200 characters leaves room for prefixes.
MAX_KEY_LENGTH = 200
# The most values one request may take as a block; batch jobs ask chunk by chunk.
MAX_COUNT = 1_000_000
# A reference is a small note for auditors (document id, table, user), not a document store.
MAX_REFERENCE_BYTES = 4096

ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")

# A periodic sequence's period counters are named NAME/PERIOD, so a user's name never
# holds it: "inv/2026" could otherwise name the period counter of sequence "inv".
PERIOD_SEPARATOR = "/"


def _check_text(value: object, what: str, limit: int, error: type[ValueError]) -> str:
    """``value`` if it is a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise error(f"{what} must not be empty")
    if len(value) > limit:
        raise error(f"{what} is {len(value)} characters long; the limit is {limit}")
    return value


def check_sequence_name(name: object) -> str:
    """Return ``name`` if it is a valid sequence name, else raise InvalidSequenceNameError.

    Any text django-sequences takes, but ``/``: 1 to 100 characters, printable (no line
    breaks, tabs, control or invisible format characters, which would make log lines and
    command output lie), without leading or trailing whitespace. Names compare exactly,
    code point by code point (no case folding or Unicode normalization).

    >>> check_sequence_name("invoices-2026")
    'invoices-2026'
    >>> check_sequence_name("Factures clients 2026")
    'Factures clients 2026'
    """
    name = _check_text(name, "sequence name", MAX_NAME_LENGTH, InvalidSequenceNameError)
    if name != name.strip():
        raise InvalidSequenceNameError(
            f"invalid sequence name {name!r}: leading or trailing whitespace"
        )
    if not name.isprintable():
        raise InvalidSequenceNameError(
            f"invalid sequence name {name!r}: control, line-break or invisible characters"
        )
    if PERIOD_SEPARATOR in name:
        raise InvalidSequenceNameError(
            f"invalid sequence name {name!r}: '/' is kept for period counters (NAME/PERIOD)"
        )
    return name


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid request key, else raise InvalidKeyError."""
    key = _check_text(key, "request key", MAX_KEY_LENGTH, InvalidKeyError)
    if key != key.strip():
        raise InvalidKeyError(f"request key {key!r} has leading or trailing whitespace")
    if not key.isprintable():
        raise InvalidKeyError(f"request key {key!r} contains control characters")
    return key


def check_int64(value: object, what: str, *, minimum: int = 0) -> int:
    """Return ``value`` if it is an int in ``minimum..2**63-1``, else raise InvalidValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(f"{what} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise InvalidValueError(f"{what} must be at least {minimum}, got {value}")
    if value > MAX_INT64:
        raise InvalidValueError(f"{what} must be at most 2**63-1 ({MAX_INT64}), got {value}")
    return value


def check_count(count: object) -> int:
    """Return ``count`` if it is an int in ``1..MAX_COUNT``, else raise InvalidCountError."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidCountError(f"count must be an integer, not {type(count).__name__}")
    if count < 1:
        raise InvalidCountError(f"count must be at least 1, got {count}")
    if count > MAX_COUNT:
        raise InvalidCountError(f"count must be at most {MAX_COUNT}, got {count}")
    return count


def check_sequence_bounds(
    initial_value: object, reset_value: object, max_value: object
) -> tuple[int, int | None, int | None]:
    """Validate the numbers that define a sequence; return them as ints."""
    initial = check_int64(initial_value, "initial_value")
    reset = None if reset_value is None else check_int64(reset_value, "reset_value")
    maximum = None if max_value is None else check_int64(max_value, "max_value")
    if reset is not None and reset <= initial:
        raise InvalidValueError(
            f"reset_value ({reset}) must be greater than initial_value ({initial}): "
            "a looping sequence gives initial_value .. reset_value - 1"
        )
    if maximum is not None and maximum < initial:
        raise InvalidValueError(f"max_value ({maximum}) must be at least initial_value ({initial})")
    if reset is not None and maximum is not None:
        raise InvalidValueError(
            "give reset_value (the sequence loops) or max_value (it stops), not both"
        )
    return initial, reset, maximum


def check_reference(reference: Any) -> Any:
    """Return ``reference`` if it is JSON-serialisable and small, else raise."""
    if reference is None:
        return None
    try:
        encoded = json.dumps(reference, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"reference must be JSON-serialisable: {exc}") from None
    size = len(encoded.encode())
    if size > MAX_REFERENCE_BYTES:
        raise PayloadTooLargeError(
            f"reference is {size} bytes as JSON; the limit is {MAX_REFERENCE_BYTES}"
        )
    return reference


def check_isolation_level(level: object) -> str:
    """Return the canonical spelling of a supported isolation level, else raise.

    Accepts any case and ``_`` or ``-`` for spaces: ``"repeatable_read"`` gives
    ``"REPEATABLE READ"``. READ UNCOMMITTED is refused: it lets a transaction read a
    counter another one has not committed, which is exactly how gaps and duplicates start.
    """
    if not isinstance(level, str):
        raise InvalidValueError(f"isolation level must be a string, not {type(level).__name__}")
    canonical = " ".join(level.replace("_", " ").replace("-", " ").upper().split())
    if canonical == "READ UNCOMMITTED":
        raise InvalidValueError(
            "isolation level READ UNCOMMITTED is refused: it can read uncommitted "
            "counters and so give gaps or duplicates; use READ COMMITTED, "
            "REPEATABLE READ or SERIALIZABLE"
        )
    if canonical not in ISOLATION_LEVELS:
        raise InvalidValueError(
            f"unknown isolation level {level!r}; use one of {', '.join(ISOLATION_LEVELS)}"
        )
    return canonical


def check_seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float number of seconds if it is finite and positive."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{what} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidValueError(f"{what} must be a finite number of seconds, got {value}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidValueError(f"{what} must be positive, got {value}")
    return seconds
