"""What numbering's own transaction costs around the SQL it sends (``make bench-overhead``).

One number at a time, in process, against the local PostgreSQL, measured in turns:

- ``numbering``: ``Allocator.next_value`` (retrying runner, SQLAlchemy connection, the
  pipelined psycopg2 store).
- ``raw psycopg2``: the same SQL text (``numbering.backends.psycopg2``), the same two round trips,
  straight on a psycopg2 cursor: what the database and the driver cost alone.
- ``raw, prepared``: the same with server-side prepared statements (PREPARE/EXECUTE):
  what planning each statement costs.

Prints the median wall time, CPU time of this process (user + system) and CPU time of
the PostgreSQL backend serving it, per number, for each; then audits the three
sequences' ledgers (the raw loops keep them gapless too). The raw prepared statements
go through PostgreSQL's plan cache, which switches to a generic plan after five runs:
on a fresh database that plan costs the backend more than the planning it saves
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from benchmarks.cpu import print_audit
from benchmarks.run import prepare_database
from numbering import Allocator, chain, create_engine
from numbering.backends.psycopg2 import _INSERT_LEDGER, _LOCK_AND_LOOK_UP, _UPDATE_COUNTER
from numbering.chaining import assign_record

_PREPARE = [
    "PREPARE numbering_lock(text[], text[]) AS "
    + _LOCK_AND_LOOK_UP.split(";\n", 1)[1].replace("%(keys)s", "$2").replace("%(names)s", "$1"),
    "PREPARE numbering_update(bigint, bigint, timestamptz, bigint, bigint, text) AS "
    "UPDATE numbering_sequence SET last_value = $1, cycle = $2, updated_at = $3, "
    "chain_link = $5, chain_head = $6 WHERE id = $4",
    "PREPARE numbering_insert(timestamptz, bigint[], bigint[], bigint[], bigint[], text[], "
    "jsonb[], text[], text[], bigint[], text[]) AS "
    + _INSERT_LEDGER.replace("%(now)s", "$1").split("FROM unnest(")[0]
    + "FROM unnest($2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
    "AS r(sequence_id, cycle, value, count, request_key, reference, status, formatted, link, "
    "fingerprint)",
]


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of PostgreSQL backend ``pid`` so far (Linux /proc);
    NaN where the server is not on this machine."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawNumbers:
    """Numbers of one sequence assigned with numbering's SQL on a bare psycopg2 connection
    (a fresh sequence, no cycles or periods: value = last + 1)."""

    def __init__(self, url: str, sequence: str, *, prepared: bool) -> None:
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True  # BEGIN and COMMIT are sent as SQL, as numbering does
        self.cursor = self.connection.cursor()
        self.sequence = sequence
        self.prepared = prepared
        self.issued = 0
        if prepared:
            for statement in _PREPARE:
                self.cursor.execute(statement)
        self.cursor.execute("SELECT pg_backend_pid()")
        self.pid = int(self.cursor.fetchone()[0])

    def next_value(self) -> int:
        self.issued += 1
        key = f"{self.sequence}:{self.issued}"
        params: dict[str, Any] = {"names": [self.sequence], "keys": [key]}
        if self.prepared:
            lock = _LOCK_AND_LOOK_UP.format(nowait="").split(";\n", 1)[0]
            self.cursor.execute(
                f"BEGIN; {lock}; EXECUTE numbering_lock(%(names)s, %(keys)s)", params
            )
        else:
            self.cursor.execute("BEGIN; " + _LOCK_AND_LOOK_UP.format(nowait=""), params)
        names = [column.name for column in self.cursor.description]
        row = dict(zip(names, self.cursor.fetchone(), strict=True))
        if row["numbering_priors"]:
            raise RuntimeError(f"key {key!r} is already in the ledger")
        value = row["initial_value"] if row["last_value"] is None else row["last_value"] + 1
        now = dt.datetime.now(dt.timezone.utc)
        # Chained as numbering chains it (the sequence's chain started when it was made).
        link = row["chain_link"] + 1
        written = {
            "cycle": row["cycle"], "value": value, "count": 1, "request_key": key,
            "reference": None, "formatted": None, "assigned_at": now, "status": "assigned",
        }  # fmt: skip
        fingerprint = chain.fingerprint(row["chain_head"], assign_record(written, link))
        params = {
            "now": now,
            "counter_id": row["id"],
            "counter_last": value,
            "counter_cycle": row["cycle"],
            "counter_link": link,
            "counter_head": fingerprint,
            "sequence_id": [row["id"]],
            "cycle": [row["cycle"]],
            "value": [value],
            "count": [1],
            "request_key": [key],
            "reference": [None],
            "status": ["assigned"],
            "formatted": [None],
            "link": [link],
            "fingerprint": [fingerprint],
        }
        if self.prepared:
            writes = (
                "EXECUTE numbering_update(%(counter_last)s, %(counter_cycle)s, %(now)s, "
                "%(counter_id)s, %(counter_link)s, %(counter_head)s); "
                "EXECUTE numbering_insert(%(now)s, %(sequence_id)s::bigint[], %(cycle)s::bigint[], "
                "%(value)s::bigint[], %(count)s::bigint[], %(request_key)s::text[], "
                "%(reference)s::jsonb[], %(status)s::text[], %(formatted)s::text[], "
                "%(link)s::bigint[], %(fingerprint)s::text[]); COMMIT"
            )
        else:
            writes = _UPDATE_COUNTER + "\n" + _INSERT_LEDGER + ";\nCOMMIT"
        self.cursor.execute(writes, params)
        return int(value)

    def close(self) -> None:
        self.connection.close()


def _measure(take: Callable[[], int], numbers: int, backend: int) -> tuple[float, float, float]:
    """(wall ms, CPU ms here, CPU ms of PostgreSQL backend ``backend``) per number over
    ``numbers`` calls of ``take``."""
    wall, cpu, server = time.perf_counter(), time.process_time(), backend_cpu(backend)
    for _ in range(numbers):
        take()
    return (
        (time.perf_counter() - wall) / numbers * 1000,
        (time.process_time() - cpu) / numbers * 1000,
        (backend_cpu(backend) - server) / numbers * 1000,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--database", default="numbering_bench_overhead")
    parser.add_argument("--numbers", type=int, default=500, help="numbers per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each, in turns")
    args = parser.parse_args(argv)

    url = prepare_database(args.admin_url, args.database)
    # One pooled connection, so that one backend serves all of numbering's numbers.
    allocator = Allocator(create_engine(url, pool_size=1, max_overflow=0))
    contenders: dict[str, tuple[Callable[[], int], int]] = {}
    raws = []
    sequences = ["overhead-numbering"]
    for name, prepared in (("raw psycopg2", False), ("raw, prepared", True)):
        sequence = "overhead-" + ("prepared" if prepared else "raw")
        sequences.append(sequence)
        allocator.create_sequence(sequence)
        raw = RawNumbers(url, sequence, prepared=prepared)
        raws.append(raw)
        contenders[name] = raw.next_value, raw.pid
    allocator.create_sequence("overhead-numbering")
    with allocator.engine.connect() as conn:
        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    contenders["numbering"] = (lambda: allocator.next_value("overhead-numbering")), pid
    order = ["numbering", "raw psycopg2", "raw, prepared"]
    for take, backend in contenders.values():  # warm the pools, the caches and the plans
        _measure(take, 50, backend)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in order}
    for turn in range(args.rounds):
        for name in order[turn % 3 :] + order[: turn % 3]:  # each goes first in turn
            take, backend = contenders[name]
            runs[name].append(_measure(take, args.numbers, backend))
    print(f"{args.rounds} rounds of {args.numbers} numbers each, in turns; medians per number:")
    for name in order:
        wall, cpu, server = (statistics.median(run[i] for run in runs[name]) for i in range(3))
        print(
            f"  {name:14} wall {wall:6.3f} ms   CPU in this process {cpu:6.3f} ms   "
            f"CPU of its PostgreSQL backend {server:6.3f} ms"
        )
    for raw in raws:
        raw.close()
    ok = print_audit(allocator, sequences)
    allocator.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
