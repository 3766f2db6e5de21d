"""numbering on MariaDB against the alternatives there, side by side: ``make bench-mariadb``.

The web and bare workloads of ``benchmarks.run`` with the database on MariaDB (InnoDB,
its default REPEATABLE READ): numbering (worker and Redis broker) against
django-sequences on Django's MySQL backend (its ``INSERT ... ON DUPLICATE KEY UPDATE``
path) and, for the web workload, a hand-written ``SELECT ... FOR UPDATE`` counter. Then
batch numbering of a table against InnoDB's own set-based UPDATE. Every ledger and
documents table is audited at the end: a fast wrong answer fails the run.

Writes a Markdown report (``--output``, default docs/benchmarks-mariadb.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from benchmarks import systems
from benchmarks.run import (
    BARE,
    ROOT,
    WEB,
    Point,
    Results,
    _check_numbered,
    _timed,
    machine,
    measure_repeated,
    numbering_env,
    prepare_database,
    worker,
)
from benchmarks.systems import Env, Op
from numbering import Allocator, create_engine

# InnoDB's own ceiling: each chunk is a primary-key range (its last id read first), numbered
# by one UPDATE with a user variable, committed; the fastest set-based form measured on
# MariaDB 10.11. No ledger and no keys: a crash leaves nothing to resume by. (`WHERE
# number IS NULL ORDER BY id LIMIT n` made MariaDB read the (number, id) index and sort
# every row left, each chunk: 20,000 rows/s at 1,000,000 rows; keyset with `LIMIT` in the
# UPDATE itself: 52,000; this: 116,000.)
CEILING = """
import sys, MySQLdb
host, port, user, database, table, chunk = sys.argv[1:7]
conn = MySQLdb.connect(host=host, port=int(port), user=user, db=database)
cur = conn.cursor()
cur.execute("SET @n := 0")
last = 0
while True:
    cur.execute(
        f"SELECT MAX(id) FROM (SELECT id FROM {table} WHERE id > %s ORDER BY id LIMIT %s) c",
        (last, int(chunk)),
    )
    high = cur.fetchone()[0]
    if high is None:
        break
    cur.execute(
        f"UPDATE {table} SET number = (@n := @n + 1) WHERE id > %s AND id <= %s ORDER BY id",
        (last, high),
    )
    conn.commit()
    last = high
