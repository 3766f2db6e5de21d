"""Where the CPU goes: one worker and N requester processes on one hot sequence.

``python -m benchmarks.cpu --requesters 16 --seconds 5`` starts a numbering worker over
the local Redis, runs N requester processes doing bare enqueue-and-await, and reads
every process's CPU time from ``/proc`` over the measured window. It prints numbers per
second and the CPU milliseconds each kind of process (requesters, worker, PostgreSQL,
Redis, ...) spent per number: the figures docs/benchmarks.md uses to say what limits
throughput on a small machine. The sequence's ledger is audited at the end. Linux only.
"""

from __future__ import annotations

import argparse
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


# How the worker this script starts shows in /proc/<pid>/cmdline.
_WORKER_CMDLINE = b"numbering\0worker\0--sequence\0" + SEQUENCE.encode() + b"\0"


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


def _requester(broker: str, replies: str, stop_at: float) -> None:
    client = Client(broker, replies, timeout=60)
    i = 0
    while time.time() < stop_at:
        client.next_value(SEQUENCE, key=f"cpu:{os.getpid()}:{i}")
        i += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--database", default="numbering_bench_cpu")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--requesters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)

    url = prepare_database(args.admin_url, args.database)
    for db in (10, 11):  # the broker and reply databases make bench uses
        redis.Redis.from_url(f"{args.redis}/{db}").flushdb()
    env = Env(url, f"{args.redis}/10", f"{args.redis}/11", "", "", "")
    allocator = Allocator(url)
    allocator.create_sequence(SEQUENCE)
    logs = Path(os.environ.get("BENCH_LOGS", "/tmp/numbering-bench"))
    logs.mkdir(parents=True, exist_ok=True)
    warmup = 2.0
    with worker(env, env.redis_broker, ["--sequence", SEQUENCE], logs / "worker-cpu.log"):
        ctx = mp.get_context("fork")
        stop_at = time.time() + warmup + args.seconds + 2
        procs = [
            ctx.Process(target=_requester, args=(env.redis_broker, env.redis_replies, stop_at))
            for _ in range(args.requesters)
        ]
        for proc in procs:
            proc.start()
        time.sleep(warmup)
        before = {pid: _ticks(pid) for pid in _processes()}
        numbered = allocator.last_value(SEQUENCE) or 0
        started = time.time()
        time.sleep(args.seconds)
        after = {pid: _ticks(pid) for pid in _processes()}
        numbers = (allocator.last_value(SEQUENCE) or 0) - numbered
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
    [report] = allocator.audit(SEQUENCE)
    print(f"audit of {SEQUENCE!r}: {'ok' if report.ok else 'PROBLEMS'}, {report.values:,} values")
    allocator.close()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
