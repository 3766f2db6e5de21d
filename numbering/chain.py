"""The hash chain of a counter's ledger, and a verifier that needs nothing but Python.

Every counter (a sequence, or one period of a periodic sequence) keeps a chain: each
record it holds (an assignment, a void, a rename, a change of bounds, and the record
that starts the chain)
carries a *fingerprint*, the SHA-256 of the previous record's fingerprint and of the
record's own content. Changing, deleting, inserting or reordering a record changes every
fingerprint after it; a chain head (the last fingerprint, printed by ``numbering chain
head`` and kept elsewhere) makes a rewrite of the whole chain detectable too.

**The encoding** (docs/tamper-evidence.md spells it out for reimplementation):

- A record is a JSON object. ``kind`` is ``start``, ``assign``, ``void``, ``rename`` or
  ``bounds``;
  ``link`` is its position in the chain, 1, 2, 3, ...; the other fields are listed in
  :data:`FIELDS`, all present (``null`` where there is nothing).
- Its canonical text is that object as JSON with the keys sorted by code point, no
  whitespace, strings with only ``"``, ``\\`` and the control characters U+0000-U+001F
  escaped (``\\b \\f \\n \\r \\t``, the others as ``\\u00XX`` in lowercase hex), other
  characters as they are; integers in decimal, exactly; a number with a fraction in its
  shortest round-trip form as ECMAScript prints it (RFC 8785: ``0.1``, ``1.5e-7``), one
  without in full (``1e21`` is ``1000000000000000000000``); times as
  ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC.
- ``fingerprint = sha256(previous + "\\n" + canonical text)``, in lowercase hex, over the
  UTF-8 bytes; ``previous`` is the previous record's fingerprint, 64 zeros for link 1.

This file is the verifier an auditor runs (``numbering chain verifier`` writes it out):
``python verify_chain.py chain.jsonl [--heads heads.jsonl]`` checks an export written by
``numbering export NAME --format chain``. It imports nothing outside the standard library.
"""

from __future__ import annotations

import argparse
import decimal
import hashlib
import heapq
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "FIELDS",
    "GENESIS",
    "VERSION",
    "ChainProblem",
    "canonical",
    "fingerprint",
    "format_time",
    "main",
    "verify",
]

#: The encoding's name, in every start record.
VERSION = "numbering-chain/1"
#: What link 1 is chained to.
GENESIS = "0" * 64

#: The fields of each kind of record (besides ``kind`` and ``link``).
FIELDS: dict[str, tuple[str, ...]] = {
    # The chain's first record: the counter it belongs to and where it began. A chain
    # started on a ledger that already held assignments (a back-fill) says how many
    # (``earlier``) and where the counter stood (``cycle``, ``last_value``); those
    # assignments follow in the chain, each as an assign record.
    "start": ("chain", "counter", "at", "initial_value", "earlier", "cycle", "last_value"),
    # An assignment (a ledger row) as it was when it entered the chain.
    "assign": (
        "cycle",
        "value",
        "count",
        "request_key",
        "reference",
        "formatted",
        "at",
        "status",
        "void_reason",
        "voided_at",
    ),
    # An assignment voided after it entered the chain: when and why.
    "void": ("request_key", "cycle", "value", "at", "reason"),
    # The counter renamed (a sequence set aside so that its name starts afresh).
    "rename": ("counter", "at"),
    # The counter's bounds changed before it ever looped (a django-sequences caller's
    # first looping call): its values run from this initial_value, up to reset_value.
    "bounds": ("initial_value", "reset_value", "at"),
}


class ChainProblem(ValueError):
    """A record that cannot be encoded (a number JSON cannot hold, a bad time)."""


# -- the encoding -----------------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """``moment`` as the encoding writes times: UTC, microseconds, ``Z``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: A string as the encoding writes it: json's own (C) string encoder, which escapes
#: exactly ", \ and U+0000-U+001F and keeps every other character.
_escape = json.encoder.encode_basestring


