"""Numbering policies: display formats, periods and document dates.

A sequence may carry a **format** such as ``INV-{year}-{number:06d}``. The fields a
format may use are:

==============  ==============================================================
``{number}``    the value; any integer format spec (``{number:06d}``, ``{number:,}``)
``{year}``      the document date's year, four digits (``2026``)
``{yy}``        the year, two digits (``26``)
``{month}``     the month, two digits (``03``)
``{day}``       the day of the month, two digits (``07``)
``{period}``    the period key of a periodic sequence (``2026``, ``2026-03``, ...)
==============  ==============================================================

Nothing else: no attribute or index access, no conversions. Literal braces are written
``{{`` and ``}}``. A format is checked when the sequence is created, never at request
time.

A sequence may also reset per **period** (``year``, ``month`` or ``day``). The period of a
request comes from the *document date* it carries (an ISO date, ``2026-03-07``); a
request without one is dated today in the sequence's time zone (default UTC). Each
period has its own gapless counter, a child row named ``<sequence>/<period key>``.
"""

from __future__ import annotations

import string
from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from numbering.errors import InvalidPolicyError
from numbering.validation import PERIOD_SEPARATOR

__all__ = [
    "FIELDS",
    "DateLike",
    "MAX_FORMAT_LENGTH",
    "PERIODS",
    "check_format",
    "check_period",
    "check_timezone",
    "date_fields",
    "document_date",
    "format_warning",
    "period_key",
    "period_name",
    "render",
]

#: A document date as every entry point takes it: a date, an ISO string (``YYYY-MM-DD``),
#: or None for today in the sequence's time zone.
DateLike = date | str | None

PERIODS = ("year", "month", "day")
FIELDS = frozenset({"number", "year", "yy", "month", "day", "period"})
MAX_FORMAT_LENGTH = 200
MAX_FORMATTED_LENGTH = 255


def check_format(text: str | None) -> str | None:
    """``text`` if it is a valid format (or None); raise InvalidPolicyError otherwise."""
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise InvalidPolicyError("a format must be a non-empty string")
    if len(text) > MAX_FORMAT_LENGTH:
        raise InvalidPolicyError(f"a format is at most {MAX_FORMAT_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidPolicyError("a format must not contain control characters")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise InvalidPolicyError(f"invalid format {text!r}: {exc}") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS:
            raise InvalidPolicyError(
                f"invalid format {text!r}: unknown field {{{field}}}; use "
                + ", ".join(f"{{{f}}}" for f in sorted(FIELDS))
            )
        if conversion is not None or (spec and "{" in spec):
            raise InvalidPolicyError(f"invalid format {text!r}: no conversions or nested fields")
        if spec and field != "number":
            raise InvalidPolicyError(
                f"invalid format {text!r}: only {{number}} takes a format spec"
            )
        fields.append(field)
    if "number" not in fields:
        raise InvalidPolicyError(f"invalid format {text!r}: it must contain {{number}}")
    try:
        sample = render(text, 2**63 - 1, date(2026, 12, 31), "2026-12-31")
    except (ValueError, TypeError) as exc:
        raise InvalidPolicyError(f"invalid format {text!r}: {exc}") from None
    if len(sample) > MAX_FORMATTED_LENGTH:
        raise InvalidPolicyError(
            f"invalid format {text!r}: a number can render longer than "
            f"{MAX_FORMATTED_LENGTH} characters"
        )
    return text


def date_fields(text: str | None) -> set[str]:
    """The date fields (``{year}``, ``{month}``, ...) a valid format uses."""
    if text is None:
        return set()
    used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    return used & (FIELDS - {"number"})


def format_warning(text: str | None, period: str | None) -> str | None:
    """What is probably wrong with a sequence that labels its numbers with a date but
    never restarts them (None when nothing is): ``INV-{year}-{number}`` without a period
    gives INV-2026-41 then INV-2027-42 after New Year."""
    used = date_fields(text) - {"period"}
    if period is not None or not used:
        return None
    finest = next(kind for kind in ("day", "month", "year") if kind in used or (
        kind == "year" and "yy" in used))  # fmt: skip
    return (
        f"the format uses {', '.join('{' + f + '}' for f in sorted(used))} but the sequence "
        f"has no period: the label's date changes while the numbers never start again; "
        f"give --period {finest} if each {finest} should start at the initial value"
    )


def render(text: str, value: int, day: date, period: str | None) -> str:
    """``value`` displayed in format ``text`` for a document dated ``day``."""
    return text.format(
        number=value,
        year=f"{day.year:04d}",
        yy=f"{day.year % 100:02d}",
        month=f"{day.month:02d}",
        day=f"{day.day:02d}",
        period=period or "",
    )


def check_period(period: str | None) -> str | None:
    if period is not None and period not in PERIODS:
        raise InvalidPolicyError(
            f"unknown period {period!r}: use one of {', '.join(PERIODS)} (or none)"
        )
    return period


def check_timezone(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidPolicyError(f"unknown time zone {name!r} (use an IANA name)") from None
    return name


def document_date(value: DateLike, timezone: str | None, *, now: datetime | None = None) -> date:
    """The request's document date; today in ``timezone`` (default UTC) when absent
    (``now``, an aware datetime, stands in for the clock)."""
    if value is None:
        zone = ZoneInfo(timezone or "UTC")
        return (datetime.now(zone) if now is None else now.astimezone(zone)).date()
    if isinstance(value, datetime):
        raise InvalidPolicyError("a document date is a date (2026-03-07), not a datetime")
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or len(value) != 10:
        raise InvalidPolicyError(f"invalid document date {value!r}: use YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidPolicyError(f"invalid document date {value!r}: use YYYY-MM-DD") from None


def period_key(period: str, day: date) -> str:
    if period == "year":
        return f"{day.year:04d}"
    if period == "month":
        return f"{day.year:04d}-{day.month:02d}"
    return day.isoformat()


def check_period_key(period: str, key: str) -> str:
    """``key`` if it names a period of kind ``period`` (``2026``, ``2026-03``, ...)."""
    samples = {"year": "YYYY", "month": "YYYY-MM", "day": "YYYY-MM-DD"}
    padded = {"year": "-01-01", "month": "-01", "day": ""}[period]
    try:
        day = date.fromisoformat(key + padded)
    except ValueError:
        raise InvalidPolicyError(f"invalid {period} {key!r}: use {samples[period]}") from None
    if period_key(period, day) != key:
        raise InvalidPolicyError(f"invalid {period} {key!r}: use {samples[period]}")
    return key


def period_name(sequence: str, key: str) -> str:
    """The name of ``sequence``'s counter for period ``key``."""
    return f"{sequence}{PERIOD_SEPARATOR}{key}"
