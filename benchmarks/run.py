"""numbering against the alternatives, side by side in one run: ``make bench``.

Scenarios (issue 5): web requests on one hot sequence, bare enqueue-and-await, batch
numbering of a table, many sequences over shards, and cost per number as the ledger
grows. Requesters are separate processes (forked). Every ledger and documents table the
run touched is audited at the end: a fast wrong answer fails the run.

Writes a Markdown report with the figures and two PNG charts (``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from benchmarks import systems
from benchmarks.systems import Env, Op
from numbering import Allocator, create_engine, init_db

ROOT = Path(__file__).resolve().parents[1]
CELERY_NOOP_WORKER = [
    sys.executable, "-m", "celery", "-A", "benchmarks.noop", "worker", "-Q", "bench.noop",
    "--loglevel", "INFO", "--without-mingle", "--without-gossip",
]  # fmt: skip
WEB, BARE = "web", "bare"


@dataclass
class Point:
    scenario: str
    system: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    ops: int
    errors: int
    total_ops: int


@dataclass
class Results:
    points: list[Point] = field(default_factory=list)
    batch: list[dict[str, Any]] = field(default_factory=list)
    many: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    growth: list[dict[str, Any]] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def point(self, scenario: str, system: str, concurrency: int) -> Point | None:
        for p in self.points:
            if (p.scenario, p.system, p.concurrency) == (scenario, system, concurrency):
                return p
        return None


# -- requesters --------------------------------------------------------------------------------


def _requester(
    make_op: Callable[[], Op],
    barrier: Any,
    warmup: float,
    duration: float,
    out: Any,
) -> None:
    op = make_op()
    barrier.wait()
    t0 = time.time()
    begin, end = t0 + warmup, t0 + warmup + duration
    latencies: list[float] = []
    done = errors = total = 0
    i = 0
    while True:
        started = time.time()
        if started >= end:
            break
        try:
            op(i)
            total += 1
        except Exception as exc:  # counted and reported; a wrong number is caught by the audit
            errors += 1
            print(f"requester {os.getpid()}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finished = time.time()
        i += 1
        if begin <= finished < end:
            done += 1
            if started >= begin:
                latencies.append(finished - started)
    out.put((done, errors, total, latencies))


def measure(
    scenario: str,
    system: str,
    make_op: Callable[[], Op],
    concurrency: int,
    warmup: float,
    duration: float,
) -> Point:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(concurrency)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_requester, args=(make_op, barrier, warmup, duration, out))
        for _ in range(concurrency)
    ]
    for proc in procs:
        proc.start()
    collected = [out.get(timeout=warmup + duration + 300) for _ in procs]
    for proc in procs:
        proc.join(60)
    done = sum(c[0] for c in collected)
    errors = sum(c[1] for c in collected)
    total = sum(c[2] for c in collected)
    latencies = sorted(latency for c in collected for latency in c[3])
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if len(latencies) >= 2 else p50
    point = Point(scenario, system, concurrency, done / duration, p50, p99, done, errors, total)
    print(
        f"  {scenario:5} {system:22} x{concurrency:<3} {point.throughput:9.0f}/s  "
        f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {errors}",
        flush=True,
    )
    return point


def median_point(points: list[Point]) -> Point:
    """One point from repeated measurements: the median of each figure, counts summed."""
    first = points[0]
    point = Point(
        first.scenario,
        first.system,
        first.concurrency,
        statistics.median(p.throughput for p in points),
        statistics.median(p.p50_ms for p in points),
        statistics.median(p.p99_ms for p in points),
        sum(p.ops for p in points),
        sum(p.errors for p in points),
        sum(p.total_ops for p in points),
    )
    if len(points) > 1:
        print(
            f"  {first.scenario:5} {first.system:22} x{first.concurrency:<3} "
            f"{point.throughput:9.0f}/s  p50 {point.p50_ms:7.1f} ms  p99 {point.p99_ms:7.1f} ms"
            f"  median of {len(points)}",
            flush=True,
        )
    return point


def measure_repeated(
    scenario: str,
    candidates: list[tuple[str, Callable[[], Op]]],
    concurrency: int,
    args: argparse.Namespace,
) -> list[Point]:
    """Measure every candidate ``args.repeats`` times, taking turns; one median each."""
    runs: dict[str, list[Point]] = {system: [] for system, _ in candidates}
    for _ in range(args.repeats):
        for system, make_op in candidates:
            runs[system].append(
                measure(scenario, system, make_op, concurrency, args.warmup, args.duration)
            )
    return [median_point(points) for points in runs.values()]


# -- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path, ready: str) -> Iterator[None]:
    handle = log.open("w")
    proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(args[:4])} did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        handle.close()


def numbering_env(env: Env, broker: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBERING_")}
    base.update(
        NUMBERING_DATABASE_URL=env.database_url,
        NUMBERING_BROKER_URL=broker,
        NUMBERING_RESULT_BACKEND=env.redis_replies,
    )
    base.update(extra)
    return base


def worker(env: Env, broker: str, args: list[str], log: Path, **extra: str) -> Any:
    ready = "single-active-consumer decides" if broker.startswith("amqp") else "active consumer"
    return process(
        [sys.executable, "-m", "numbering", "worker", *args],
        numbering_env(env, broker, **extra),
        log,
        ready,
    )


# -- scenarios ---------------------------------------------------------------------------------


# Per engine (SQLAlchemy's backend name): how to make the database afresh, and the
# benchmark's own tables (the hand-written counter, and on PostgreSQL `nextval`).
_FRESH_DATABASE = {
    "postgresql": ('DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', 'CREATE DATABASE "{db}"'),
    "mysql": ("DROP DATABASE IF EXISTS `{db}`", "CREATE DATABASE `{db}` CHARACTER SET utf8mb4"),
}
_BENCH_TABLES = {
    "postgresql": (
        "CREATE TABLE bench_counter (name text PRIMARY KEY, last bigint NOT NULL)",
        "CREATE SEQUENCE bench_nextval",
    ),
    "mysql": (
        "CREATE TABLE bench_counter (name VARCHAR(100) PRIMARY KEY, last BIGINT NOT NULL) "
        "ENGINE=InnoDB",
    ),
}


def prepare_database(admin_url: str, database: str) -> str:
    """A fresh database ``database`` on the server of ``admin_url`` (PostgreSQL or
    MariaDB), with numbering's schema and the benchmark's own tables; its URL."""
    kind = make_url(admin_url).get_backend_name().replace("mariadb", "mysql")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for statement in _FRESH_DATABASE[kind]:
            conn.exec_driver_sql(statement.format(db=database))
    admin.dispose()
    url = make_url(admin_url).set(database=database).render_as_string(hide_password=False)
    engine = create_engine(url)
    init_db(engine)
    with engine.begin() as conn:
        for statement in _BENCH_TABLES[kind]:
            conn.exec_driver_sql(statement)
    engine.dispose()
    return url


#: The variant whose sequences have no hash chain.
UNCHAINED = "redis-unchained"


def create_unchained(engine: Any, name: str) -> int:
    """Create sequence ``name`` as one whose numbers predate hash chains (no chain is
    written for it: what numbering cost before chains); its id."""
    with engine.begin() as conn:
        return int(
            conn.exec_driver_sql(
                "INSERT INTO numbering_sequence (name, initial_value, cycle, created_at, "
                "updated_at, chain_link, chain_head) VALUES (%(name)s, 1, 0, now(), now(), "
                "NULL, NULL) RETURNING id",
                {"name": name},
            ).scalar_one()
        )


def web_and_bare(
    env: Env, results: Results, args: argparse.Namespace, logs: Path, allocator: Allocator
) -> None:
    engine = allocator.engine
    brokers = [("redis", env.redis_broker)]
    if "amqp" in args.brokers:
        brokers.append(("rabbitmq", env.amqp_broker))
    # Variants of the Redis worker, beside the default: two batches in flight, the reply
    # lists in another database of the broker's server, and sequences without a hash
    # chain (what the chain costs: docs/tamper-evidence.md).
    variants = [
        ("redis, 2 batches in flight", "redis-pipelined", ["--in-flight", "2"], ""),
        ("redis, no hash chain", UNCHAINED, [], ""),
    ]
    if env.redis_replies_apart:
        variants.append(
            ("redis, replies in another database", "redis-apart", [], env.redis_replies_apart)
        )
    names = [f"{s}-{b}" for s in (WEB, BARE) for b, _ in brokers]
    names += [f"{s}-{tag}" for s in (WEB, BARE) for _, tag, _, _ in variants]
    for name in names:
        if name.endswith(UNCHAINED):
            create_unchained(engine, name)
        else:
            allocator.create_sequence(name)
    with engine.begin() as conn:
        for name in ("django-web", "dropin-web", "forupdate-web", *names):
            conn.exec_driver_sql(systems.documents_table(f"docs_{name.replace('-', '_')}"))
        conn.exec_driver_sql("INSERT INTO bench_counter VALUES ('forupdate-web', 0)")
    engine.dispose()

    with contextlib.ExitStack() as stack:
        for broker_name, url in brokers:
            stack.enter_context(
                worker(
                    env,
                    url,
                    ["--sequence", f"{WEB}-{broker_name}", "--sequence", f"{BARE}-{broker_name}"],
                    logs / f"worker-{broker_name}.log",
                )
            )
        for _, tag, options, replies in variants:
            extra = {"NUMBERING_RESULT_BACKEND": replies} if replies else {}
            stack.enter_context(
                worker(
                    env,
                    env.redis_broker,
                    ["--sequence", f"{WEB}-{tag}", "--sequence", f"{BARE}-{tag}", *options],
                    logs / f"worker-{tag}.log",
                    **extra,
                )
            )
        if BARE in args.scenarios:
            celery_env = {
                **os.environ,
                "BENCH_CELERY_BROKER": env.celery_broker,
                "BENCH_CELERY_BACKEND": env.celery_backend,
                "PYTHONPATH": str(ROOT),
            }
            stack.enter_context(
                process(
                    CELERY_NOOP_WORKER,
                    celery_env,
                    logs / "celery-noop.log",
                    "ready.",
                )
            )
        for scenario in (WEB, BARE):
            if scenario not in args.scenarios:
                continue
            web = scenario == WEB
            print(f"{scenario} scenario", flush=True)
            for concurrency in args.concurrency:
                candidates: list[tuple[str, Callable[[], Op]]] = [
                    (
                        f"numbering ({b})",
                        lambda u=u, b=b, web=web, sc=scenario: systems.numbering_op(
                            env, u, f"{sc}-{b}", web, None
                        ),
                    )
                    for b, u in brokers
                ]
                candidates += [
                    (
                        f"numbering ({label})",
                        lambda tag=tag, r=replies, web=web, sc=scenario: systems.numbering_op(
                            env, env.redis_broker, f"{sc}-{tag}", web, None, r
                        ),
                    )
                    for label, tag, _, replies in variants
                ]
                candidates.append(
                    (
                        "django-sequences",
                        lambda web=web: systems.django_sequences_op(
                            "django-web" if web else "django-bare", web
                        ),
                    )
                )
                candidates.append(
                    (
                        "numbering.django drop-in",
                        lambda web=web: systems.django_sequences_op(
                            "dropin-web" if web else "dropin-bare", web, dropin=True
                        ),
                    )
                )
                if web:
                    candidates.append(
                        (
                            "SELECT FOR UPDATE",
                            lambda: systems.for_update_op(env, "forupdate-web", True),
                        )
                    )
                else:
                    candidates.append(
                        ("Celery no-op round trip", lambda: systems.celery_noop_op(env))
                    )
                    candidates.append(("nextval (not gapless)", lambda: systems.nextval_op(env)))
                results.points += measure_repeated(scenario, candidates, concurrency, args)


def many_sequences(env: Env, results: Results, args: argparse.Namespace, logs: Path) -> None:
    shards, count, concurrency = 8, args.many_sequences, args.many_concurrency
    processes = max(1, min(args.many_workers, shards))
    names = [f"many-{i:03d}" for i in range(count)]
    allocator = Allocator(env.database_url)
    for name in names:
        allocator.create_sequence(name)
    allocator.close()
    print(f"many sequences: {count} sequences over {shards} shards", flush=True)
    brokers = [("redis", env.redis_broker)]
    if "amqp" in args.brokers:
        brokers.append(("rabbitmq", env.amqp_broker))
    for label, broker in brokers:  # Redis first: the target compares its figure
        with contextlib.ExitStack() as stack:
            for p in range(processes):  # the shards dealt out over the worker processes
                mine = [f"{i}/{shards}" for i in range(p, shards, processes)]
                stack.enter_context(
                    worker(
                        env,
                        broker,
                        [arg for shard in mine for arg in ("--shard", shard)],
                        logs / f"worker-shards{p}-{label}.log",
                        NUMBERING_SHARDS=str(shards),
                    )
                )
            [point] = measure_repeated(
                "many",
                [
                    (
                        f"numbering ({label}, {count} sequences)",
                        lambda broker=broker: systems.many_sequences_op(env, broker, names, shards),
                    )
                ],
                concurrency,
                args,
            )
        results.points.append(point)
    results.many = {
        "sequences": count,
        "shards": shards,
        "concurrency": concurrency,
        "workers": processes,
    }


def _settled(env: Env, broker: str, queues: list[str], members: int) -> None:
    """Wait until every queue has an active consumer and ``members`` fleet members hold
    them (the fleet has spread the queues over every worker)."""
    from numbering.tasks.fleet import HOLDERS
    from numbering.tasks.guard import consumer_alive

    client = redis.Redis.from_url(broker, decode_responses=True)
    engine = sa.create_engine(env.database_url)
    deadline = time.monotonic() + 120
    try:
        while True:
            holders = client.hmget(HOLDERS, queues)
            alive = all(consumer_alive(engine, queue) for queue in queues)
            if alive and len(set(holders)) == members and None not in holders:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"the fleet of {members} did not settle: {holders}")
            time.sleep(0.2)
    finally:
        client.close()
        engine.dispose()


def fleet(env: Env, results: Results, args: argparse.Namespace, logs: Path) -> None:
    """100 sequences over 16 shard queues: one process serving every shard by hand, then
    fleets of 1, 2 and 3 worker processes (``--shards 16``), Redis broker."""
    shards, count, concurrency = 16, args.many_sequences, args.many_concurrency
    names = [f"fleet-{i:03d}" for i in range(count)]
    allocator = Allocator(env.database_url)
    for name in names:
        allocator.create_sequence(name)
    allocator.close()
    queues = [f"numbering.shard.{i}-of-{shards}" for i in range(shards)]
    print(f"worker fleet: {count} sequences over {shards} shards", flush=True)
    layouts: list[tuple[str, list[list[str]]]] = [
        ("one process, every shard by hand", [[f"--shard={i}/{shards}" for i in range(shards)]])
    ]
    for members in args.fleet_sizes:
        layouts.append((f"fleet of {members}", [[f"--shards={shards}"]] * members))
    for label, processes in layouts:
        with contextlib.ExitStack() as stack:
            for p, worker_args in enumerate(processes):
                ready = "fleet of" if worker_args[0].startswith("--shards=") else "active consumer"
                stack.enter_context(
                    process(
                        [sys.executable, "-m", "numbering", "worker", *worker_args],
                        numbering_env(env, env.redis_broker, NUMBERING_SHARDS=str(shards)),
                        logs / f"worker-fleet-{len(processes)}-{p}.log",
                        ready,
                    )
                )
            _settled(env, env.redis_broker, queues, len(processes))
            [point] = measure_repeated(
                "fleet",
                [
                    (
                        f"numbering ({label})",
                        lambda: systems.many_sequences_op(env, env.redis_broker, names, shards),
                    )
                ],
                concurrency,
                args,
            )
        results.points.append(point)
    results.fleet = {"sequences": count, "shards": shards, "concurrency": concurrency}


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``args`` under /usr/bin/time; (seconds, peak RSS in KiB, stderr)."""
    started = time.monotonic()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "peak-rss-kib %M", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:5])} failed:\n{done.stderr}")
    peak = int(done.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0])
    return elapsed, peak, done.stderr


