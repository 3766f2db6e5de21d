"""Where the CPU goes: one worker and N requester processes on one hot sequence.

``python -m benchmarks.cpu --requesters 16 --seconds 5`` starts a numbering worker over
the local Redis, runs N requester processes doing bare enqueue-and-await, and reads
every process's CPU time from ``/proc`` over the measured window. It prints numbers per
second and the CPU milliseconds each kind of process (requesters, worker, PostgreSQL,
Redis, ...) spent per number: the figures docs/benchmarks.md uses to say what limits
throughput on a small machine. Then the same for its peers on the same workload, in
turns: django-sequences (a transaction around ``get_next_value`` on PostgreSQL) and a
stock Celery no-op round trip (``--systems``, ``--rounds``). The sequence's ledger is
audited at the end. Linux only.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks import systems
from benchmarks.run import CELERY_NOOP_WORKER, prepare_database, process, worker
from benchmarks.systems import Env, Op
from numbering import Allocator, Client

SEQUENCE = "cpu"
# What can be measured: numbering, and its peers on the same bare workload.
SYSTEMS = ("numbering", "django-sequences", "celery-noop")


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


# How the workers this script starts show in /proc/<pid>/cmdline.
_WORKER_CMDLINE = b"numbering\0worker\0"
_CELERY_CMDLINE = b"benchmarks.noop\0worker\0"


def _processes() -> dict[int, str]:
    """Every process, named by its command (``numbering worker`` for ours)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name = Path(f"/proc/{entry}/comm").read_text().strip()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if _WORKER_CMDLINE in cmdline:
                    name = "numbering worker"
                elif _CELERY_CMDLINE in cmdline:
                    name = "celery worker"
            except OSError:
                continue
            found[int(entry)] = name
    return found


def _requester(
    make_op: Callable[[], Op], begin: float, end: float, stop_at: float, out: Any
) -> None:
    op = make_op()
    done = i = 0
    while time.time() < stop_at:
        op(i)
        i += 1
        if begin <= time.time() < end:
            done += 1
    out.put(done)


@dataclass
class Measured:
    system: str
    requesters: int
    numbers: int
    elapsed: float
    #: CPU clock ticks over the window, by kind of process.
    ticks: dict[str, int]

    def report(self) -> str:
        hz = os.sysconf("SC_CLK_TCK")
        cores = os.cpu_count() or 1
        busy = sum(self.ticks.values()) / hz / self.elapsed / cores
        lines = [
            f"{self.system}: {self.requesters} requesters: "
            f"{self.numbers / self.elapsed:,.0f} numbers/s; CPU {busy:.0%} busy on {cores} cores",
            "CPU ms per number, by process:",
        ]
        for kind, ticks in sorted(self.ticks.items(), key=lambda item: -item[1]):
            if ticks and self.numbers:
                lines.append(f"  {kind:20} {ticks / hz / self.numbers * 1000:7.3f}")
        if self.numbers:
            total = sum(self.ticks.values()) / hz / self.numbers * 1000
            lines.append(f"  {'all':20} {total:7.3f}")
        return "\n".join(lines)


def measure_cpu(
    system: str, make_op: Callable[[], Op], requesters: int, warmup: float, seconds: float
) -> Measured:
    """Run ``requesters`` processes doing ``make_op()``'s op in a loop; the numbers they
    got in a window of ``seconds`` after ``warmup``, and every process's CPU meanwhile."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    begin = time.time() + warmup
    end = begin + seconds
    procs = [
        ctx.Process(target=_requester, args=(make_op, begin, end, end + 1, out))
        for _ in range(requesters)
    ]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, begin - time.time()))
    before = {pid: _ticks(pid) for pid in _processes()}
    started = time.time()
    time.sleep(max(0.0, end - time.time()))
    after = {pid: _ticks(pid) for pid in _processes()}
    elapsed = time.time() - started
    names = _processes()
    numbers = sum(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(60)
    pids = {proc.pid for proc in procs}
    own = os.getpid()
    ticks: dict[str, int] = defaultdict(int)
    for pid, count in after.items():
        if pid != own:
            ticks["requesters" if pid in pids else names.get(pid, "?")] += count - before.get(
                pid, 0
            )
    return Measured(system, requesters, numbers, elapsed, dict(ticks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--database", default="numbering_bench_cpu")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--requesters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="what to measure, in turns (one sequence only: numbering with --sequences)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measurements of each system, taking turns"
    )
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
        help="reply lists in another database of the broker's Redis server",
    )
    args = parser.parse_args(argv)
    many = args.sequences > 1
    wanted = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if many:
        wanted = ["numbering"]

    url = prepare_database(args.admin_url, args.database)
    for db in (10, 11, 12, 13):  # the Redis databases make bench uses
        redis.Redis.from_url(f"{args.redis}/{db}").flushdb()
    replies = f"{args.redis}/{10 if args.replies_with_broker else 11}"
    env = Env(url, f"{args.redis}/10", replies, "", f"{args.redis}/12", f"{args.redis}/13")
    allocator = Allocator(url)
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
    if "django-sequences" in wanted:
        systems.setup_django(url)

    def numbering_op() -> Op:
        client = Client(env.redis_broker, env.redis_replies, shards=shards, timeout=60)
        tag = os.getpid()

        def op(i: int) -> Any:
            name = sequences[(tag + i) % len(sequences)]
            return client.next_value(name, key=f"cpu:{tag}:{i}")

        return op

    def servers(system: str, stack: contextlib.ExitStack) -> Callable[[], Op]:
        """Start what ``system`` needs; its requesters' op factory."""
        if system == "numbering":
            for p, layout in enumerate(layouts):
                extra = {"NUMBERING_SHARDS": str(args.shards)} if many else {}
                stack.enter_context(
                    worker(env, env.redis_broker, layout, logs / f"worker-cpu{p}.log", **extra)
                )
            return numbering_op
        if system == "django-sequences":
            return lambda: systems.django_sequences_op("cpu-django", False)
        celery_env = {
            **os.environ,
            "BENCH_CELERY_BROKER": env.celery_broker,
            "BENCH_CELERY_BACKEND": env.celery_backend,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        stack.enter_context(
            process(CELERY_NOOP_WORKER, celery_env, logs / "celery-noop.log", "ready.")
        )
        return lambda: systems.celery_noop_op(env)

    measured: dict[str, list[Measured]] = defaultdict(list)
    for _ in range(args.rounds):
        for system in wanted:
            with contextlib.ExitStack() as stack:
                make_op = servers(system, stack)
                found = measure_cpu(system, make_op, args.requesters, 2.0, args.seconds)
            measured[system].append(found)
            print(found.report(), flush=True)
    if args.rounds > 1:
        print("numbers/s, each round:")
        for system, runs in measured.items():
            rates = " / ".join(f"{m.numbers / m.elapsed:,.0f}" for m in runs)
            print(f"  {system:20} {rates}")
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