def _number(number: float) -> str:
    """A float in its shortest round-trip decimal form: an integral one in full, with no
    exponent (as a database's JSON column hands it back), another as ECMAScript's
    Number::toString prints it (RFC 8785, section 3.2.2.3)."""
    if math.isnan(number) or math.isinf(number):
        raise ChainProblem(f"{number!r} cannot be written in JSON")
    if number == 0:
        return "0"
    sign = "-" if number < 0 else ""
    digits_tuple, exponent = decimal.Decimal(repr(abs(number))).as_tuple()[1:]
    assert isinstance(exponent, int)
    every = "".join(map(str, digits_tuple))
    digits = every.rstrip("0") or "0"
    point = exponent + len(every)  # the value is 0.<digits> x 10^point
    k = len(digits)
    if k <= point:  # integral
        return sign + digits + "0" * (point - k)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    power = point - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def canonical(value: Any) -> str:
    """``value`` (what JSON holds: dict, list, str, int, float, bool, None) as canonical
    JSON text (see the module doc)."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is dict:
        items = sorted((str(key), item) for key, item in value.items())
        return "{" + ",".join([_escape(key) + ":" + canonical(item) for key, item in items]) + "}"
    if kind is float:
        return _number(value)
    if kind is list or kind is tuple:
        return "[" + ",".join([canonical(item) for item in value]) + "]"
    # Subclasses (an IntEnum, an OrderedDict) as their JSON kind.
    bases: tuple[Any, ...] = (int, float, str, dict, list, tuple)
    for base in bases:
        if isinstance(value, base):
            return canonical(base(value))
    raise ChainProblem(f"{type(value).__name__} cannot be written in JSON")


def fingerprint(previous: str, record: dict[str, Any]) -> str:
    """The fingerprint of ``record`` chained after ``previous``."""
    text = previous + "\n" + canonical(record)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record(kind: str, link: int, **fields: Any) -> dict[str, Any]:
    """A record of ``kind`` at ``link``: every field of :data:`FIELDS`, times encoded."""
    names = FIELDS[kind]
    unknown = set(fields) - set(names)
    if unknown:
        raise ChainProblem(f"a {kind} record has no field(s) {sorted(unknown)}")
    found: dict[str, Any] = {"kind": kind, "link": link}
    for name in names:
        value = fields.get(name)
        found[name] = format_time(value) if isinstance(value, datetime) else value
    return found


# -- verification -----------------------------------------------------------------------


@dataclass
class ChainReport:
    """What the verifier found in one counter's chain."""

    counter: str
    links: int = 0
    head: str = GENESIS
    assignments: int = 0
    voids: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Walk:
    """One chain being verified, record by record."""

    report: ChainReport
    initial_value: int | None = None
    # Blocks by cycle, to check the values once the chain is read: a heap of (first, count).
    blocks: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    keys: dict[str, tuple[int, int, int, str | None, str | None]] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.report.problems.append(text)