"""


def web_and_bare(env: Env, results: Results, args: argparse.Namespace, logs: Path) -> None:
    allocator = Allocator(env.database_url)
    names = [f"{WEB}-redis", f"{BARE}-redis"]
    for name in names:
        allocator.create_sequence(name)
    with allocator.engine.begin() as conn:
        for name in ("django-web", "dropin-web", "forupdate-web", *names):
            conn.exec_driver_sql(systems.documents_table(f"docs_{name.replace('-', '_')}"))
        conn.exec_driver_sql("INSERT INTO bench_counter VALUES ('forupdate-web', 0)")
    allocator.close()
    with worker(
        env,
        env.redis_broker,
        ["--sequence", f"{WEB}-redis", "--sequence", f"{BARE}-redis"],
        logs / "worker-mariadb.log",
    ):
        for scenario in (WEB, BARE):
            web = scenario == WEB
            print(f"{scenario} scenario (MariaDB)", flush=True)
            for concurrency in args.concurrency:
                candidates: list[tuple[str, Callable[[], Op]]] = [
                    (
                        "numbering (redis)",
                        lambda web=web, sc=scenario: systems.numbering_op(
                            env, env.redis_broker, f"{sc}-redis", web, None
                        ),
                    ),
                    (
                        "django-sequences",
                        lambda web=web: systems.django_sequences_op(
                            "django-web" if web else "django-bare", web
                        ),
                    ),
                    (
                        "numbering.django drop-in",
                        lambda web=web: systems.django_sequences_op(
                            "dropin-web" if web else "dropin-bare", web, dropin=True
                        ),
                    ),
                ]
                if web:
                    candidates.append(
                        (
                            "SELECT FOR UPDATE",
                            lambda: systems.for_update_op(env, "forupdate-web", True),
                        )
                    )
                results.points += measure_repeated(scenario, candidates, concurrency, args)


def _batch_table(engine: sa.Engine, table: str, rows: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        # The index is what a user numbering a big table would add (InnoDB has no partial
        # index): both contenders find the rows left without walking the numbered ones.
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, number BIGINT, "
            "INDEX (number, id)) ENGINE=InnoDB"
        )
        conn.exec_driver_sql(f"INSERT INTO {table} (id) SELECT seq FROM seq_1_to_{rows}")


def batch(env: Env, results: Results, args: argparse.Namespace) -> None:
    """Each size ``--batch-repeats`` times on fresh tables, the two taking turns to go
    first; the median rows/s and the highest peak memory count."""
    engine = create_engine(env.database_url)
    url = make_url(env.database_url)
    sizes = sorted({max(args.batch_rows // 10, 1000), args.batch_rows})
    for rows in sizes:
        print(f"batch (MariaDB): {rows:,} rows, {args.batch_repeats} run(s) each", flush=True)
        runs: dict[str, list[tuple[float, float]]] = {"numbering": [], "ceiling": []}
        for repeat in range(args.batch_repeats):
            tables = {"numbering": f"batch_nb_{rows}_{repeat}", "ceiling": f"batch_ceiling_{rows}"}
            sequence = f"batch-{rows}-{repeat}"
            Allocator(engine).create_sequence(sequence)
            commands = {
                "numbering": (
                    [
                        sys.executable, "-m", "numbering", "batch", sequence,
                        "--table", tables["numbering"], "--chunk-size", str(args.chunk_size),
                    ],
                    numbering_env(
                        env, env.redis_broker, NUMBERING_BATCH_TABLES=tables["numbering"]
                    ),
                ),
                "ceiling": (
                    [
                        sys.executable, "-c", CEILING, url.host or "127.0.0.1",
                        str(url.port or 3306), url.username or "root", url.database or "",
                        tables["ceiling"], str(args.chunk_size),
                    ],
                    dict(os.environ),
                ),
            }  # fmt: skip
            order = ["numbering", "ceiling"] if repeat % 2 == 0 else ["ceiling", "numbering"]
            for contender in order:
                _batch_table(engine, tables[contender], rows)
                seconds, peak, _ = _timed(*commands[contender])
                runs[contender].append((rows / seconds, peak / 1024))
                _check_numbered(engine, tables[contender], rows, results)
            print(
                f"  run {repeat + 1}: numbering {runs['numbering'][-1][0]:,.0f} rows/s, "
                f"InnoDB set-based UPDATE {runs['ceiling'][-1][0]:,.0f} rows/s "
                f"({' first, then '.join(order)})",
                flush=True,
            )
        results.batch.append(
            {
                "rows": rows,
                "runs": args.batch_repeats,
                "numbering_rows_s": statistics.median(r for r, _ in runs["numbering"]),
                "numbering_peak_mib": max(m for _, m in runs["numbering"]),
                "ceiling_rows_s": statistics.median(r for r, _ in runs["ceiling"]),
                "numbering_all": [r for r, _ in runs["numbering"]],
                "ceiling_all": [r for r, _ in runs["ceiling"]],
            }
        )
    engine.dispose()


def audit(env: Env, results: Results, args: argparse.Namespace) -> None:
    allocator = Allocator(env.database_url)
    for report in allocator.audit():
        results.audit.append(
            f"{report.sequence}: {'ok' if report.ok else 'PROBLEMS'}, {report.values:,} values"
        )
        if not report.ok:
            results.failures.append(f"ledger {report.sequence}: {report.problems[:3]}")
    allocator.close()
    if WEB not in args.scenarios:
        return
    for name in ("django-web", "dropin-web", "forupdate-web", f"{WEB}-redis"):
        count, ok = systems.gapless_documents(env.database_url, name)
        results.audit.append(f"documents of {name}: {'ok' if ok else 'PROBLEMS'}, {count:,}")
        if not ok:
            results.failures.append(f"documents of {name} are not numbered 1..N")


def _ratio(a: Point | None, b: Point | None, attribute: str) -> float | None:
    if a is None or b is None or not getattr(b, attribute):
        return None
    return float(getattr(a, attribute)) / float(getattr(b, attribute))


def render(results: Results, args: argparse.Namespace, version: str) -> str:
    top = max(args.concurrency)
    web = results.point(WEB, "numbering (redis)", top)
    web_django = results.point(WEB, "django-sequences", top)
    bare = results.point(BARE, "numbering (redis)", top)
    bare_django = results.point(BARE, "django-sequences", top)
    lines = [
        "# Benchmarks on MariaDB",
        "",
        f"Measured {date.today().isoformat()} on {machine()}, with {version} and Redis "
        "on the same machine (loopback), by `make bench-mariadb` (`python -m "
        f"benchmarks.mariadb`). Each point is the median of {args.repeats} measurement(s) "
        f"of {args.duration:g} s after {args.warmup:g} s of warm-up, the systems taking "
        "turns. The workloads are those of docs/benchmarks.md; the database is MariaDB at "
        "its default isolation (REPEATABLE READ), numbering's worker at its defaults.",
        "",
        "## Targets (the PostgreSQL ones)",
        "",
        "| target | wanted | measured | met |",
        "| --- | --- | ---: | --- |",
    ]

    def target(
        name: str, wanted: str, value: float | None, ok: Callable[[float], bool] | None
    ) -> None:
        shown = "n/a" if value is None else f"{value:.2f}x"
        met = "n/a" if value is None or ok is None else ("yes" if ok(value) else "**no**")
        lines.append(f"| {name} | {wanted} | {shown} | {met} |")

    target(
        f"web x{top}: numbering / django-sequences throughput",
        "at least 8x",
        _ratio(web, web_django, "throughput"),
        lambda v: v >= 8,
    )
    target(
        f"web x{top}: numbering / django-sequences p99",
        "at most 0.1x",
        _ratio(web, web_django, "p99_ms"),
        lambda v: v <= 0.1,
    )
    target(
        f"web x{top}: numbering.django drop-in / django-sequences throughput (lock time no worse)",
        "at least 1x",
        _ratio(results.point(WEB, "numbering.django drop-in", top), web_django, "throughput"),
        lambda v: v >= 1,
    )
    target(
        f"bare x{top}: numbering / django-sequences throughput",
        "at least 2x",
        _ratio(bare, bare_django, "throughput"),
        lambda v: v >= 2,
    )
    if results.batch:
        big = max(results.batch, key=lambda b: b["rows"])
        target(
            f"batch {big['rows']:,} rows: numbering / InnoDB set-based UPDATE",
            "none set (PostgreSQL's: 0.8x its own)",
            big["numbering_rows_s"] / big["ceiling_rows_s"],
            None,
        )
    for scenario, title in ((WEB, "Web requests"), (BARE, "Bare enqueue-and-await")):
        points = [p for p in results.points if p.scenario == scenario]
        if not points:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| system | requesters | numbers/s | p50 ms | p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in points:
            lines.append(
                f"| {p.system} | {p.concurrency} | {p.throughput:,.0f} | {p.p50_ms:.1f} | "
                f"{p.p99_ms:.1f} | {p.errors} |"
            )
    if results.batch:
        lines += [
            "",
            f"## Batch numbering ({args.chunk_size:,}-row chunks)",
            "",
            "numbering: `numbering batch` (a ledger row per chunk, resumable, the ids of each "
            "chunk numbered by one UPDATE joined to a JSON_TABLE). InnoDB set-based UPDATE: "
            "`UPDATE ... SET number = (@n := @n + 1) WHERE id > last AND id <= high ORDER "
            "BY id`, a primary-key range per chunk, committed per chunk, no ledger. Both "
            "tables have an index on `(number, id)`, as a user numbering a big table would "
            "add (InnoDB has no partial index).",
            "",
            "| rows | runs | numbering rows/s | peak MiB | InnoDB set-based UPDATE rows/s | "
            "ratio | each run (numbering / UPDATE) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for b in results.batch:
            each = ", ".join(
                f"{n:,.0f} / {c:,.0f}"
                for n, c in zip(b["numbering_all"], b["ceiling_all"], strict=True)
            )
            lines.append(
                f"| {b['rows']:,} | {b['runs']} | {b['numbering_rows_s']:,.0f} | "
                f"{b['numbering_peak_mib']:.0f} | {b['ceiling_rows_s']:,.0f} | "
                f"{b['numbering_rows_s'] / b['ceiling_rows_s']:.2f}x | {each} |"
            )
    lines += ["", "## Audit", ""]
    lines += [f"- {line}" for line in results.audit]
    lines += [
        "",
        "Result: every ledger gapless."
        if not results.failures
        else "Result: **FAILED**: " + "; ".join(results.failures),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="mysql://root@127.0.0.1:3306/")
    parser.add_argument("--database", default="numbering_bench")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default="web,bare,batch")
    parser.add_argument("--batch-rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks-mariadb.md")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the harness (CI)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.duration, args.warmup = "1,2", 0.5, 0.2
        args.batch_rows, args.chunk_size, args.batch_repeats, args.repeats = 3000, 1000, 2, 1
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.scenarios = set(args.scenarios.split(","))

    logs = Path(os.environ.get("BENCH_LOGS", "/tmp/numbering-bench"))
    logs.mkdir(parents=True, exist_ok=True)
    url = prepare_database(args.admin_url, args.database)
    dbs = [f"{args.redis}/{n}" for n in (10, 11, 12, 13)]
    for db in dbs:
        redis.Redis.from_url(db).flushdb()
    env = Env(url, dbs[0], dbs[0], "", dbs[2], dbs[3])
    systems.setup_django(url)
    results = Results()
    started = time.monotonic()
    if args.scenarios & {WEB, BARE}:
        web_and_bare(env, results, args, logs)
    if "batch" in args.scenarios:
        batch(env, results, args)
    audit(env, results, args)
    engine = create_engine(url)
    with engine.connect() as conn:
        version = "MariaDB " + str(conn.exec_driver_sql("SELECT VERSION()").scalar()).split("-")[0]
    engine.dispose()
    print(f"benchmark ran {time.monotonic() - started:.0f} s")
    for line in results.audit:
        print(f"  audit: {line}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results, args, version))
    print(f"wrote {args.output}")
    if results.failures:
        for failure in results.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