CEILING = """
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
table, chunk = sys.argv[2], int(sys.argv[3])
base = 0
while True:
    with conn, conn.cursor() as cur:
        cur.execute(f'''
            WITH c AS (SELECT id FROM {table} WHERE number IS NULL ORDER BY id LIMIT %s FOR UPDATE)
            UPDATE {table} t SET number = %s + r.n
              FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM c) r
             WHERE t.id = r.id''', (chunk, base))
        if cur.rowcount == 0:
            break
        base += cur.rowcount
"""


def _batch_tables(engine: sa.Engine, tables: list[str], rows: int) -> None:
    with engine.begin() as conn:
        for table in tables:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            conn.exec_driver_sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, number bigint)")
            conn.exec_driver_sql(
                f"INSERT INTO {table} SELECT g, NULL FROM generate_series(1, {rows}) g"
            )
            # What a user numbering a big table would add, for both contenders alike.
            conn.exec_driver_sql(f"CREATE INDEX ON {table} (id) WHERE number IS NULL")
            conn.exec_driver_sql(f"ANALYZE {table}")
    # Start both contenders from a checkpointed database, not from the other's leftovers.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("CHECKPOINT")


def batch(env: Env, results: Results, args: argparse.Namespace) -> None:
    """Each size ``--batch-repeats`` times on fresh tables, the contenders taking turns
    to go first; the report gives the median rows/s and the highest peak memory."""
    engine = create_engine(env.database_url)
    sizes = sorted({max(args.batch_rows // 10, 1000), args.batch_rows})
    libpq_url = make_url(env.database_url).set(drivername="postgresql")
    for rows in sizes:
        print(f"batch: {rows:,} rows, {args.batch_repeats} run(s) each", flush=True)
        runs: dict[str, list[tuple[float, float]]] = {"numbering": [], "ceiling": []}
        for repeat in range(args.batch_repeats):
            tables = {"numbering": f"batch_nb_{rows}_{repeat}", "ceiling": f"batch_ceiling_{rows}"}
            sequence = f"batch-{rows}-{repeat}"
            Allocator(engine).create_sequence(sequence)
            nb_env = numbering_env(
                env, env.redis_broker, NUMBERING_BATCH_TABLES=tables["numbering"]
            )
            commands = {
                "numbering": (
                    [
                        sys.executable, "-m", "numbering", "batch", sequence,
                        "--table", tables["numbering"], "--chunk-size", str(args.chunk_size),
                    ],
                    nb_env,
                ),
                "ceiling": (
                    [
                        sys.executable, "-c", CEILING,
                        libpq_url.render_as_string(hide_password=False),
                        tables["ceiling"], str(args.chunk_size),
                    ],
                    dict(os.environ),
                ),
            }  # fmt: skip
            order = ["numbering", "ceiling"] if repeat % 2 == 0 else ["ceiling", "numbering"]
            for contender in order:
                _batch_tables(engine, [tables[contender]], rows)
                seconds, peak, _ = _timed(*commands[contender])
                runs[contender].append((rows / seconds, peak / 1024))
                _check_numbered(engine, tables[contender], rows, results)
            print(
                f"  run {repeat + 1}: numbering {runs['numbering'][-1][0]:,.0f} rows/s, "
                f"set-based UPDATE {runs['ceiling'][-1][0]:,.0f} rows/s "
                f"({' first, then '.join(order)})",
                flush=True,
            )
        entry = {
            "rows": rows,
            "runs": args.batch_repeats,
            "numbering_rows_s": statistics.median(r for r, _ in runs["numbering"]),
            "numbering_peak_mib": max(m for _, m in runs["numbering"]),
            "ceiling_rows_s": statistics.median(r for r, _ in runs["ceiling"]),
            "ceiling_peak_mib": max(m for _, m in runs["ceiling"]),
            "numbering_all": [r for r, _ in runs["numbering"]],
            "ceiling_all": [r for r, _ in runs["ceiling"]],
        }
        results.batch.append(entry)
        print(
            f"  median: numbering batch {entry['numbering_rows_s']:,.0f} rows/s "
            f"(peak {entry['numbering_peak_mib']:.0f} MiB); set-based UPDATE ceiling "
            f"{entry['ceiling_rows_s']:,.0f} rows/s",
            flush=True,
        )
    engine.dispose()


def _check_numbered(engine: sa.Engine, table: str, rows: int, results: Results) -> None:
    with engine.connect() as conn:
        count, distinct, low, high = conn.execute(
            sa.text(
                f"SELECT count(number), count(DISTINCT number), min(number), max(number) "
                f"FROM {table}"
            )
        ).one()
    if not (count == distinct == rows and low == 1 and high == rows):
        results.failures.append(f"{table}: numbers are not exactly 1..{rows}")


def growth(env: Env, results: Results, args: argparse.Namespace) -> None:
    """Cost per number (numbering's own transaction, in process) on the benchmark's own
    ledger and on a second database whose ledger holds ``--growth-rows`` more rows.

    The two are measured in turns (``--growth-rounds`` each, medians), in the same
    minutes: measured once before and once after a multi-minute fill, machine drift fell
    straight into the ratio (four full runs gave 0.72x to 1.29x for the same code).
    """
    big_database = f"{args.database}_growth"
    big_url = prepare_database(args.admin_url, big_database)
    small, big = Allocator(env.database_url), Allocator(big_url)
    try:
        for allocator in (small, big):
            allocator.create_sequence("growth")
        print(f"growth: filling a second ledger with {args.growth_rows:,} rows", flush=True)
        started = time.monotonic()
        # Rows written in bulk have no hash chain: the filler is a counter whose numbers
        # predate chains (the audit says so, and passes).
        filler = create_unchained(big.engine, "growth-filler")
        with big.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO numbering_ledger (sequence_id, cycle, value, count, request_key, "
                "status, assigned_at) SELECT %(id)s, 0, g, 1, 'filler:' || g, 'assigned', now() "
                "FROM generate_series(1, %(n)s) g",
                {"id": filler, "n": args.growth_rows},
            )
            conn.exec_driver_sql(
                "UPDATE numbering_sequence SET last_value = %(n)s WHERE id = %(id)s",
                {"id": filler, "n": args.growth_rows},
            )
        # Let both databases settle as one would while a ledger grows over months:
        # vacuum and checkpoint now, not in the middle of the measurement.
        for allocator in (small, big):
            engine = allocator.engine.execution_options(isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("VACUUM ANALYZE numbering_ledger")
                conn.exec_driver_sql("CHECKPOINT")
        print(f"  filled, vacuumed and checkpointed in {time.monotonic() - started:.0f} s")

        def cost(allocator: Allocator) -> float:
            for _ in range(50):  # warm the pool and the caches
                allocator.next_value("growth")
            n = args.growth_numbers
            began = time.perf_counter()
            for _ in range(n):
                allocator.next_value("growth")
            return (time.perf_counter() - began) / n * 1000

        runs: dict[str, list[float]] = {"small": [], "big": []}
        for turn in range(args.growth_rounds):  # taking turns to go first
            order = [("small", small), ("big", big)]
            for name, allocator in order if turn % 2 == 0 else reversed(order):
                runs[name].append(cost(allocator))
        results.growth = [
            {
                "ledger_rows": _ledger_rows(allocator),
                "ms_per_number": statistics.median(runs[name]),
                "runs": runs[name],
            }
            for name, allocator in (("small", small), ("big", big))
        ]
        first, last = results.growth
        print(
            f"  median {first['ms_per_number']:.2f} ms/number at {first['ledger_rows']:,} "
            f"ledger rows, {last['ms_per_number']:.2f} ms at {last['ledger_rows']:,} "
            f"({args.growth_rounds} rounds each, in turns)",
            flush=True,
        )
        for report in big.audit():
            line = f"{report.sequence} ({big_database})"
            results.audit.append(
                f"{line}: {'ok' if report.ok else 'PROBLEMS'}, {report.values:,} values"
            )
            if not report.ok:
                results.failures.append(f"ledger {line}: {report.problems[:3]}")
    finally:
        small.close()
        big.close()
        admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:  # 10 million rows of disk back
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{big_database}" WITH (FORCE)')
        admin.dispose()


def _ledger_rows(allocator: Allocator) -> int:
    with allocator.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM numbering_ledger").scalar_one())


def audit(env: Env, results: Results, args: argparse.Namespace) -> None:
    allocator = Allocator(env.database_url)
    many = [0, 0]  # the many-sequence scenario's sequences, on one line: (count, values)
    for report in allocator.audit():
        if not report.ok:
            results.failures.append(f"ledger {report.sequence}: {report.problems[:3]}")
        if report.ok and report.sequence.startswith(("many-", "fleet-")):
            many[0] += 1
            many[1] += report.values
            continue
        line = f"{report.sequence}: {'ok' if report.ok else 'PROBLEMS'}, {report.values:,} values"
        results.audit.append(line)
    if many[0]:
        results.audit.append(f"many-* and fleet-*: all {many[0]} ok, {many[1]:,} values in all")
    allocator.close()
    for name in ("django-web", "dropin-web", "forupdate-web", f"{WEB}-redis", f"{WEB}-rabbitmq"):
        with contextlib.suppress(sa.exc.ProgrammingError):
            count, ok = systems.gapless_documents(env.database_url, name)
            results.audit.append(f"documents of {name}: {'ok' if ok else 'PROBLEMS'}, {count:,}")
            if not ok:
                results.failures.append(f"documents of {name} are not numbered 1..N")


# -- report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def write_report(results: Results, args: argparse.Namespace, output: Path) -> None:
    from benchmarks.report import render

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(results, args, machine(), output))
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--database", default="numbering_bench")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--scenarios", default="web,bare,batch,many,fleet,growth")
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements of every point, systems taking turns; the median counts",
    )
    parser.add_argument("--batch-rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument(
        "--batch-repeats",
        type=int,
        default=3,
        help="runs of each batch contender, taking turns to go first; the median counts",
    )
    parser.add_argument("--many-sequences", type=int, default=100)
    parser.add_argument("--many-concurrency", type=int, default=16)
    parser.add_argument(
        "--many-workers",
        type=int,
        default=1,
        help="worker processes sharing the 8 shards (default 1, as docs/deployment.md "
        "advises until a process nears a full core; 2 did worse on 2 cores)",
    )
    parser.add_argument(
        "--fleet-sizes",
        default="1,2,3",
        help="worker processes in each fleet measured (scenario fleet)",
    )
    parser.add_argument("--growth-rows", type=int, default=10_000_000)
    parser.add_argument(
        "--growth-numbers", type=int, default=1000, help="numbers per growth measurement"
    )
    parser.add_argument(
        "--growth-rounds",
        type=int,
        default=5,
        help="measurements of each ledger size, in turns; the median counts",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the harness (CI)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.duration, args.warmup = "1,2", 0.5, 0.2
        args.batch_rows, args.chunk_size, args.many_sequences = 3000, 1000, 10
        args.batch_repeats, args.repeats = 2, 1
        args.many_concurrency, args.growth_rows, args.growth_numbers = 2, 2000, 50
        args.growth_rounds, args.fleet_sizes = 2, "1,2"
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.fleet_sizes = [int(n) for n in str(args.fleet_sizes).split(",")]
    args.scenarios = set(args.scenarios.split(","))
    args.brokers = set(args.brokers.split(","))

    logs = Path(os.environ.get("BENCH_LOGS", "/tmp/numbering-bench"))
    logs.mkdir(parents=True, exist_ok=True)
    url = prepare_database(args.admin_url, args.database)
    dbs = [f"{args.redis}/{n}" for n in (10, 11, 12, 13)]
    for db in dbs:
        redis.Redis.from_url(db).flushdb()
    # numbering's reply lists share the broker's database, as docs/deployment.md advises
    # (a request and its answer then share round trips); Celery's no-op has its own two.
    env = Env(url, dbs[0], dbs[0], args.amqp, dbs[2], dbs[3], redis_replies_apart=dbs[1])
    systems.setup_django(url)
    results = Results()
    started = time.monotonic()
    if args.scenarios & {WEB, BARE}:
        web_and_bare(env, results, args, logs, Allocator(url))
    if "many" in args.scenarios:
        many_sequences(env, results, args, logs)
    if "fleet" in args.scenarios:
        fleet(env, results, args, logs)
    if "batch" in args.scenarios:
        batch(env, results, args)
    if "growth" in args.scenarios:
        growth(env, results, args)
    audit(env, results, args)
    results_seconds = time.monotonic() - started
    print(f"benchmark ran {results_seconds:.0f} s; peak RSS of the driver "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # fmt: skip
    for line in results.audit:
        print(f"  audit: {line}")
    write_report(results, args, args.output)
    if results.failures:
        for failure in results.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