def _describe(line: int, entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "assign":
        return (
            f"line {line}: link {entry.get('link')}, assignment of {entry.get('value')} "
            f"(cycle {entry.get('cycle')}, key {entry.get('request_key')!r})"
        )
    return f"line {line}: link {entry.get('link')}, {kind} record"


def verify(entries: Iterable[tuple[int, dict[str, Any]]]) -> list[ChainReport]:
    """Verify the chains of an export: ``entries`` are (line number, exported record with
    its ``fingerprint``), chain after chain, each in link order from its start record.
    One report per chain."""
    reports: list[ChainReport] = []
    walk: _Walk | None = None
    for line, entry in entries:
        entry = dict(entry)
        stated = entry.pop("fingerprint", None)
        kind = entry.get("kind")
        link = entry.get("link")
        if kind == "start" and link == 1:
            if walk is not None:
                _finish(walk)
            walk = _Walk(ChainReport(str(entry.get("counter"))))
            reports.append(walk.report)
            if entry.get("chain") != VERSION:
                walk.problem(f"line {line}: chain encoding {entry.get('chain')!r} is not {VERSION}")
            walk.initial_value = entry.get("initial_value")
        elif walk is None:
            walk = _Walk(ChainReport("(no start record)"))
            reports.append(walk.report)
            walk.problem(f"{_describe(line, entry)}: the chain has no start record before it")
        report = walk.report
        where = _describe(line, entry)
        if kind not in FIELDS:
            walk.problem(f"{where}: unknown kind of record {kind!r}")
            continue
        if set(entry) != {"kind", "link", *FIELDS[kind]}:
            walk.problem(f"{where}: fields are not those of a {kind} record")
        if link != report.links + 1:
            walk.problem(
                f"{where}: link {link} follows link {report.links} "
                "(a record was deleted, inserted or moved)"
            )
        try:
            computed = fingerprint(report.head, entry)
        except ChainProblem as exc:
            walk.problem(f"{where}: {exc}")
            computed = ""
        if stated != computed:
            walk.problem(
                f"{where}: fingerprint does not match its content and the record before it "
                "(changed, inserted, deleted or moved)"
            )
        report.links = link if isinstance(link, int) else report.links + 1
        report.head = stated if isinstance(stated, str) else computed
        if kind == "assign":
            _assignment(walk, where, entry)
        elif kind == "void":
            _void(walk, where, entry)
        elif kind == "rename":
            report.counter = str(entry.get("counter"))
        elif kind == "bounds":
            walk.initial_value = entry.get("initial_value")
    if walk is not None:
        _finish(walk)
    return reports


def _assignment(walk: _Walk, where: str, entry: dict[str, Any]) -> None:
    walk.report.assignments += 1
    key = entry.get("request_key")
    cycle, value, count = entry.get("cycle"), entry.get("value"), entry.get("count")
    if (
        not isinstance(cycle, int)
        or not isinstance(value, int)
        or not isinstance(count, int)
        or not isinstance(key, str)
    ):
        walk.problem(f"{where}: cycle, value, count or request key missing")
        return
    if key in walk.keys:
        walk.problem(f"{where}: request key {key!r} was already assigned in this chain")
    walk.keys[key] = (cycle, value, count, entry.get("status"), None)
    heapq.heappush(walk.blocks.setdefault(cycle, []), (value, count))


def _void(walk: _Walk, where: str, entry: dict[str, Any]) -> None:
    walk.report.voids += 1
    key = entry.get("request_key")
    known = walk.keys.get(key) if isinstance(key, str) else None
    if known is None or not isinstance(key, str):
        walk.problem(f"{where}: voids key {key!r}, which this chain never assigned")
        return
    cycle, value, count, status, voided = known
    if (entry.get("cycle"), entry.get("value")) != (cycle, value):
        walk.problem(f"{where}: voids {key!r} as value {entry.get('value')}, assigned {value}")
    if status != "assigned" or voided is not None:
        walk.problem(f"{where}: {key!r} was voided already")
    walk.keys[key] = (cycle, value, count, status, entry.get("at"))


def _finish(walk: _Walk) -> None:
    """The values of each cycle: initial_value .. the last, each exactly once."""
    start = walk.initial_value
    if not isinstance(start, int):
        return
    for cycle in sorted(walk.blocks):
        heap = walk.blocks[cycle]
        expected = start
        while heap:
            value, count = heapq.heappop(heap)
            if value > expected:
                walk.problem(f"cycle {cycle}: values {expected}..{value - 1} are missing")
            elif value < expected:
                walk.problem(f"cycle {cycle}: value {value} is assigned twice")
            expected = max(expected, value + count)
        walk.blocks[cycle] = []


def read_export(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of a chain export (JSON Lines), with their line numbers."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{path}, line {number}: not JSON ({exc})") from None
            if not isinstance(entry, dict):
                raise SystemExit(f"{path}, line {number}: not a JSON object")
            yield number, entry


def _heads(path: str) -> list[dict[str, Any]]:
    found = []
    for number, entry in read_export(path):
        if not all(isinstance(entry.get(k), t) for k, t in (("counter", str), ("link", int))):
            raise SystemExit(f"{path}, line {number}: a head needs counter, link and fingerprint")
        found.append(entry)
    return found


def main(argv: list[str] | None = None) -> int:
    """``python verify_chain.py EXPORT [--heads HEADS]``: 0 when every chain verifies."""
    parser = argparse.ArgumentParser(
        prog="verify_chain.py",
        description="Verify the hash chains of a numbering ledger export "
        "(numbering export NAME --format chain) with nothing but Python.",
    )
    parser.add_argument("export", help="the chain export, JSON Lines")
    parser.add_argument(
        "--heads",
        help="chain heads kept elsewhere (numbering chain head --format json): each must be "
        "a record of the export, so that nothing up to it was rewritten",
    )
    args = parser.parse_args(argv)
    fingerprints: dict[tuple[str, int], str] = {}

    def remembered() -> Iterator[tuple[int, dict[str, Any]]]:
        counter = ""
        for number, entry in read_export(args.export):
            if entry.get("kind") in ("start", "rename"):
                counter = str(entry.get("counter"))
            fingerprints[(counter, entry.get("link", -1))] = str(entry.get("fingerprint"))
            yield number, entry

    reports = verify(remembered())
    bad = 0
    for report in reports:
        state = "ok" if report.ok else "PROBLEM"
        print(
            f"{report.counter}: {state}: {report.links} record(s), {report.assignments} "
            f"assignment(s), {report.voids} void(s); head {report.head}"
        )
        for problem in report.problems:
            print(f"  - {problem}")
        bad += not report.ok
    if args.heads:
        for head in _heads(args.heads):
            found = fingerprints.get((head["counter"], head["link"]))
            if found is None:
                print(f"head {head['counter']} link {head['link']}: PROBLEM: not in the export")
                bad += 1
            elif found != head.get("fingerprint"):
                print(
                    f"head {head['counter']} link {head['link']}: PROBLEM: the export's "
                    "fingerprint differs: the chain was rewritten up to there"
                )
                bad += 1
            else:
                print(f"head {head['counter']} link {head['link']}: ok")
    if not reports:
        print("no chains in the export")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
