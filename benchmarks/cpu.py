"""Where the CPU goes: one worker and N requester processes on one hot sequence.

``python -m benchmarks.cpu --requesters 16 --seconds 5`` starts a numbering worker over
the local Redis, runs N requester processes doing bare enqueue-and-await, and reads
every process's CPU time from ``/proc`` over the measured window. It prints numbers per
second and the CPU milliseconds each kind of process (requesters, worker, PostgreSQL,
Redis, ...) spent per number: the figures docs/benchmarks.md uses to say what limits
throughput on a small machine. The sequence's ledger is audited at the end. Linux only.

``--sequences 100 --shards 8`` measures the many-sequences layout of ``benchmarks.run``
instead: requests spread over 100 sequences, 8 shard queues served by one worker process
(``--workers 2`` deals them out over two; every sequence's ledger is audited).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import redis

from benchmarks.run import prepare_database, worker
from benchmarks.systems import Env
from numbering import Allocator, Client

SEQUENCE = "cpu"


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


# How the workers this script starts show in /proc/<pid>/cmdline.
_WORKER_CMDLINE = b"numbering\0worker\0"


def _processes() -> dict[int, str]:
    """Every process, named by its command (``numbering worker`` for ours)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name = Path(f"/proc/{entry}/comm").read_text().strip()
                if _WORKER_CMDLINE in Path(f"/proc/{entry}/cmdline").read_bytes():
                    name = "numbering worker"
            except OSError:
                continue
            found[int(entry)] = name
    return found


def _requester(
    broker: str, replies: str, stop_at: float, names: list[str], shards: int | None
) -> None:
    client = Client(broker, replies, shards=shards, timeout=60)
    i = 0
    tag = os.getpid()
    while time.time() < stop_at:
        name = names[(tag + i) % len(names)]
        client.next_value(name, key=f"cpu:{tag}:{i}")
        i += 1


def _numbered(allocator: Allocator, names: list[str]) -> int:
    return sum(allocator.last_value(name) or 0 for name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--database", default="numbering_bench_cpu")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--requesters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--sequences", type=int, default=1, help="spread requests over this many sequences"
    )
    parser.add_argument("--shards", type=int, default=8, help="shard queues (with --sequences)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the shards (--sequences)"
    )
    parser.add_argument(
        "--replies-apart",
        dest="replies_with_broker",
        action="store_false",
        help="reply lists in another Redis database than the broker's (one more round trip)",
    )
    args = parser.parse_args(argv)

    url = prepare_database(args.admin_url, args.database)
    for db in (10, 11):  # the broker and reply databases make bench uses
        redis.Redis.from_url(f"{args.redis}/{db}").flushdb()
    replies = f"{args.redis}/{10 if args.replies_with_broker else 11}"
    env = Env(url, f"{args.redis}/10", replies, "", "", "")
    allocator = Allocator(url)
    many = args.sequences > 1
    sequences = [f"{SEQUENCE}-{i:03d}" for i in range(args.sequences)] if many else [SEQUENCE]
    for name in sequences:
        allocator.create_sequence(name)
    shards = args.shards if many else None
    layouts = [["--sequence", SEQUENCE]]
    if many:
        processes = max(1, min(args.workers, args.shards))
        layouts = [
            [
                arg
                for i in range(p, args.shards, processes)
                for arg in ("--shard", f"{i}/{args.shards}")
            ]
            for p in range(processes)
        ]
    logs = Path(os.environ.get("BENCH_LOGS", "/tmp/numbering-bench"))
    logs.mkdir(parents=True, exist_ok=True)
    warmup = 2.0
    with contextlib.ExitStack() as workers:
        for p, layout in enumerate(layouts):
            extra = {"NUMBERING_SHARDS": str(args.shards)} if many else {}
            workers.enter_context(
                worker(env, env.redis_broker, layout, logs / f"worker-cpu{p}.log", **extra)
            )
        ctx = mp.get_context("fork")
        stop_at = time.time() + warmup + args.seconds + 2
        procs = [
            ctx.Process(
                target=_requester,
                args=(env.redis_broker, env.redis_replies, stop_at, sequences, shards),
            )
            for _ in range(args.requesters)
        ]
        for proc in procs:
            proc.start()
        time.sleep(warmup)
        before = {pid: _ticks(pid) for pid in _processes()}
        numbered = _numbered(allocator, sequences)
        started = time.time()
        time.sleep(args.seconds)
        after = {pid: _ticks(pid) for pid in _processes()}
        numbers = _numbered(allocator, sequences) - numbered
        elapsed = time.time() - started
        names = _processes()
        requesters = {proc.pid for proc in procs}
        for proc in procs:
            proc.join(60)
    own = os.getpid()
    by_kind: dict[str, int] = defaultdict(int)
    for pid, ticks in after.items():
        if pid == own:
            continue
        kind = "requesters" if pid in requesters else names.get(pid, "?")
        by_kind[kind] += ticks - before.get(pid, 0)
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(by_kind.values()) / hz / elapsed / (os.cpu_count() or 1)
    print(
        f"{args.requesters} requesters: {numbers / elapsed:,.0f} numbers/s; "
        f"CPU {busy:.0%} busy on {os.cpu_count()} cores"
    )
    print("CPU ms per number, by process:")
    for kind, ticks in sorted(by_kind.items(), key=lambda item: -item[1]):
        if ticks and numbers:
            print(f"  {kind:20} {ticks / hz / numbers * 1000:7.3f}")
    ok = print_audit(allocator, sequences)
    allocator.close()
    return 0 if ok else 1


def print_audit(allocator: Allocator, sequences: list[str]) -> bool:
    """Audit ``sequences``' ledgers and print one line; True if every one is gapless."""
    reports = [report for report in allocator.audit() if report.sequence in sequences]
    ok = len(reports) == len(sequences) and all(report.ok for report in reports)
    values = sum(report.values for report in reports)
    print(f"audit of {len(sequences)} sequence(s): {'ok' if ok else 'PROBLEMS'}, {values:,} values")
    return ok


if __name__ == "__main__":
    sys.exit(main())
