"""Every input rule, with no database: bad input is refused before anything is written."""

from __future__ import annotations

import math

import pytest

from numbering import InvalidRequestError, Request
from numbering.errors import (
    InvalidCountError,
    InvalidKeyError,
    InvalidSequenceNameError,
    InvalidValueError,
    PayloadTooLargeError,
)
from numbering.validation import (
    MAX_COUNT,
    MAX_INT64,
    check_count,
    check_int64,
    check_isolation_level,
    check_key,
    check_reference,
    check_seconds,
    check_sequence_bounds,
    check_sequence_name,
)


@pytest.mark.parametrize(
    "name",
    [
        "invoices",
        "INV-2026",
        "tenant.42:invoices",
        "a",
        "9" * 100,
        # Any text django-sequences takes: numbering's statements bind names as values.
        "Factures clients 2026",
        "commande-n\u00b07",
        "\u8acb\u6c42\u66f8",
        "invoices; DROP TABLE numbering_ledger",
        "a'--",
        "-leading-dash",
        "\u00e9" * 100,
    ],
)
def test_valid_sequence_names(name: str) -> None:
    assert check_sequence_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 101, "101 characters long"),
        ("x" * 50 + "\u00e9" * 51, "101 characters long"),
        (" leading", "leading or trailing whitespace"),
        ("trailing ", "leading or trailing whitespace"),
        ("tab\there", "control, line-break or invisible"),
        ("new\nline", "control, line-break or invisible"),
        ("invoices\u200b", "control, line-break or invisible"),  # zero-width space
        ("line\u2028separator", "control, line-break or invisible"),
        ("invoices/2026", "'/' is kept for period counters"),
        (None, "must be a string"),
        (42, "must be a string"),
    ],
)
def test_invalid_sequence_names(name: object, message: str) -> None:
    with pytest.raises(InvalidSequenceNameError, match=message) as info:
        check_sequence_name(name)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "must not be empty"),
        ("k" * 201, "201 characters long"),
        (" padded", "whitespace"),
        ("padded ", "whitespace"),
        ("nul\x00byte", "control characters"),
        ("bell\x07", "control characters"),
        (None, "must be a string"),
        (7, "must be a string"),
        (b"bytes", "must be a string"),
    ],
)
def test_invalid_keys(key: object, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message):
        check_key(key)


def test_valid_keys() -> None:
    for key in ("invoice:42", "k" * 200, "commande-n°7", "a b"):
        assert check_key(key) == key


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (0, "at least 1"),
        (-1, "at least 1"),
        (MAX_COUNT + 1, "at most"),
        (True, "must be an integer"),
        (1.0, "must be an integer"),
        ("3", "must be an integer"),
        (None, "must be an integer"),
    ],
)
def test_invalid_counts(count: object, message: str) -> None:
    with pytest.raises(InvalidCountError, match=message):
        check_count(count)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "at least 0"),
        (MAX_INT64 + 1, "at most 2\\*\\*63-1"),
        (False, "must be an integer"),
        (2.5, "must be an integer"),
        (math.nan, "must be an integer"),
        ("10", "must be an integer"),
    ],
)
def test_invalid_int64_values(value: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        check_int64(value, "initial_value")


def test_sequence_bounds() -> None:
    assert check_sequence_bounds(0, 60, None) == (0, 60, None)
    assert check_sequence_bounds(1, None, MAX_INT64) == (1, None, MAX_INT64)
    with pytest.raises(InvalidValueError, match=r"reset_value .* greater than initial_value"):
        check_sequence_bounds(10, 10, None)
    with pytest.raises(InvalidValueError, match=r"max_value .* at least initial_value"):
        check_sequence_bounds(10, None, 9)
    with pytest.raises(InvalidValueError, match="not both"):
        check_sequence_bounds(1, 10, 20)


def test_reference_payloads() -> None:
    assert check_reference({"invoice": 42, "tags": ["a"]}) == {"invoice": 42, "tags": ["a"]}
    assert check_reference(None) is None
    with pytest.raises(PayloadTooLargeError, match="limit is 4096"):
        check_reference({"blob": "x" * 5000})
    with pytest.raises(InvalidRequestError, match="JSON-serialisable"):
        check_reference({"when": object()})
    with pytest.raises(InvalidRequestError, match="JSON-serialisable"):
        check_reference({"amount": math.inf})


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("read committed", "READ COMMITTED"),
        ("REPEATABLE_READ", "REPEATABLE READ"),
        ("repeatable-read", "REPEATABLE READ"),
        (" Serializable ", "SERIALIZABLE"),
    ],
)
def test_isolation_level_spellings(given: str, canonical: str) -> None:
    assert check_isolation_level(given) == canonical


def test_read_uncommitted_and_unknown_levels_are_refused() -> None:
    with pytest.raises(InvalidValueError, match="READ UNCOMMITTED is refused"):
        check_isolation_level("read uncommitted")
    with pytest.raises(InvalidValueError, match="unknown isolation level 'SNAPSHOT'"):
        check_isolation_level("SNAPSHOT")
    with pytest.raises(InvalidValueError, match="must be a string"):
        check_isolation_level(3)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1, 0, True, "5"])
def test_seconds_must_be_finite_and_positive(bad: object) -> None:
    with pytest.raises(InvalidValueError):
        check_seconds(bad, "timeout")


def test_request_validates_on_construction() -> None:
    assert Request("k", 3).count == 3
    with pytest.raises(InvalidKeyError):
        Request("")
    with pytest.raises(InvalidCountError):
        Request("k", 0)
    with pytest.raises(PayloadTooLargeError):
        Request("k", reference="x" * 5000)
